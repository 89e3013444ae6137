"""Teacher health and the chance-level monitor (pretrain/health.py): the numbers on known cases, a deliberately
collapsed teacher warned about (log line, WARNING, metrics.jsonl record) and a healthy one not, the run unchanged by
the check, InfoNCE pinned at ln(K + 1) warned about and a decreasing one not, and tools/teacher_health.py."""
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from conftest import load_tool, tiny_cfg
from pretrain.checkpoint import Checkpointer
from pretrain.data import ImageFolder, eval_transform
from pretrain.encoder import build_encoder
from pretrain.export import export_encoder
from pretrain.health import (CHANCE_MIN_LOGS, MAX_MEAN_COSINE, ChanceLevel, effective_rank, embedding_health)
from pretrain.hooks import ChanceLevelMonitor
from pretrain.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the numbers


def test_identical_vectors_have_cosine_one_and_no_spread():
    h = embedding_health(torch.tensor([[3.0, -1.0, 2.0, 0.5]]).repeat(50, 1))
    assert h["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    # centred, the matrix is zero (up to rounding, which the tolerance ignores): no direction of difference at all
    assert h["effective_rank"] == 0.0 and h["std"] == pytest.approx(0.0, abs=1e-9) and h["collapsed"]


@pytest.mark.parametrize("n", [2, 5, 16])
def test_orthonormal_vectors(n):
    eye = torch.eye(n)
    h = embedding_health(eye)
    assert h["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
    # n orthonormal rows, centred: n - 1 equal singular values (the mean direction is removed)
    assert h["effective_rank"] == pytest.approx(n - 1, rel=1e-9)
    # +-e_i: already centred, n equal singular values; the cosines are 0 except -1 between e_i and -e_i
    both = embedding_health(torch.cat([eye, -eye]))
    assert both["effective_rank"] == pytest.approx(n, rel=1e-9)
    assert both["mean_cosine"] == pytest.approx(-1 / (2 * n - 1), abs=1e-12)
    # uncentred: the effective rank of k equal singular values is k
    assert effective_rank(eye) == pytest.approx(n, rel=1e-9)
    assert effective_rank(torch.diag(torch.tensor([5.0, 5.0, 5.0, 0.0]))) == pytest.approx(3, rel=1e-9)


def test_spread_and_collapsed_embeddings():
    g = torch.Generator().manual_seed(0)
    spread = embedding_health(torch.randn(512, 32, generator=g))  # isotropic: the healthy extreme
    assert abs(spread["mean_cosine"]) < 0.01 and spread["effective_rank"] > 28 and not spread["collapsed"]
    assert spread["std"] == pytest.approx(spread["std_uniform"], rel=0.05)
    # the reported teacher: one shared direction plus a small image-specific residue (cosine ~0.997)
    near = embedding_health(torch.randn(1, 32, generator=g) + 0.04 * torch.randn(512, 32, generator=g))
    assert near["mean_cosine"] > 0.99 > MAX_MEAN_COSINE and near["collapsed"]
    assert near["std"] < 0.1 * spread["std"]
    # dimensional collapse: images differ along one direction only (+-v), mean cosine ~0 but collapsed
    v = torch.randn(1, 32, generator=g)
    line = embedding_health(v * torch.randn(512, 1, generator=g).sign())
    assert abs(line["mean_cosine"]) < 0.1 and line["effective_rank"] == pytest.approx(1.0) and line["collapsed"]
    with pytest.raises(ValueError, match="N >= 2"):
        embedding_health(torch.randn(1, 8))


# ---------------------------------------------------------------------------------------------------------------
# the chance-level monitor


def test_chance_level_flags_a_pinned_loss_once_after_a_window():
    chance = math.log(1025)
    level = ChanceLevel(chance, window_iters=20)
    fired = [it for it in range(1, 101) if level.update(it, chance + 1e-4 * (-1) ** it)]
    assert fired == [21]  # the first logged step at which the pinned stretch spans the window; only once
    decreasing = ChanceLevel(chance, window_iters=20)
    assert not any(decreasing.update(it, chance * (0.985 - 0.002 * it)) for it in range(1, 101))
    # a loss that leaves chance restarts the stretch; too few logged steps are never a verdict
    broken = ChanceLevel(chance, window_iters=4)
    values = [chance] * 4 + [0.9 * chance] + [chance] * (CHANCE_MIN_LOGS - 1)
    assert not any(broken.update(it, v) for it, v in zip(range(10, 1000, 10), values))


def _fake_trainer(values, chance, iters_per_epoch=4):
    part = types.SimpleNamespace(chance_losses=lambda: {"loss_mocov2": chance})
    return types.SimpleNamespace(rank=0, iter=0, iters_per_epoch=iters_per_epoch, max_iter=len(values),
                                 cfg=types.SimpleNamespace(TRAIN=types.SimpleNamespace(LOG_PERIOD=1)),
                                 model=types.SimpleNamespace(parts=lambda: [part]), losses={})


def _drive(values, chance, caplog):
    hook = ChanceLevelMonitor()
    hook.trainer = t = _fake_trainer(values, chance)
    hook.before_train()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        for v in values:
            t.iter += 1
            t.losses = {"loss": torch.tensor(v + 1.0), "loss_mocov2": torch.tensor(v)}
            hook.after_step()
            if t.iter % t.iters_per_epoch == 0:
                hook.after_epoch()
    return [r for r in caplog.records if r.name == "pretrain"]


def test_monitor_warns_on_infonce_pinned_at_ln_k_plus_1(caplog):
    chance = math.log(1025)  # K 1024
    records = _drive([chance] * 12, chance, caplog)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "loss_mocov2 has been at its chance level 6.9324" in warnings[0]
    assert "tools/teacher_health.py" in warnings[0] and "lower the distillation weight" in warnings[0]
    epochs = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert epochs[0] == "epoch 1: loss_mocov2 6.9324, 1.000 x its chance level 6.9324 (outputs without information)"


def test_monitor_is_quiet_on_a_decreasing_infonce(caplog):
    chance = math.log(1025)
    records = _drive([chance * (0.99 - 0.02 * i) for i in range(12)], chance, caplog)
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert len([r for r in records if "x its chance level" in r.getMessage()]) == 3  # one line per epoch


def test_mocov2_chance_level_is_weight_times_ln_k_plus_1(imagefolder, tmp_path):
    from pretrain.model import build_method

    cfg = tiny_cfg(tmp_path, imagefolder, **{"MODEL.STUDENT.ARCH": "convnet_tiny", "LOSS.CONTRASTIVE.WEIGHT": 0.5})
    assert build_method(cfg).testbed.chance_losses() == {"loss_mocov2": pytest.approx(0.5 * math.log(33))}


# ---------------------------------------------------------------------------------------------------------------
# the teacher check in the trainer and the CLI


@pytest.fixture(scope="module")
def teachers(imagefolder, tmp_path_factory):
    """Two convnet_small teachers (head 256 -> 64 -> 128) in our export format: ``collapsed`` (the head's last layer
    has zero weights and a large bias: every image maps to one embedding) and ``healthy`` (the same random network
    with the head's output centred on the training images: the embeddings point every way)."""
    out = {}
    for kind in ("collapsed", "healthy"):
        torch.manual_seed(7)
        enc = build_encoder("convnet_small", 64, 128).eval()
        last = enc.head[-1]
        with torch.no_grad():
            if kind == "collapsed":
                last.weight.zero_()
                last.bias.copy_(100 * torch.randn(128))
            else:
                base, tf = ImageFolder(str(imagefolder / "train")), eval_transform(32)
                x = torch.stack([tf(base.load(i)) for i in range(len(base))])
                last.bias.sub_(enc.head(enc.backbone(x)).mean(0))
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = export_encoder(enc, "convnet_small", str(folder), "convnet_small", {"method": "moco"})["backbone"]
    return out


def _cfg(out, data, teacher, **over):
    opts = {"MODEL.TEACHER.ARCH": "convnet_small", "MODEL.STUDENT.ARCH": "convnet_tiny", "TRAIN.STOP_AT_ITER": 2}
    opts.update(over)
    return tiny_cfg(out, data, teacher, **opts)


def _health_records(out):
    return [json.loads(x) for x in open(out / "metrics.jsonl") if "teacher_mean_cosine" in x]


def test_collapsed_teacher_is_warned_and_recorded_healthy_is_not(tmp_path, imagefolder, teachers):
    bad = tmp_path / "collapsed"
    Trainer(_cfg(bad, imagefolder, teachers["collapsed"])).run()
    (rec,) = _health_records(bad)
    assert rec["iter"] == 0 and rec["teacher_collapsed"] is True and rec["teacher_images"] == 64
    assert rec["teacher_mean_cosine"] == pytest.approx(1.0, abs=1e-6) and rec["teacher_effective_rank"] == 0.0
    assert rec["teacher_std"] < 1e-6 and rec["teacher_features_effective_rank"] > 2
    log = (bad / "log.txt").read_text()
    (warning,) = [ln for ln in log.splitlines() if "WARNING" in ln and "teacher health" in ln]
    for remedy in ("COLLAPSED", "train the teacher differently", "distil another layer",
                   "LOSS.COMPRESS.TEACHER_FEATURES", "lower the distillation weight", "LOSS.DISCO.WEIGHT 32 now"):
        assert remedy in warning, remedy
    # a resumed run does not check again
    Trainer(_cfg(bad, imagefolder, teachers["collapsed"], **{"TRAIN.STOP_AT_ITER": 3})).run()
    assert len(_health_records(bad)) == 1 and (bad / "log.txt").read_text().count("teacher health (") == 1

    good = tmp_path / "healthy"
    Trainer(_cfg(good, imagefolder, teachers["healthy"])).run()
    (rec,) = _health_records(good)
    assert rec["teacher_collapsed"] is False and abs(rec["teacher_mean_cosine"]) < 0.2
    assert rec["teacher_effective_rank"] > 10 and rec["teacher_std"] > 0.5 * rec["teacher_std_uniform"]
    log = (good / "log.txt").read_text()
    assert "teacher health (convnet_small, 64 training images)" in log and ": healthy" in log
    assert not [ln for ln in log.splitlines() if "WARNING" in ln and "teacher" in ln]

    # the check draws nothing from the RNGs: the run is bitwise the same with it off; no record then
    off = tmp_path / "off"
    Trainer(_cfg(off, imagefolder, teachers["healthy"], **{"TEST.TEACHER_HEALTH.IMAGES": 0})).run()
    assert _health_records(off) == [] and "teacher health" not in (off / "log.txt").read_text()
    a, b = (Checkpointer(str(d)).load_latest()[0]["model"] for d in (good, off))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_check_without_a_distiller_of_the_teacher_embedding(tmp_path, imagefolder, teachers):
    out = tmp_path / "attention"  # attention transfer reads the teacher's feature maps, not its embedding
    Trainer(_cfg(out, imagefolder, teachers["collapsed"], **{"METHOD.DISTILLERS": "['attention']"})).run()
    assert _health_records(out) == [] and "teacher health" not in (out / "log.txt").read_text()


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "teacher_health.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_prints_the_numbers_and_the_verdict(imagefolder, teachers, capsys):
    common = ["MODEL.TEACHER.ARCH", "convnet_small", "DATA.TRAIN_DIR", imagefolder / "train", "DATA.IMAGE_SIZE", 32]
    bad = _cli("MODEL.TEACHER.WEIGHTS", teachers["collapsed"], *common, "--images", 40)  # as a script
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert "40 images of" in bad.stdout and "mean pairwise cosine 1.0000" in bad.stdout
    assert "verdict: COLLAPSED" in bad.stdout and "distil another layer" in bad.stdout
    tool = _tool()  # in process from here on: no second torch import
    assert tool.main([*map(str, common), "MODEL.TEACHER.WEIGHTS", teachers["healthy"]]) == 0
    out = capsys.readouterr().out
    assert "64 images of" in out and "verdict: healthy" in out
    with pytest.raises(SystemExit) as e:
        tool.main([*map(str, common), "METHOD.DISTILLERS", "[]"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: MODEL.TEACHER.WEIGHTS is empty")


def _tool():
    return load_tool("teacher_health")


def test_cli_help_imports_no_torch():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {ROOT!r})
        spec = importlib.util.spec_from_file_location("tool", {os.path.join(ROOT, "tools", "teacher_health.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().format_help()
        print(sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    help_text = _cli("--help", timeout=120)
    assert help_text.returncode == 0 and "tools/teacher_health.py --config-file" in help_text.stdout
