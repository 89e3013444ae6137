"""NVIDIA DALI backend of the pretraining loader (``DATA.BACKEND dali``).

The random parameters of every view are drawn in Python by the very torch RNG draws of the torchvision path
(:func:`pretrain.data.moco_v2_transform` under :func:`pretrain.data.sample_seed`): a DALI view has the same crop
box, jitter flags, factors and order, grayscale, blur sigma and flip as the torchvision view of the same
(SEED, epoch, index), whatever the number of threads or processes or where a run was resumed. DALI only executes
the pixel work on those parameters, fed per sample through ``fn.external_source``:

* decode (``mixed``, i.e. nvJPEG, on a CUDA device, libjpeg-turbo on the CPU), EXIF orientation ignored as PIL does;
* crop the drawn box and resize it to DATA.IMAGE_SIZE (linear, antialiased), rounded to uint8 as PIL stores it;
* colour jitter in the drawn order, each op computed as PIL computes it (truncated to uint8 after each op, as
  ``Image.blend`` does): brightness ``x * b``; contrast: blend with the rounded mean of the ITU-R 601-2 grayscale
  image; saturation: blend with the grayscale image; hue: PIL's HSV round trip with its quantised shift of H,
  re-implemented with DALI arithmetic (``hue="yiq"`` uses DALI's ``fn.hue`` instead: a rotation of the chroma
  plane in YIQ, which preserves luma where PIL preserves V and S, several grey levels apart on saturated colours);
* grayscale (PIL's fixed-point ITU-R 601-2 luma), Gaussian blur (``fn.gaussian_blur``, a true Gaussian kernel of
  radius ceil(3 sigma) with mirrored borders, where PIL's ``GaussianBlur`` runs three extended box filters with
  replicated borders), horizontal flip and normalisation to float CHW (``fn.crop_mirror_normalize``).

Known differences from the torchvision path (pixel values only; samples, parameters and order are identical):

* the resize: DALI's antialiased linear filter vs PIL's fixed-point one (measured: 0.2 grey levels on average,
  3-4 at most);
* the blur (above; measured: 0.3-0.7 grey levels on average, 5-7 at most, at sigma 0.7-2);
* the normalisation's float rounding (an ulp);
* on a GPU, nvJPEG's decoding (fancy chroma upsampling is on, as libjpeg-turbo's, but the IDCT is nvJPEG's: not
  measured here, the test machines have no GPU). On the CPU the decoder gives PIL's pixels bitwise for the files
  measured (JPEG RGB / grayscale / CMYK, PNG RGB / RGBA / palette, BMP, WebP, TIFF); 16-bit PNGs differ (PIL
  clips I;16 at 255, DALI scales it);
* the contrast's grey is the mean of the grayscale image in float32, exact up to 256 x 256 px views, beyond which a
  mean within float rounding of a half could round the other way.

Brightness, contrast, saturation, hue and grayscale are bitwise PIL's on the same input, so end to end the views
of the two backends differ by about 0.4 grey levels on average (``tests/test_data_dali.py`` measures it); with
``hue="yiq"`` by about 8.

Speed: the pixel work is DALI's (on the GPU for a CUDA device); the Python side (reading the files, parsing
their headers, drawing the parameters: about half a millisecond a sample on a busy 2-core CPU, mostly torch's
per-call overhead of the draws) runs in one background thread of the training process, a few batches ahead. On a
CPU, DALI's elementwise arithmetic is slow (the exact hue alone takes about 20 ms on a 224-px view): there the
torchvision backend with DataLoader workers is the faster one (tools/bench_data.py measures both).

Unreadable images (``DATA.SKIP_CORRUPT``): a file whose header PIL cannot read is handled in Python exactly as in
:class:`pretrain.data.MultiViewDataset` (error naming the file, or the next readable image substituted and
counted). A file with a readable header that DALI cannot decode stops DALI's batch; the files of the batches in
flight are then read with PIL to name the culprit, which raises :class:`pretrain.data.CorruptImageError`, or with
``skip_corrupt`` is remembered as unreadable and the batches are rebuilt with the same substitute rule. A file
only one of the decoders rejects (PIL refuses some truncated files libjpeg-turbo may accept; DALI lacks some exotic
formats PIL reads) is therefore judged differently by the two backends: a file PIL reads and DALI cannot is an
error naming the batch's files even with ``skip_corrupt``.

DALI is optional: this module imports it only inside functions; :func:`require_dali` says how to install it.
"""
import functools
import io
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .cfgnode import ConfigError
from .data import CorruptImageError, ImageFolder, ResumableSampler, sample_seed

