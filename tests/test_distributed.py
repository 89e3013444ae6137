"""Two gloo processes on the CPU through tools/pretrain.py --num-gpus 2 (env:// init, DDP, shuffle-BN, gathered
queue updates)."""
import os
import subprocess
import sys

from pretrain.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_run_completes_and_ranks_agree(tmp_path, imagefolder, teacher_export):
    out = tmp_path / "ddp"
    opts = ["OUTPUT_DIR", str(out), "DATA.TRAIN_DIR", str(imagefolder / "train"), "DATA.IMAGE_SIZE", "32",
            "DATA.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.EPOCHS", "1", "MODEL.MOCO.QUEUE_SIZE", "64",
            "MODEL.STUDENT.ARCH", "resnet18", "MODEL.STUDENT.HEAD.HIDDEN_DIM", "64", "MODEL.TEACHER.ARCH", "resnet18",
            "MODEL.TEACHER.WEIGHTS", str(teacher_export), "TRAIN.LOG_PERIOD", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), "--num-gpus", "2", *opts],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes x 8" in proc.stdout
    state, _ = Checkpointer(str(out)).load_latest()
    assert state["iter"] == 4  # 64 images / global batch 16
    # the queue holds the keys of both processes: 4 iterations x 16 keys fill all 64 slots, pointer back at 0
    assert int(state["model"]["testbed.queue_ptr"]) == 0
    assert os.path.isfile(out / "export" / "resnet18.pth")
    # DDP kept the replicas identical: both ranks log the same checksum of their final student parameters
    sums = []
    for log in ("log.txt", "log.rank1.txt"):
        line = [x for x in open(out / log) if "student parameter checksum" in x][-1]
        sums.append(line.rsplit(" ", 1)[1].strip())
    assert sums[0] == sums[1]
    params = dict(build_model_params(state))
    assert float(sums[0]) == sum(v.double().sum().item() for v in params.values())


def build_model_params(state):
    """The saved student's parameters (state dict entries that are parameters, not buffers), in module order."""
    from pretrain.encoder import build_encoder

    enc = build_encoder("resnet18", 64, 128)
    names = [n for n, _ in enc.named_parameters()]
    return [(n, state["model"][f"student.{n}"]) for n in names]
