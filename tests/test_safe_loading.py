"""No checkpoint can run code (issue #10): every entry point that reads a user's checkpoint refuses a pickle that
asks for anything but plain data, names the file, and never calls what the file asks for; legitimate files (official
MoCo ``.pth.tar`` with an ``argparse.Namespace``, our own iteration checkpoints with numpy RNG state, converted
detectron2 ``.pkl``) still load; a ``.pkl`` that loads no weight at all is an error."""
import argparse
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import Checkpointer
from pretrain.encoder import build_encoder
from pretrain.formats import EXPORT_FORMAT, read_backbone
from pretrain.safeload import UnreadableCheckpointError, UnsafeCheckpointError, load_pickle, load_torch
from pretrain.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs" / "detection" / "quick_schedules"


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilOpen:
    """Unpickling this creates ``marker`` with ``open`` (no shell)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _hostile(path, payload: dict, marker, dump="torch", evil=Evil) -> str:
    """Write ``payload`` plus an object whose unpickling creates ``marker``: with ``torch.save`` (.pth) or
    ``pickle.dump`` (.pkl)."""
    obj = dict(payload, evil=evil(marker))
    if dump == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return str(path)


def _moco_sd(seed=0):
    """A MoCo-v2 ``state_dict`` (module.encoder_q.* with the 2-layer head) of a resnet18."""
    torch.manual_seed(seed)
    enc = build_encoder("resnet18", 64, 16)
    sd = {f"module.encoder_q.{k}": v for k, v in enc.backbone.state_dict().items()}
    sd.update({f"module.encoder_q.fc.{k}": v for k, v in enc.head.state_dict().items()})
    sd["module.queue"] = torch.zeros(16, 8)
    return sd, enc


def _refused(excinfo, path):
    msg = str(excinfo.value)
    assert str(path) in msg and ("system" in msg or "open" in msg), msg
    assert "refuses to run code from a checkpoint" in msg, msg


# ----------------------------------------------------------------------------------------------------------------
# pretrain: MODEL.TEACHER.WEIGHTS, read_backbone, tools/export.py, iteration checkpoints

@pytest.mark.parametrize("evil", [Evil, EvilOpen])
def test_teacher_weights_never_execute(tmp_path, evil):
    marker = tmp_path / "MARKER"
    sd, _ = _moco_sd()
    path = _hostile(tmp_path / "moco_v2_200ep_pretrain.pth.tar", {"epoch": 200, "arch": "resnet18",
                                                                   "state_dict": sd}, marker, evil=evil)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_teacher(path, "resnet18")
    _refused(e, path)
    assert "MODEL.TEACHER.WEIGHTS" in str(e.value)
    assert e.value.global_name in ("posix.system", "nt.system", "io.open", "builtins.open")
    with pytest.raises(UnsafeCheckpointError):
        read_backbone(path)
    assert not marker.exists()


def test_legacy_format_and_raw_pickle_never_execute(tmp_path):
    marker = tmp_path / "MARKER"
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": {}, "evil": Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": {}, "evil": Evil(marker)}, f)
    proto0 = tmp_path / "proto0.pth"  # INST opcode: calls os.system without a GLOBAL + REDUCE
    proto0.write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    for path in (legacy, raw, proto0):
        with pytest.raises(UnsafeCheckpointError, match="system"):
            load_torch(path)
    assert not marker.exists()


def test_official_moco_checkpoint_with_namespace_loads(tmp_path):
    sd, enc = _moco_sd()
    ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]},
            "args": argparse.Namespace(arch="resnet18", lr=0.03, schedule=[120, 160], moco_t=0.2, mlp=True,
                                       gpu=None, dist_url="tcp://localhost:10001", scale=np.float64(0.2))}
    for legacy in (False, True):  # the 2020 checkpoints predate torch's zip format
        path = tmp_path / f"moco_{legacy}.pth.tar"
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
        teacher, info = load_teacher(str(path), "resnet18")
        assert info["format"] == "moco"
        assert load_torch(path)["args"].schedule == [120, 160]
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(teacher.eval()(x), enc.eval()(x), rtol=0, atol=0)


def test_plain_pickles_of_numpy_1_and_2_load(tmp_path):
    """detectron2 .pkl weights as numpy 2 writes them (numpy._core), as numpy 1.x / Python 2 wrote them
    (numpy.core), at every pickle protocol; an object array is refused."""
    weights = {"model": {"conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3)},
               "__author__": "torchvision", "matching_heuristics": True}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(weights, protocol=protocol)
        for name, blob in (("np2", data), ("np1", data.replace(b"numpy._core.", b"numpy.core."))):
            if name == "np1" and protocol >= 4:
                continue  # framed, length-prefixed names: not rewritten here (numpy 1.x era pickles are <= 3)
            path = tmp_path / f"{name}_{protocol}.pkl"
            path.write_bytes(blob)
            loaded = load_pickle(path)
            assert loaded["__author__"] == "torchvision" and loaded["model"]["n"] == 3
            np.testing.assert_array_equal(loaded["model"]["conv1.weight"], weights["model"]["conv1.weight"])
    path = tmp_path / "objects.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.array([1, "x"], dtype=object)}}, f)
    with pytest.raises(UnsafeCheckpointError, match="object"):
        load_pickle(path)


@pytest.mark.parametrize("kind", ["random", "text", "truncated", "empty"])
def test_not_a_checkpoint_names_the_file(tmp_path, kind, teacher_export):
    path = tmp_path / f"{kind}.pth"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n" * 10)
    elif kind == "truncated":
        data = Path(teacher_export).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(UnreadableCheckpointError) as e:
        read_backbone(str(path))
    assert str(path) in str(e.value) and "cannot read" in str(e.value)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, pickle.UnpicklingError)
    with pytest.raises(UnreadableCheckpointError, match="cannot read"):
        load_pickle(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch(tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, imagefolder):
    """A real short pretraining run (MoCo-v2, resnet18): its OUTPUT_DIR and config."""
    from conftest import tiny_cfg

    from pretrain.trainer import Trainer

    out = tmp_path_factory.mktemp("safe") / "run"
    cfg = tiny_cfg(out, imagefolder, **{"SOLVER.EPOCHS": 1, "MODEL.MOCO.QUEUE_SIZE": 8})
    Trainer(cfg).run()
    return out, cfg


def test_own_iteration_checkpoint_loads(pretrain_run):
    out, _ = pretrain_run
    state, path = Checkpointer(str(out)).load_latest()
    assert state is not None and isinstance(state["rng"]["numpy"][1], np.ndarray)  # np.random.get_state()
    assert read_backbone(path).format == "pretrain-checkpoint"


def test_planted_iteration_checkpoint_is_skipped_not_executed(pretrain_run, tmp_path, caplog):
    from pretrain.trainer import Trainer

    out, cfg = pretrain_run
    marker = tmp_path / "MARKER"
    good = Checkpointer(str(out)).list()[0]
    state = load_torch(good)
    planted = os.path.join(out, "checkpoints", "model_9999999.pth")
    _hostile(planted, {k: state[k] for k in ("format", "model", "cfg", "iter", "epoch")}, marker)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        loaded, path = Checkpointer(str(out)).load_latest()
    assert path == good and loaded["iter"] == state["iter"]
    assert any(planted in r.getMessage() and "system" in r.getMessage() for r in caplog.records), caplog.text
    # a run continuing in this folder (rank 0 moves unreadable checkpoints aside) resumes from the good one
    Trainer(cfg).run()
    assert not marker.exists()


def test_export_cli_refuses_a_hostile_checkpoint(pretrain_run, tmp_path):
    out, _ = pretrain_run
    marker = tmp_path / "MARKER"
    state = load_torch(Checkpointer(str(out)).list()[0])
    path = _hostile(tmp_path / "model_0000008.pth", {k: state[k] for k in ("format", "model", "cfg", "iter",
                                                                            "epoch")}, marker)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), path, str(tmp_path / "exp")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not marker.exists()
    assert "UnsafeCheckpointError" in proc.stderr and path in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "exp").exists()


# ----------------------------------------------------------------------------------------------------------------
# transfer: MODEL.WEIGHTS of the evaluators

def test_eval_weights_refused(tmp_path, teacher_export):
    from transfer.common import load_backbone

    marker = tmp_path / "MARKER"
    good = load_torch(teacher_export)
    path = _hostile(tmp_path / "resnet18.pth", good, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_backbone(path)
    _refused(e, path)
    assert "MODEL.WEIGHTS" in str(e.value) and not marker.exists()


def test_eval_knn_cli_refuses_hostile_weights(tmp_path, imagefolder, teacher_export):
    marker = tmp_path / "MARKER"
    path = _hostile(tmp_path / "resnet18.pth", load_torch(teacher_export), marker)
    opts = ["OUTPUT_DIR", tmp_path / "knn", "MODEL.WEIGHTS", path, "DATA.TRAIN_DIR", imagefolder / "train",
            "DATA.VAL_DIR", imagefolder / "val", "DATA.IMAGE_SIZE", 32, "DATA.NUM_WORKERS", 0]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_knn.py"), "--config-file",
                           str(ROOT / "configs/eval/knn_imagenet.yaml"), *map(str, opts)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and not marker.exists()
    assert path in proc.stdout + proc.stderr and "refuses to run code" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# detectron2: tools/convert_to_d2.py, the .pkl of MODEL.WEIGHTS

def _export_payload(seed=0):
    torch.manual_seed(seed)
    enc = build_encoder("resnet18", 64, 16)
    return {"state_dict": enc.backbone.state_dict(), "format": EXPORT_FORMAT, "arch": "resnet18"}


def test_convert_to_d2_cli_refuses_a_hostile_checkpoint(tmp_path):
    pytest.importorskip("detectron2")
    marker = tmp_path / "MARKER"
    path = _hostile(tmp_path / "resnet18.pth", _export_payload(), marker)
    out = tmp_path / "r18.pkl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_d2.py"), path, str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not marker.exists() and not out.exists()
    assert path in proc.stderr and "refuses to run code" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def d2_model_and_pkl(tmp_path_factory):
    """A detectron2 R-18 C4 model (VOC instant-test config) and a legitimate converted .pkl for it."""
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    import transfer.d2  # noqa: F401  (registers our ROI heads and backbones)
    from transfer.convert import convert_checkpoint, save_d2_checkpoint
    from transfer.d2.config import get_cfg

    tmp = tmp_path_factory.mktemp("d2")
    src = tmp / "resnet18.pth"
    torch.save(_export_payload(), src)
    pkl = tmp / "r18.pkl"
    save_d2_checkpoint(convert_checkpoint(str(src)), str(pkl))
    cfg = get_cfg()
    cfg.merge_from_file(str(QUICK / "voc_r18_C4_instant_test.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg), str(pkl)


def test_d2_pkl_with_an_evil_object_is_refused(d2_model_and_pkl, tmp_path):
    from transfer.d2.weights import SafeDetectionCheckpointer, check_pretrained_load

    model, pkl = d2_model_and_pkl
    marker = tmp_path / "MARKER"
    good = load_pickle(pkl)
    for evil in (Evil, EvilOpen):
        path = _hostile(tmp_path / f"{evil.__name__}.pkl", good, marker, dump="pickle", evil=evil)
        with pytest.raises(UnsafeCheckpointError) as e:
            SafeDetectionCheckpointer(model).load(path)
        _refused(e, path)
        with pytest.raises(UnsafeCheckpointError):
            check_pretrained_load(model, path, "C4")
    assert not marker.exists()
    # the legitimate file loads, every pretrained key accounted for
    report = check_pretrained_load(model, pkl, "C4")
    assert report.ok and any(k.startswith("roi_heads.res5.") for k in report.loaded)


@pytest.mark.parametrize("payload", [{"model": {}}, {"model": {}, "__author__": "someone"},
                                     {"model": {"foo.weight": np.zeros(3, np.float32)}, "__author__": "someone",
                                      "matching_heuristics": False}])
def test_d2_pkl_without_any_weight_is_an_error(d2_model_and_pkl, tmp_path, payload):
    from transfer.d2.weights import NoPretrainedWeightsError, SafeDetectionCheckpointer

    model, _ = d2_model_and_pkl
    path = tmp_path / "empty.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(NoPretrainedWeightsError) as e:
        SafeDetectionCheckpointer(model).load(str(path))
    assert str(path) in str(e.value) and 'MODEL.WEIGHTS ""' in str(e.value)


def test_d2_pth_weights_go_through_load_torch(d2_model_and_pkl, tmp_path):
    from transfer.d2.weights import SafeDetectionCheckpointer

    model, _ = d2_model_and_pkl
    marker = tmp_path / "MARKER"
    good = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, good)
    assert SafeDetectionCheckpointer(model).load(str(good)) == {"iteration": 3}
    path = _hostile(tmp_path / "evil.pth", {"model": model.state_dict()}, marker)
    with pytest.raises(UnsafeCheckpointError, match="detectron2 checkpoint"):
        SafeDetectionCheckpointer(model).load(path)
    assert not marker.exists()


def test_train_net_refuses_hostile_and_empty_pkl(tmp_path, d2_model_and_pkl):
    """tools/train_net.py with MODEL.WEIGHTS a hostile / empty .pkl: an error naming the file, nothing executed,
    nothing trained."""
    from pretrain.synthetic import write_voc

    _, pkl = d2_model_and_pkl
    root = tmp_path / "datasets"
    write_voc(root / "VOC2007", num_classes=4, trainval_images=4, test_images=2, image_size=64, seed=0)
    marker = tmp_path / "MARKER"
    evil = _hostile(tmp_path / "evil.pkl", load_pickle(pkl), marker, dump="pickle")
    empty = tmp_path / "empty.pkl"
    with open(empty, "wb") as f:
        pickle.dump({"model": {}}, f)
    for weights, expect in ((evil, "refuses to run code"), (str(empty), 'MODEL.WEIGHTS ""')):
        out = tmp_path / Path(weights).stem
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file",
                               str(QUICK / "voc_r18_C4_instant_test.yaml"), "DATASETS.SYNTHETIC_ROOT", str(root),
                               "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and weights in text and expect in text, text[-3000:]
        assert not (out / "model_final.pth").exists()
    assert not marker.exists()