logger = logging.getLogger(__name__)

DALI_PACKAGE = "nvidia-dali-cuda130"  # CUDA-matched to torch's cu130 build; cu12 builds of torch: nvidia-dali-cuda120
INSTALL_HINT = (f"pip install -e '.[dali]' (or pip install {DALI_PACKAGE}; for a CUDA 12 build of torch: "
                f"pip install nvidia-dali-cuda120)")
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range, as moco_v2_transform uses it
NOOP = 4  # jitter op code of a ColorJitter component that is off (its factor None)
SKIP_HINT = "Or set DATA.SKIP_CORRUPT True to skip unreadable images (counted in metrics.jsonl as skipped_images)."


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    """Raise :class:`ConfigError` naming the pip command when NVIDIA DALI does not import."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"DATA.BACKEND dali needs NVIDIA DALI, which does not import here ({e}): {INSTALL_HINT}; "
                          f"or use DATA.BACKEND torchvision") from None


# ------------------------------------------------------------------------------------------------------------------
# Parameters: the torchvision path's RNG draws (no DALI needed)
# ------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _color_jitter(values: Tuple[float, ...]) -> T.ColorJitter:
    return T.ColorJitter(*values)


LOG_RATIO = [float(v) for v in torch.log(torch.tensor(RATIO))]  # float32 values, as get_params computes them


def _random_resized_crop(width: int, height: int, scale: Sequence[float], g: Optional[torch.Generator]):
    """``T.RandomResizedCrop.get_params`` (torchvision 0.16-0.29) on an image of ``width`` x ``height``, its draws
    from ``g``."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(LOG_RATIO[0], LOG_RATIO[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback: central crop
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view_params(width: int, height: int, d, generator: Optional[torch.Generator] = None) -> Dict:
    """One view's parameters, consuming the RNG exactly as ``moco_v2_transform`` consumes torch's on an image of
    ``width`` x ``height`` (``d``: the DATA node, or any object with CROP_SCALE, COLOR_JITTER, GRAYSCALE_P and
    BLUR_SIGMA), from ``generator`` (default: torch's CPU generator). The draws are torchvision's own, each given
    the generator (tests/test_data_dali.py proves them equal to the transform's). Returns ``crop`` (i, j, h, w)
    (top, left, height, width), ``jitter`` (applied?), ``order`` (the jitter ops 0 brightness, 1 contrast,
    2 saturation, 3 hue in the drawn order; 4 for a component that is off), ``factors`` (b, c, s, h; None when
    off), ``grayscale``, ``blur``, ``sigma`` (0 without blur), ``flip``."""
    g = generator
    i, j, h, w = _random_resized_crop(width, height, tuple(d.CROP_SCALE), g)
    # RandomApply([ColorJitter], p=0.8): `if self.p < torch.rand(1): return img`
    jitter = not bool(0.8 < torch.rand(1, generator=g))
    order, factors = [NOOP] * 4, (None, None, None, None)
    if jitter:  # ColorJitter.get_params: randperm(4), then a uniform factor per component that is on
        cj = _color_jitter(tuple(float(v) for v in d.COLOR_JITTER))
        fn_idx = torch.randperm(4, generator=g)
        factors = tuple(None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=g))
                        for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue))
        order = [int(k) if factors[int(k)] is not None else NOOP for k in fn_idx]
    grayscale = bool(torch.rand(1, generator=g) < d.GRAYSCALE_P)  # RandomGrayscale
    blur = not bool(0.5 < torch.rand(1, generator=g))  # RandomApply([RandomGaussianBlur], p=0.5)
    sigma = 0.0
    if blur:  # RandomGaussianBlur.__call__
        lo, hi = d.BLUR_SIGMA
        sigma = lo + (hi - lo) * torch.rand((), generator=g).item()
    flip = bool(torch.rand(1, generator=g) < 0.5)  # RandomHorizontalFlip
    return {"crop": (i, j, h, w), "jitter": jitter, "order": order, "factors": factors, "grayscale": grayscale,
            "blur": blur, "sigma": sigma, "flip": flip}


