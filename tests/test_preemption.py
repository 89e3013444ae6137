"""Runs that are signalled or killed mid-training continue to the same final weights (CPU, deterministic)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 32  # 64 images / batch 8 x 4 epochs


def _cmd(out, data, teacher, *extra):
    opts = {"OUTPUT_DIR": out, "DATA.TRAIN_DIR": data / "train", "DATA.IMAGE_SIZE": 32, "DATA.NUM_WORKERS": 0,
            "SOLVER.IMS_PER_BATCH": 8, "SOLVER.EPOCHS": 4, "MODEL.MOCO.QUEUE_SIZE": 32,
            "MODEL.STUDENT.ARCH": "resnet18", "MODEL.STUDENT.HEAD.HIDDEN_DIM": 64, "MODEL.TEACHER.ARCH": "resnet18",
            "MODEL.TEACHER.WEIGHTS": teacher, "TRAIN.LOG_PERIOD": 1, "TRAIN.CHECKPOINT_PERIOD": 5,
            "TRAIN.DETERMINISTIC": True}
    return [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), *extra,
            *[str(x) for kv in opts.items() for x in kv]]


ENV = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _iters_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = [ln for ln in open(path).read().splitlines() if ln.strip()]
    return json.loads(lines[-1])["iter"] if lines else 0


def _wait_until(pred, proc, what, timeout=300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def _student(out):
    state, _ = Checkpointer(str(out)).load_latest()
    assert state["iter"] == ITERS
    return state["model"], state["optimizer"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, imagefolder, teacher_export):
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_cmd(out, imagefolder, teacher_export))
    return _student(out)


def _assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for sa, sb in zip(a[1]["state"].values(), b[1]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_checkpoints_at_next_iteration_and_resume_is_exact(tmp_path, imagefolder, teacher_export, reference,
                                                                  sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, imagefolder, teacher_export), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    _wait_until(lambda: _iters_logged(out) >= 3, proc, "iteration 3")
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-2000:]
    assert "stop requested" in log and "run again to continue" in log
    stopped = _iters_logged(out)
    assert 3 <= stopped < ITERS
    assert Checkpointer(str(out)).list()[0].endswith(f"model_{stopped:07d}.pth")  # saved where it stopped
    _run(_cmd(out, imagefolder, teacher_export, "--resume"))
    _assert_same(_student(out), reference)


def test_kill_9_then_resume_is_exact(tmp_path, imagefolder, teacher_export, reference):
    out = tmp_path / "run"
    target = random.Random(0).randint(6, 24)  # a "random" iteration, fixed for reproducibility
    proc = subprocess.Popen(_cmd(out, imagefolder, teacher_export), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    _wait_until(lambda: _iters_logged(out) >= target, proc, f"iteration {target}")
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _iters_logged(out)
    assert killed_at < ITERS
    _run(_cmd(out, imagefolder, teacher_export, "--resume"))
    _assert_same(_student(out), reference)
    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert [r["iter"] for r in recs] == list(range(1, ITERS + 1))  # redone iterations are not logged twice
