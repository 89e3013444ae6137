import os

import pytest
import torch

# Two cores: keep intra-op threads at the core count and never oversubscribe with DataLoader workers in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, 2 OpenMP threads run tiny models many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    """A small synthetic ImageNet-layout dataset (4 classes, 16 train + 4 val images each, 32 px)."""
    from pretrain.synthetic import write_imagefolder

    root = tmp_path_factory.mktemp("data") / "shapes"
    write_imagefolder(str(root), num_classes=4, train_per_class=16, val_per_class=4, image_size=32, seed=0)
    return root


def tiny_cfg(output_dir, data_root, teacher_weights="", **overrides):
    """A quickstart-sized config: resnet18 student at 32 px, batch 8, 2 epochs, no workers."""
    from pretrain.config import setup_cfg

    opts = {
        "OUTPUT_DIR": str(output_dir), "DATA.TRAIN_DIR": str(data_root / "train"), "DATA.VAL_DIR": "",
        "DATA.IMAGE_SIZE": 32, "DATA.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 8, "SOLVER.EPOCHS": 2,
        "MODEL.MOCO.QUEUE_SIZE": 32, "MODEL.STUDENT.ARCH": "resnet18", "MODEL.STUDENT.HEAD.HIDDEN_DIM": 64,
        "TRAIN.LOG_PERIOD": 1, "TRAIN.DETERMINISTIC": True, "SOLVER.BASE_LR": 0.3,
        "METHOD.DISTILLERS": "['disco']" if teacher_weights else "[]", "MODEL.TEACHER.ARCH": "resnet18",
        "MODEL.TEACHER.WEIGHTS": str(teacher_weights), "TEST.KNN.IMAGE_SIZE": 32,
    }
    opts.update(overrides)
    return setup_cfg("", [x for kv in opts.items() for x in (kv[0], str(kv[1]))])


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory):
    """A resnet18 'teacher' in our export format (random weights, a MoCo-v2 head 512 -> 64 -> 128)."""
    from pretrain.export import export_encoder
    from pretrain.encoder import build_encoder

    torch.manual_seed(123)
    enc = build_encoder("resnet18", 64, 128)
    out = tmp_path_factory.mktemp("teacher")
    return export_encoder(enc, "resnet18", str(out), "resnet18", {"method": "moco"})["backbone"]


def load_tool(name: str):
    """tools/<name>.py as a module (its __main__ block does not run): its functions, without a subprocess."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def iters_logged(out) -> int:
    """The last iteration ``out``/metrics.jsonl has a loss record for (0 when none)."""
    import json

    path = os.path.join(out, "metrics.jsonl")
    lines = [ln for ln in open(path).read().splitlines() if '"loss"' in ln] if os.path.exists(path) else []
    return json.loads(lines[-1])["iter"] if lines else 0


def kill_9_at(cmd, out, target: int, env=None) -> None:
    """Start ``cmd`` (a pretraining run writing to ``out``), SIGKILL it once iteration ``target`` is logged, and check
    it died by the signal before finishing."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while iters_logged(out) < target:
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended (or hung) before the kill"
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def assert_bitwise_equal(a, b, path=""):
    """Tensors (nested in dicts / lists) equal bit for bit; ``path`` names the first that differs."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