def draw_sample_params(seed: int, epoch: int, index: int, width: int, height: int, d, num_views: int = 2
                       ) -> List[Dict]:
    """The views' parameters of sample (epoch, index), from a generator seeded as MultiViewDataset seeds torch's
    (``torch.manual_seed(sample_seed(...))``: the same stream). A private generator: torch's global RNG state (the
    training process's, which checkpoints restore; ``torch.manual_seed`` would reseed its CUDA generators too) is
    never touched, and the draws are thread-safe."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    return [draw_view_params(width, height, d, generator) for _ in range(num_views)]


def hue_shift(hue_factor: float) -> int:
    """PIL's shift of the uint8 H channel for torchvision's ``adjust_hue(img, hue_factor)`` (0..255, wrapping)."""
    return int(np.int32(hue_factor * 255).astype(np.uint8))


def view_arrays(p: Dict) -> Tuple[np.ndarray, ...]:
    """A view's parameters as the arrays the DALI graph takes (:func:`_view`): crop anchor (x, y) and shape (w, h);
    the jitter as the ops before the hue (3 slots), whether the hue runs, the ops after it (3 slots), so that the
    graph holds one hue per view; the factors (b, c, s, PIL's hue shift, hue in degrees); grayscale, blur, sigma,
    flip."""
    i, j, h, w = p["crop"]
    b, c, s, hue = (default if f is None else f for f, default in zip(p["factors"], (1.0, 1.0, 1.0, 0.0)))
    order = [op for op in p["order"] if op != NOOP]
    at = order.index(3) if 3 in order else len(order)
    pre, post = order[:at], order[at + 1:]
    return (np.array([j, i], np.int32), np.array([w, h], np.int32),
            np.array(pre + [NOOP] * (3 - len(pre)), np.int32), np.array(3 in order),
            np.array(post + [NOOP] * (3 - len(post)), np.int32),
            np.array([b, c, s, hue_shift(hue), 360.0 * hue], np.float32),
            np.array(p["grayscale"]), np.array(p["blur"]), np.array(p["sigma"], np.float32),
            np.array(int(p["flip"]), np.int32))


VIEW_ARRAYS = 10  # len(view_arrays(...))


# ------------------------------------------------------------------------------------------------------------------
# The DALI graph: PIL's uint8 arithmetic, in float32 holding integers
# ------------------------------------------------------------------------------------------------------------------

def _plain(func):
    """Run ``func`` (DALI operators, no ``if`` on their outputs) without DALI's AutoGraph conversion, which would
    cost seconds per pipeline for the hundreds of arithmetic nodes below."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from nvidia.dali.pipeline import do_not_convert
        return do_not_convert(func)(*args, **kwargs)
    return wrapper


def _f64(v):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    return fn.cast(v, dtype=types.FLOAT64)


def _f32(v):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    return fn.cast(v, dtype=types.FLOAT)


@_plain
def _luma(x):
    """PIL's ``convert("L")``: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, exact in float32 (all below 2^24)."""
    import nvidia.dali.math as dmath
    return dmath.floor((x[:, :, 0:1] * 19595.0 + x[:, :, 1:2] * 38470.0 + x[:, :, 2:3] * 7471.0 + 32768.0)
                       / 65536.0)


@_plain
def _blend(a, b, f):
    """PIL's ``Image.blend(a, b, f)`` on uint8: a + f (b - a) in float32, clamped, truncated."""
    import nvidia.dali.math as dmath
    return dmath.floor(dmath.clamp(a + f * (b - a), 0.0, 255.0))


@_plain
def _mean_luma(x):
    """``int(mean + 0.5)`` of the grayscale image, ImageEnhance.Contrast's grey (the sum of the integer grey
    values is exact in float32 up to 256 x 256 px; beyond, a tie could round the other way)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    return dmath.floor(fn.reductions.mean(_luma(x)) + 0.5)


@_plain
def _hue_pil(x, shift):
    """torchvision's PIL ``adjust_hue``: PIL's RGB -> HSV (uint8), H + shift (mod 256), HSV -> RGB, with the float
    and double steps of Pillow's Convert.c (rgb2hsv_row / hsv2rgb), so that it is bitwise PIL's."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath

    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc = dmath.max(r, dmath.max(g, b))
    cr = maxc - dmath.min(r, dmath.min(g, b))
    chroma = cr != 0.0  # else H = S = 0
    crs = cr + (cr == 0.0)  # no division by zero where masked
    s = cr / (maxc + (maxc == 0.0))  # float s = cr / maxc
    rc, gc, bc = _f64((maxc - r) / crs), _f64((maxc - g) / crs), _f64((maxc - b) / crs)
    is_r = r == maxc
    is_g = (g == maxc) & (r != maxc)
    is_b = (r != maxc) & (g != maxc)
    h = is_r * _f32(bc - gc) + is_g * _f32(2.0 + rc - bc) + is_b * _f32(4.0 + gc - rc)  # float h
    hd = _f64(h) / 6.0 + 1.0
    hf = _f32(hd - dmath.floor(hd))  # h = fmod(h / 6.0 + 1.0, 1.0), stored in a float
    uh = dmath.floor(_f64(hf) * 255.0) * chroma
    us = dmath.floor(_f64(s) * 255.0) * chroma
    t = uh + shift  # the uint8 addition of torchvision's adjust_hue, wrapping
    uh = t - 256.0 * (t >= 256.0)
    hh = uh * 6.0 / 255.0
    i = dmath.floor(hh)
    fr = _f32(hh - i)
    fs = _f32(us / 255.0)
    v = _f64(maxc)
    # S = 0 gives p = q = t = v: grey pixels come out as v in every case below
    p = dmath.floor(v * (1.0 - _f64(fs)) + 0.5)
    q = dmath.floor(v * (1.0 - _f64(fs * fr)) + 0.5)
    t = dmath.floor(v * (1.0 - _f64(fs) * (1.0 - _f64(fr))) + 0.5)
    k = i - 6.0 * (i >= 6.0)  # i % 6
    m = [k == float(n) for n in range(6)]
    R = v * (m[0] | m[5]) + q * m[1] + p * (m[2] | m[3]) + t * m[4]
    G = t * m[0] + v * (m[1] | m[2]) + q * m[3] + p * (m[4] | m[5])
    B = p * (m[0] | m[1]) + t * m[2] + v * (m[3] | m[4]) + q * m[5]
    return _f32(fn.cat(R, G, B, axis=2))


@_plain
def _hue_yiq(x, degrees):
    """DALI's ``fn.hue``: rotation of the YIQ chroma plane by the same angle, rounded and clamped to uint8."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    return dmath.clamp(dmath.floor(fn.hue(x, hue=degrees) + 0.5), 0.0, 255.0)


def _jitter_op(x, op, fac):
    """Brightness (0), contrast (1), saturation (2) or nothing (:data:`NOOP`), per sample."""
    if op == 0:
        x = _blend(0.0, x, fac[0])
    elif op == 1:
        x = _blend(_mean_luma(x), x, fac[1])
    elif op == 2:
        x = _blend(_luma(x), x, fac[2])
    return x


def _view(img, params, size: int, mean: Sequence[float], std: Sequence[float], gpu: bool, hue: str):
    """One view of the decoded uint8 HWC ``img`` from its parameter nodes (:func:`view_arrays`): float CHW."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    anchor, shape, pre, has_hue, post, factors, grayscale, blur, sigma, flip = params
    crop = fn.slice(img, anchor, shape, axis_names="WH")
    x = _f32(fn.resize(crop, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True))
    fac = factors.gpu() if gpu else factors
    for slot in range(3):  # unrolled: the jitter ops before the hue, in the drawn order
        x = _jitter_op(x, pre[slot], fac)
    if has_hue:
        if hue == "pil":
            x = _hue_pil(x, fac[3])
        else:
            x = _hue_yiq(x, factors[4])
    for slot in range(3):  # and after it
        x = _jitter_op(x, post[slot], fac)
    if grayscale:
        y = _luma(x)
        x = fn.cat(y, y, y, axis=2)
    if blur:
        x = dmath.clamp(dmath.floor(fn.gaussian_blur(x, sigma=sigma) + 0.5), 0.0, 255.0)
    return fn.crop_mirror_normalize(x, mirror=flip, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                    output_layout="CHW", dtype=types.FLOAT)


def build_pipeline(source, batch_size: int, num_threads: int, device_id: Optional[int], size: int,
                   mean: Sequence[float], std: Sequence[float], num_views: int = 2, prefetch: int = 2,
                   hue: str = "pil", seed: int = 0):
    """The DALI pipeline of :class:`DaliTwoViewLoader`: ``source()`` returns one batch as (encoded bytes, label,
    skipped, then :data:`VIEW_ARRAYS` arrays per view), each a list over the batch, or raises StopIteration at the
    end of the epoch. Outputs: the views (float CHW), labels, skipped. ``device_id`` None: CPU only."""
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    if hue not in ("pil", "yiq"):
        raise ValueError(f"hue {hue!r}: 'pil' or 'yiq'")
    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True)
    def two_views():
        nodes = fn.external_source(source=source, num_outputs=3 + num_views * VIEW_ARRAYS, batch=True)
        encoded, label, skipped = nodes[:3]
        if gpu:
            img = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                    jpeg_fancy_upsampling=True)
        else:
            img = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        views = [_view(img, nodes[3 + v * VIEW_ARRAYS:3 + (v + 1) * VIEW_ARRAYS], size, mean, std, gpu, hue)
                 for v in range(num_views)]
        return (*views, label, skipped)

    # the seed only matters to DALI's own RNG, which no operator here uses: every random choice is an input
    return two_views(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                     prefetch_queue_depth=max(1, prefetch), seed=seed, exec_async=True, exec_pipelined=True)


