"""DATA.BACKEND dali (pretrain/data_dali.py): the same augmentation parameters as the torchvision path by
construction (proved exactly, without DALI), deterministic and resumable batches, sharding, pixel statistics close to
the torchvision path's, the Trainer end to end with a bitwise resume, unreadable images, and a clear error without
DALI. CPU only (DALI's CPU operators, ``device_id=None``); small JPEGs, 32 px views."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from conftest import tiny_cfg
from pretrain.data import (CorruptImageError, ImageFolder, MultiViewDataset, ResumableSampler, moco_v2_transform,
                           sample_seed)
from pretrain.data_dali import RATIO, draw_sample_params, draw_view_params

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_LEVEL = 1 / (255 * max(STD))  # one grey level in normalised units, at most (about 0.017)


class Data:
    """The DATA keys the loaders read (MoCo-v2's defaults, 32-px views)."""

    def __init__(self, **kw):
        self.IMAGE_SIZE, self.CROP_SCALE, self.BLUR_SIGMA = SIZE, (0.2, 1.0), (0.1, 2.0)
        self.COLOR_JITTER, self.GRAYSCALE_P, self.MEAN, self.STD = (0.4, 0.4, 0.4, 0.1), 0.2, MEAN, STD
        self.__dict__.update(kw)


def _transform(d):
    return moco_v2_transform(d.IMAGE_SIZE, d.CROP_SCALE, d.BLUR_SIGMA, d.MEAN, d.STD, d.COLOR_JITTER, d.GRAYSCALE_P)


def _picture(rng, w, h):
    """A colourful RGB image: gradients, a few saturated rectangles, noise."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    img = np.stack([255 * x, 255 * y, 255 * (1 - x) * (1 - y)], axis=2) * rng.uniform(0.5, 1.0, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    img = img + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """48 JPEGs of 48-200 px, several aspect ratios, in 3 class folders."""
    root = tmp_path_factory.mktemp("dali_data") / "train"
    rng = np.random.default_rng(0)
    for i in range(48):
        w, h = (int(v) for v in rng.integers(48, 201, 2))
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        _picture(rng, w, h).save(folder / f"img_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def dali():
    return pytest.importorskip("nvidia.dali")


def _dali_loader(root, batch, seed=3, threads=1, rank=0, world=1, d=None, **kw):
    from pretrain.data_dali import DaliTwoViewLoader
    base = ImageFolder(str(root))
    sampler = ResumableSampler(len(base), batch, rank, world, seed)
    return DaliTwoViewLoader(base, sampler, d or Data(), seed, num_threads=threads, **kw), sampler


def _torchvision_loader(root, batch, seed=3, d=None, skip_corrupt=False):
    base = ImageFolder(str(root))
    sampler = ResumableSampler(len(base), batch, 0, 1, seed)
    dataset = MultiViewDataset(base, _transform(d or Data()), seed, skip_corrupt=skip_corrupt, sampler=sampler)
    return DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, drop_last=True), sampler


def _epoch(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(loader)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (va, la, sa), (vb, lb, sb) in zip(a, b):
        assert len(va) == len(vb) == 2
        for x, y in zip(va, vb):
            assert x.dtype == torch.float32 and torch.equal(x, y)
        assert torch.equal(la, lb) and torch.equal(sa, sb)


# ----------------------------------------------------------------------------------------------------------------
# The parameters: the torchvision path's draws (no DALI needed)
# ----------------------------------------------------------------------------------------------------------------

def _apply_params(img, p, d):
    """``moco_v2_transform`` with its random choices replaced by the drawn parameters ``p``."""
    i, j, h, w = p["crop"]
    img = TF.resized_crop(img, i, j, h, w, [d.IMAGE_SIZE, d.IMAGE_SIZE], InterpolationMode.BILINEAR, antialias=True)
    if p["jitter"]:
        b, c, s, hue = p["factors"]
        ops = {0: lambda im: TF.adjust_brightness(im, b), 1: lambda im: TF.adjust_contrast(im, c),
               2: lambda im: TF.adjust_saturation(im, s), 3: lambda im: TF.adjust_hue(im, hue), 4: lambda im: im}
        for op in p["order"]:
            img = ops[op](img)
    if p["grayscale"]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p["blur"]:
        img = img.filter(ImageFilter.GaussianBlur(radius=p["sigma"]))  # pretrain.data.RandomGaussianBlur
    if p["flip"]:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), d.MEAN, d.STD)


@pytest.mark.parametrize("d", [Data(), Data(COLOR_JITTER=(0.4, 0.0, 0.4, 0.0), CROP_SCALE=(0.08, 0.5),
                                            GRAYSCALE_P=0.5, IMAGE_SIZE=24)], ids=["moco_v2", "jitter_off_parts"])
def test_drawn_parameters_reproduce_moco_v2_transform_exactly(d):
    """For many samples, the views built from draw_sample_params with torchvision's functional ops equal
    moco_v2_transform's views under the same per-sample seed bitwise, and the RNG is left in the same state (the
    same number of draws). Sizes include extreme aspect ratios (RandomResizedCrop's central-crop fallback)."""
    rng = np.random.default_rng(1)
    transform = _transform(d)
    sizes = [(64, 48), (48, 64), (200, 150), (57, 200), (300, 20), (20, 300)]
    seen = {"jitter": 0, "grayscale": 0, "blur": 0, "flip": 0, "fallback": 0}
    for n in range(120):
        w, h = sizes[n % len(sizes)]
        img = _picture(rng, w, h)
        epoch, index = n % 3, n
        params = draw_sample_params(7, epoch, index, w, h, d)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(7, epoch, index))
            expected = [transform(img) for _ in range(2)]
            after_transform = torch.rand(4)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(7, epoch, index))
            for _ in range(2):
                draw_view_params(w, h, d)
            after_draws = torch.rand(4)
        assert torch.equal(after_draws, after_transform)
        for p, want in zip(params, expected):
            assert torch.equal(_apply_params(img, p, d), want), (n, p)
            for k in ("jitter", "grayscale", "blur", "flip"):
                seen[k] += p[k]
            seen["fallback"] += (w, h) == (300, 20) and p["crop"] == (0, (300 - 27) // 2, 20, 27)
    assert all(seen[k] > 0 for k in ("jitter", "grayscale", "blur", "flip", "fallback"))
    if d.COLOR_JITTER[1] == 0:  # the components that are off (None) are never applied
        assert all(4 in p["order"] or not p["jitter"] for n in range(5) for p in draw_sample_params(1, 0, n, 9, 9, d))


def test_crop_distribution_is_random_resized_crops():
    """The drawn crops, checked numerically: area fraction within DATA.CROP_SCALE, aspect ratio within (3/4, 4/3),
    and their means equal to RandomResizedCrop's distribution computed independently (numpy: area ~ U(scale),
    log-ratio ~ U(log 3/4, log 4/3), rejected while the box does not fit; 10 tries make a failure negligible)."""
    d = Data()
    w = h = 200
    crops = np.array([draw_view_params(w, h, d)["crop"] for _ in range(3000)], dtype=float)
    area = crops[:, 2] * crops[:, 3] / (w * h)
    log_ratio = np.log(crops[:, 3] / crops[:, 2])
    # rounding the box to whole pixels moves the area by up to ~(w + h) / 2 px
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    assert np.abs(log_ratio).max() <= np.log(4 / 3) + 0.02
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 1.0, 400_000)
    r = rng.uniform(np.log(3 / 4), np.log(4 / 3), 400_000)
    fits = (a * np.exp(r) <= 1) & (a / np.exp(r) <= 1)
    se = np.sqrt(a[fits].var() / len(area))
    assert abs(area.mean() - a[fits].mean()) < 5 * se
    assert abs(log_ratio.mean() - r[fits].mean()) < 5 * np.sqrt(r[fits].var() / len(area)) + 0.005
    assert abs(log_ratio.std() - r[fits].std()) < 0.02
    assert RATIO == (3 / 4, 4 / 3)