# ------------------------------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------------------------------

class DaliTwoViewLoader:
    """The two-view training loader on DALI, with the interface the Trainer uses of its DataLoader.

    Built from the run's :class:`ImageFolder` and :class:`ResumableSampler`: ``sampler.set_epoch(epoch,
    start_iter)`` then ``iter(loader)`` yields that epoch's remaining batches of this process's share, each
    ``([view1, view2], labels, skipped)`` as the DataLoader over :class:`pretrain.data.MultiViewDataset` does (views
    B x 3 x S x S float32, on ``device``; labels and skipped int64 on the CPU), the same samples with the same
    augmentation parameters. DALI runs ``num_threads`` threads (DATA.NUM_WORKERS, at least one) and prepares up to
    ``prefetch`` batches ahead; the Python side of the next batches (file reads, header parsing, parameter draws)
    runs ahead in one background thread of this process, handed to DALI when it asks for them."""

    def __init__(self, base: ImageFolder, sampler: ResumableSampler, d, seed: int,
                 device: torch.device = torch.device("cpu"), num_threads: int = 1, skip_corrupt: bool = False,
                 prefetch: int = 2, num_views: int = 2, hue: str = "pil"):
        require_dali()
        self.base, self.sampler, self.d, self.seed = base, sampler, d, seed
        self.device = torch.device(device)
        self.num_threads, self.skip_corrupt, self.prefetch = max(1, int(num_threads)), skip_corrupt, prefetch
        self.num_views, self.hue = num_views, hue
        self.batch_size = sampler.local_batch
        self.unreadable: Dict[int, str] = {}  # index -> why, found after DALI failed (skip_corrupt): substituted
        self._pipe, self._clean = None, False
        self._batches: List[List[Tuple[int, int]]] = []
        self._next = 0  # the next batch the source hands to DALI
        self._used: Dict[int, List[int]] = {}  # batch position -> the image indices it holds (after substitution)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Dict[int, Future] = {}  # batch position -> its Python side, being prepared

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    # ---- Python side: files, headers, parameters -------------------------------------------------------------
    def _read(self, index: int) -> Tuple[np.ndarray, Tuple[int, int]]:
        """The file's bytes and its (width, height) from the header, or CorruptImageError as ImageFolder.load."""
        path = self.base.samples[index][0]
        if index in self.unreadable:
            raise CorruptImageError(self.unreadable[index])
        try:
            data = np.fromfile(path, dtype=np.uint8)
            with Image.open(io.BytesIO(data.tobytes())) as img:
                size = img.size
        except (OSError, ValueError, SyntaxError) as e:  # as ImageFolder.load
            raise CorruptImageError(f"cannot read image {path}: {e}. Replace or delete the file.") from e
        return data, size

    def _sample(self, epoch: int, index: int):
        """MultiViewDataset.__getitem__'s substitute rule and skipped count, with header reads for image loads."""
        drawn, passed = index, 0
        while True:
            try:
                data, (width, height) = self._read(index)
                break
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise CorruptImageError(f"{e} {SKIP_HINT}") from e
                passed += 1
                logger.warning("skipping %s", e)
                if passed >= len(self.base):
                    raise CorruptImageError(f"no readable image in {self.base.root}") from e
                index = (index + 1) % len(self.base)
        skipped = int(passed > 0 and epoch == self.sampler.first_epoch(drawn))
        params = draw_sample_params(self.seed, epoch, index, width, height, self.d, self.num_views)
        return index, data, skipped, params

    def _prepare(self, keys: List[Tuple[int, int]]):
        """One batch's external-source columns and the image indices it holds."""
        columns = [[] for _ in range(3 + self.num_views * VIEW_ARRAYS)]
        used = []
        for epoch, index in keys:
            index, data, skipped, params = self._sample(epoch, index)
            used.append(index)
            row = [data, np.array(self.base.targets[index], np.int64), np.array(skipped, np.int64)]
            for p in params:
                row.extend(view_arrays(p))
            for column, value in zip(columns, row):
                column.append(value)
        return tuple(columns), used

    AHEAD = 2  # batches whose Python side is prepared beyond the one DALI asks for

    def _source(self):
        """DALI's external source: the next batch (its Python side prepared in the background), StopIteration at
        the end of the epoch."""
        if self._next >= len(self._batches):
            raise StopIteration
        pos = self._next
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dali-source")
        for k in range(pos, min(pos + 1 + self.AHEAD, len(self._batches))):
            if k not in self._ahead:
                self._ahead[k] = self._pool.submit(self._prepare, self._batches[k])
        columns, self._used[pos] = self._ahead.pop(pos).result()
        self._next = pos + 1
        return columns

    def _drop_ahead(self) -> None:
        """Forget the batches prepared ahead (a new epoch, or what they depend on changed)."""
        for future in self._ahead.values():
            future.cancel()
        for future in self._ahead.values():
            if not future.cancelled():
                future.exception()  # wait; an error there belongs to a batch that is not needed
        self._ahead.clear()

    # ---- DALI side ------------------------------------------------------------------------------------------
    def _pipeline(self):
        if self._pipe is None or not self._clean:
            self._pipe = None  # an abandoned epoch leaves batches in flight: start afresh
            d = self.d
            device_id = None  # CPU operators only
            if self.device.type == "cuda":
                device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._pipe = build_pipeline(self._source, self.batch_size, self.num_threads, device_id, d.IMAGE_SIZE,
                                        d.MEAN, d.STD, self.num_views, self.prefetch, self.hue, self.seed)
            self._pipe.build()
        self._clean = False
        return self._pipe

    def _to_torch(self, out) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        *views, labels, skipped = out
        gpu = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if gpu else None
        tensors = []
        for v in views:
            v = v.as_tensor()
            t = torch.empty(v.shape(), dtype=torch.float32, device=self.device if gpu else "cpu")
            tensors.append(feed_ndarray(v, t, cuda_stream=stream))
        return (tensors, torch.from_numpy(labels.as_array().reshape(-1).copy()),
                torch.from_numpy(skipped.as_array().reshape(-1).copy()))

    def _undecodable(self, error: Exception, first: int) -> Exception:
        """After DALI failed on a batch in flight (positions ``first`` .. self._next - 1): read their files with PIL
        to name the culprit. Returns the exception to raise, or None when skip_corrupt lets the epoch go on."""
        self._drop_ahead()  # prepared with what was known before
        bad = []
        for pos in range(first, self._next):
            for index in self._used.get(pos, []):
                try:
                    self.base.load(index)
                except CorruptImageError as e:
                    bad.append((index, e))
        if not bad:
            files = sorted({self.base.samples[i][0] for pos in range(first, self._next)
                            for i in self._used.get(pos, [])})
            return RuntimeError(f"DALI could not decode a file that PIL reads, among {len(files)} files of the "
                                f"batches in flight ({', '.join(files[:8])}{', ...' if len(files) > 8 else ''}): "
                                f"{error}. Use DATA.BACKEND torchvision, or convert the file.")
        if not self.skip_corrupt:
            return CorruptImageError(f"{bad[0][1]} {SKIP_HINT}")
        for index, e in bad:  # MultiViewDataset warns when it skips them: _sample does, when they are drawn
            self.unreadable[index] = str(e)
        return None

    def __iter__(self):
        keys = list(iter(self.sampler))
        b = self.batch_size
        batches = [keys[k:k + b] for k in range(0, len(keys) - b + 1, b)]
        if not batches:
            return
        pipe = None
        self._drop_ahead()
        self._batches, self._next, self._used = batches, 0, {}
        done = 0  # batches yielded
        while True:
            if pipe is None:
                pipe = self._pipeline()
            try:
                out = pipe.run()
            except StopIteration:
                break
            except CorruptImageError:  # a header the source could not read, without skip_corrupt
                raise
            except RuntimeError as e:  # DALI's decoder failed on a batch in flight; the pipeline is no longer valid
                self._clean, self._pipe, pipe = False, None, None
                if "decoders.image" not in str(e):
                    raise
                error = self._undecodable(e, done)
                if error is not None:
                    raise error from e
                self._next = done  # rebuild and redo the batches in flight, with the culprits substituted
                continue
            batch = self._to_torch(out)
            done += 1
            self._used.pop(done - 1, None)
            yield batch
        pipe.reset()
        self._clean = True