def test_missing_dali_is_a_config_error_naming_pip(monkeypatch, tmp_path, jpegs):
    from pretrain.cfgnode import ConfigError
    from pretrain.cli import format_user_error
    from pretrain.loader import build_train_loader
    from pretrain.data_dali import dali_available, require_dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` raises ImportError
    assert not dali_available()
    with pytest.raises(ConfigError, match=r"pip install .*nvidia-dali-cuda130.*nvidia-dali-cuda120"):
        require_dali()
    cfg = tiny_cfg(tmp_path / "run", jpegs.parent, **{"DATA.BACKEND": "dali", "DATA.TRAIN_DIR": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match="DATA.BACKEND dali needs NVIDIA DALI") as e:
        build_train_loader(cfg)  # before the dataset scan: the missing folder is not what it reports
    assert format_user_error(e.value, "pretrain").startswith("error: DATA.BACKEND dali needs NVIDIA DALI")
    from pretrain.config import setup_cfg
    with pytest.raises(ConfigError, match="allowed values are torchvision, dali"):
        setup_cfg("", ["DATA.BACKEND", "nvjpeg", "METHOD.DISTILLERS", "[]"])


# ----------------------------------------------------------------------------------------------------------------
# The DALI loader
# ----------------------------------------------------------------------------------------------------------------

def test_batches_are_deterministic_thread_independent_and_resumable(dali, jpegs):
    one, s1 = _dali_loader(jpegs, 8, threads=1)
    two, s2 = _dali_loader(jpegs, 8, threads=2)
    assert len(one) == s1.iters_per_epoch == 6
    full = [_epoch(one, s1, e) for e in (0, 1)]
    assert len(full[0]) == 6 and not torch.equal(full[0][0][0][0], full[1][0][0][0])  # epochs differ
    v, labels, skipped = full[0][0]
    assert v[0].shape == (8, 3, SIZE, SIZE) and not torch.equal(v[0], v[1])
    assert labels.dtype == skipped.dtype == torch.int64 and not skipped.any()
    _assert_same_batches(_epoch(two, s2, 0), full[0])  # another loader, 2 DALI threads: bitwise the same
    _assert_same_batches(_epoch(two, s2, 1, start=2), full[1][2:])  # resumed mid-epoch
    s2.set_epoch(1, 0)
    next(iter(two))  # an epoch abandoned after one batch (batches in flight) ...
    _assert_same_batches(_epoch(two, s2, 1, start=3), full[1][3:])  # ... does not leak into the next
    assert _epoch(two, s2, 1, start=6) == []
    # the same samples as the torchvision path, in the same order
    tv, s3 = _torchvision_loader(jpegs, 8)
    for (_, la, sa), (_, lb, sb) in zip(_epoch(tv, s3, 1), full[1]):
        assert torch.equal(la, lb) and torch.equal(sa, sb)


def test_two_processes_give_the_global_batch(dali, jpegs):
    whole, s = _dali_loader(jpegs, 8)
    ranks = [_dali_loader(jpegs, 8, rank=r, world=2) for r in (0, 1)]
    expected = _epoch(whole, s, 2)
    parts = [_epoch(loader, sampler, 2) for loader, sampler in ranks]
    assert len(parts[0]) == len(parts[1]) == len(expected)
    for (v0, l0, k0), (v1, l1, k1), (v, labels, skipped) in zip(*parts, expected):
        assert v0[0].shape[0] == 4
        for view in range(2):
            assert torch.equal(torch.cat([v0[view], v1[view]]), v[view])
        assert torch.equal(torch.cat([l0, l1]), labels) and torch.equal(torch.cat([k0, k1]), skipped)


def _denormalise(v):
    return v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_statistics_match_the_torchvision_path(dali, jpegs):
    """Same samples, same parameters, pixel work by DALI vs PIL: 4 epochs x 48 images x 2 views = 384 views.

    Tolerances: the only pixel differences are the resize (DALI's antialiased linear filter vs PIL's fixed-point
    one, ~0.2 grey levels on average), the blur (true Gaussian vs PIL's three box filters, under a grey level on
    average) and float rounding, while jitter, hue and grayscale are PIL's bitwise. So per view the mean absolute
    difference stays under 3 grey levels (measured: 0.4 on average, 1.6 at worst), and the per-channel means
    and standard deviations over all views agree to 0.01 (about half a grey level) and 1 %: far tighter than a
    wrong op would allow (no jitter shifts a channel mean by ~0.1, a missing blur changes std by several %)."""
    d = Data()
    dl, ds = _dali_loader(jpegs, 16, threads=2, d=d)
    tv, ts = _torchvision_loader(jpegs, 16, d=d)
    dali_views, tv_views, params = [], [], []
    sizes = [Image.open(path).size for path, _ in ImageFolder(str(jpegs)).samples]
    for epoch in range(4):
        for (va, la, _), (vb, lb, _) in zip(_epoch(dl, ds, epoch), _epoch(tv, ts, epoch)):
            assert torch.equal(la, lb)
            dali_views += list(torch.stack(va, 1).flatten(0, 1))
            tv_views += list(torch.stack(vb, 1).flatten(0, 1))
        ts.set_epoch(epoch)
        for _, index in ts:  # the parameters of the same samples, in the same order
            params += draw_sample_params(3, epoch, index, *sizes[index], d)
    a, b = torch.stack(dali_views), torch.stack(tv_views)
    n = len(a)
    assert n == len(params) == 384
    # grayscale views: all three channels equal once de-normalised, exactly the drawn flags, at the rate 0.2
    rgb = _denormalise(a)
    grey = ((rgb[:, 0] - rgb[:, 1]).abs().amax((1, 2)) < 1e-4) & ((rgb[:, 1] - rgb[:, 2]).abs().amax((1, 2)) < 1e-4)
    flags = torch.tensor([p["grayscale"] for p in params])
    assert torch.equal(grey, flags)
    rgb_tv = _denormalise(b)
    grey_tv = ((rgb_tv[:, 0] - rgb_tv[:, 1]).abs().amax((1, 2)) < 1e-4)
    assert torch.equal(grey_tv, flags)
    tol = 4 * np.sqrt(0.2 * 0.8 / n)  # 4 binomial standard deviations
    assert abs(flags.float().mean().item() - 0.2) < tol
    assert abs(np.mean([p["blur"] for p in params]) - 0.5) < 4 * np.sqrt(0.25 / n)
    assert abs(np.mean([p["jitter"] for p in params]) - 0.8) < 4 * np.sqrt(0.16 / n)
    assert abs(np.mean([p["flip"] for p in params]) - 0.5) < 4 * np.sqrt(0.25 / n)
    # the pixels
    per_view = (a - b).abs().flatten(1).mean(1)
    print(f"per view mean |dali - torchvision|: mean {per_view.mean() / GREY_LEVEL:.2f}, max "
          f"{per_view.max() / GREY_LEVEL:.2f} grey levels; channel means {a.mean((0, 2, 3)).tolist()} vs "
          f"{b.mean((0, 2, 3)).tolist()}; stds {a.std((0, 2, 3)).tolist()} vs {b.std((0, 2, 3)).tolist()}")
    assert per_view.max() < 3 * GREY_LEVEL and per_view.mean() < 0.75 * GREY_LEVEL
    mean_a, mean_b = a.mean((0, 2, 3)), b.mean((0, 2, 3))
    std_a, std_b = a.std((0, 2, 3)), b.std((0, 2, 3))
    assert (mean_a - mean_b).abs().max() < 0.01, (mean_a, mean_b)
    assert ((std_a - std_b).abs() / std_b).max() < 0.01, (std_a, std_b)


def test_yiq_hue_option_runs_and_is_further_from_pil(dali, jpegs):
    """``hue="yiq"`` (DALI's fn.hue, a YIQ rotation) instead of the exact PIL hue: the same samples and shapes,
    pixels several grey levels away from the torchvision path's where the default is well under one."""
    yiq, ys = _dali_loader(jpegs, 16, hue="yiq")
    tv, ts = _torchvision_loader(jpegs, 16)
    (va, la, _), (vb, lb, _) = _epoch(yiq, ys, 0)[0], _epoch(tv, ts, 0)[0]
    assert torch.equal(la, lb) and va[0].shape == vb[0].shape
    assert (va[0] - vb[0]).abs().mean() > 2 * GREY_LEVEL


def test_colour_ops_are_bitwise_pils(dali):
    """The DALI arithmetic of brightness, contrast, saturation, hue (PIL's HSV round trip) and grayscale equals
    torchvision's PIL ops bitwise: random pixels (every hue sector, greys, black, white), random factors."""
    from nvidia.dali import fn, pipeline_def, types
    from pretrain.data_dali import _blend, _hue_pil, _luma, _mean_luma, hue_shift

    rng = np.random.default_rng(0)
    n = 16
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(n)]
    for img in images[:4]:
        img[:5] = img[:5, :, :1]  # grey rows
        img[5, :3], img[6, :3] = 0, 255
    factors = rng.uniform(0.6, 1.4, (n, 3)).astype(np.float32)
    hues = rng.uniform(-0.5, 0.5, n)

    @pipeline_def
    def ops():
        u8 = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        f = fn.external_source(source=lambda: list(factors), batch=True)
        shift = fn.external_source(source=lambda: [np.float32(hue_shift(h)) for h in hues], batch=True)
        x = fn.cast(u8, dtype=types.FLOAT)
        return (_blend(0.0, x, f[0]), _blend(_mean_luma(x), x, f[1]), _blend(_luma(x), x, f[2]), _hue_pil(x, shift),
                _luma(x))

    pipe = ops(batch_size=n, num_threads=1, device_id=None)
    pipe.build()
    outs = pipe.run()
    for k, img in enumerate(map(Image.fromarray, images)):
        b, c, sat = (float(v) for v in factors[k])
        expected = [TF.adjust_brightness(img, b), TF.adjust_contrast(img, c), TF.adjust_saturation(img, sat),
                    TF.adjust_hue(img, hues[k]), TF.rgb_to_grayscale(img, 1)]
        for name, out, want in zip(["brightness", "contrast", "saturation", "hue", "grayscale"], outs, expected):
            want = np.asarray(want, dtype=np.float32).reshape(out.at(k).shape)
            assert np.array_equal(out.at(k), want), (name, k)


# ----------------------------------------------------------------------------------------------------------------
# Unreadable images
# ----------------------------------------------------------------------------------------------------------------

def _with_broken(tmp_path, jpegs, which):
    """A copy of the dataset with image 5 cut to 100 bytes (PIL cannot read its header) and/or image 20 cut in half
    (readable header, undecodable data)."""
    root = tmp_path / "broken" / "train"
    shutil.copytree(jpegs, root)
    files = sorted(root.rglob("*.jpg"))
    broken = []
    if "header" in which:
        files[5].write_bytes(files[5].read_bytes()[:100])
        broken.append(files[5])
    if "data" in which:
        files[20].write_bytes(files[20].read_bytes()[:files[20].stat().st_size // 2])
        broken.append(files[20])
    return root, broken


@pytest.mark.parametrize("which", ["header", "data"])
def test_unreadable_image_stops_naming_the_file(dali, tmp_path, jpegs, which):
    root, (victim,) = _with_broken(tmp_path, jpegs, which)
    loader, sampler = _dali_loader(root, 8)
    with pytest.raises(CorruptImageError, match=rf"{victim.name}.*DATA.SKIP_CORRUPT"):
        _epoch(loader, sampler, 0)


def test_skip_corrupt_substitutes_and_counts_as_the_torchvision_path(dali, tmp_path, jpegs):
    root, broken = _with_broken(tmp_path, jpegs, ["header", "data"])
    loader, sampler = _dali_loader(root, 8, skip_corrupt=True)
    tv, ts = _torchvision_loader(root, 8, skip_corrupt=True)
    skipped = 0
    for epoch in (0, 1):
        mine, ref = _epoch(loader, sampler, epoch), _epoch(tv, ts, epoch)
        assert len(mine) == len(ref) == 6
        for (va, la, sa), (vb, lb, sb) in zip(mine, ref):
            assert torch.equal(la, lb) and torch.equal(sa, sb)  # the same substitutes, counted once
            for x, y in zip(va, vb):
                assert (x - y).abs().flatten(1).mean(1).max() < 3 * GREY_LEVEL  # the same images and parameters
            skipped += int(sa.sum())
    assert skipped == 2 and len(loader.unreadable) == 1  # the undecodable one, learnt from DALI's failure


# ----------------------------------------------------------------------------------------------------------------
# The Trainer and the benchmark
# ----------------------------------------------------------------------------------------------------------------

def _losses(output_dir):
    return [(r["iter"], r["loss"]) for r in map(json.loads, open(output_dir / "metrics.jsonl")) if "loss" in r]


def test_trainer_runs_dali_and_resumes_mid_epoch_bitwise(dali, tmp_path, imagefolder):
    """A tiny MoCo-v2 run (convnet_tiny, 32 px, 8 iterations) on DATA.BACKEND dali; stopped after 3 iterations
    and resumed, it continues with exactly the losses and weights of the uninterrupted run."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.data_dali import DaliTwoViewLoader
    from pretrain.trainer import Trainer

    opts = {"DATA.BACKEND": "dali", "MODEL.STUDENT.ARCH": "convnet_tiny", "SOLVER.EPOCHS": 1,
            "MODEL.CHANNELS_LAST": False, "TRAIN.AMP.ENABLED": False, "TRAIN.AMP.TEACHER": False}
    full = Trainer(tiny_cfg(tmp_path / "full", imagefolder, **opts))
    full.run()
    assert isinstance(full.loader, DaliTwoViewLoader) and full.iter == 8
    assert Trainer(tiny_cfg(tmp_path / "part", imagefolder, **opts, **{"TRAIN.STOP_AT_ITER": 3})).run() is None
    resumed = Trainer(tiny_cfg(tmp_path / "part", imagefolder, **opts), require_checkpoint=True)
    resumed.run()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 8
    a, b = (Checkpointer(str(tmp_path / run)).load_latest()[0] for run in ("full", "part"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # switching the backend of a run is a change of what is computed: refused on resume
    with pytest.raises(ValueError, match="DATA.BACKEND"):
        Trainer(tiny_cfg(tmp_path / "part", imagefolder, **{**opts, "DATA.BACKEND": "torchvision"})).run()


def test_bench_data_times_both_backends(dali, tmp_path):
    import runpy
    tool = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                                       "bench_data.py"))
    assert tool["default_backends"]() == ["torchvision", "dali"]
    result = tool["main"](["--jpeg-sizes", "40x30", "30x40", "--image-size", "32", "--workers", "1",
                           "--backends", "torchvision", "dali", "--batch", "4", "--batches", "2", "--warmup", "1",
                           "--step-images-per-s", "1000000", "--jpeg-dir", str(tmp_path / "jpegs")])
    assert [(r["backend"], r["workers"], r["timed_images"]) for r in result["rows"]] == [
        ("torchvision", 1, 8), ("dali", 1, 8)]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert any(line.startswith("data-bound (dali)") for line in result["verdicts"])
