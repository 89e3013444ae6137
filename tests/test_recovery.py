"""Damaged and contested output folders (issue #10): corrupt and flipped checkpoints are moved aside and never
outrank good ones, rotation keeps what was just written, a blow-up names a checkpoint that can really be continued,
a torn metrics line is dropped, one run per folder, a changed config does not silently resume, orphaned temp files
go. Each test reproduces the failure first described in the issue."""
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import tiny_cfg
from pretrain.checkpoint import Checkpointer, CorruptCheckpointError, verify_checkpoint
from pretrain.runlock import OutputDirInUse, OutputDirLock
from pretrain.safeload import load_torch
from pretrain.trainer import Trainer


def _ckpts(out):
    return [os.path.basename(p) for p in Checkpointer(str(out)).list()]


def _flip_a_tensor_byte(path):
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(open(path, "rb").read())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _hold_lock(out, what):
    """Another process holding ``out``'s lock (as another run would), until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pretrain.runlock import OutputDirLock; OutputDirLock(sys.argv[2], sys.argv[3])"
                               ".acquire(); print('held', flush=True); time.sleep(600)",
                               os.path.dirname(os.path.dirname(os.path.abspath(__file__))), str(out), what],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _cfg(out, data, **kw):
    return tiny_cfg(out, data, **{"SOLVER.EPOCHS": 1, "TRAIN.CHECKPOINT_PERIOD": 2, **kw})


def test_flipped_bytes_are_detected_and_the_checkpoint_moved_aside(tmp_path, imagefolder):
    out = tmp_path / "run"
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 4})).run()
    newest = Checkpointer(str(out)).list()[0]
    verify_checkpoint(newest)
    _flip_a_tensor_byte(newest)
    load_torch(newest)  # what the issue saw: torch alone loads it silently
    with pytest.raises(CorruptCheckpointError, match="model_0000004.pth"):
        verify_checkpoint(newest)
    t = Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 4}))
    t.setup()
    t.resume_or_start()
    assert t.iter == 2  # fell back to the previous one
    assert os.path.exists(newest + ".corrupt") and _ckpts(out) == ["model_0000002.pth"]
    t.lock.release()


def test_all_unreadable_then_progress_is_kept(tmp_path, imagefolder):
    """Issue: with every checkpoint unreadable, rotation deleted each new good checkpoint while the corrupt
    higher-numbered ones stayed, so "run again to continue" looped forever."""
    out = tmp_path / "run"
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 6, "TRAIN.MAX_TO_KEEP": 2})).run()
    assert _ckpts(out) == ["model_0000006.pth", "model_0000004.pth"]
    for p in Checkpointer(str(out)).list():
        open(p, "wb").write(b"garbage")
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 2, "TRAIN.MAX_TO_KEEP": 2})).run()  # from 0 to 2
    assert _ckpts(out) == ["model_0000002.pth"]
    t = Trainer(_cfg(out, imagefolder, **{"TRAIN.MAX_TO_KEEP": 2}))
    t.run()  # continues from 2, not from 0
    assert t.iter == 8 and _ckpts(out) == ["model_0000008.pth", "model_0000006.pth"]
    assert sorted(f for f in os.listdir(out / "checkpoints") if f.endswith(".corrupt")) == [
        "model_0000004.pth.corrupt", "model_0000006.pth.corrupt"]
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in recs if "loss" in r] == list(range(1, 9))


def test_rotation_never_deletes_what_was_just_written(tmp_path):
    ck = Checkpointer(str(tmp_path), max_to_keep=1)
    for it in (10, 20):
        ck.save({"iter": it}, it)
    path = ck.save({"iter": 5}, 5)  # a run continuing from an older point
    assert os.path.exists(path) and ck.list() == [path]  # the newer ones are moved aside, not outranking it
    assert sorted(os.listdir(ck.dir)) == ["model_0000005.pth", "model_0000020.pth.superseded"]
    with pytest.raises(ValueError, match="MAX_TO_KEEP"):
        Checkpointer(str(tmp_path), max_to_keep=0)


def test_blow_up_names_a_checkpoint_that_continues(tmp_path, imagefolder):
    """Issue: with SOLVER.BASE_LR 1e30 the named "last good" checkpoint held the blown-up weights (max |w| 7.9e29),
    and continuing from it with a sane lr failed the same way."""
    out = tmp_path / "run"
    Trainer(_cfg(out, imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 1, "TRAIN.STOP_AT_ITER": 3})).run()
    with pytest.raises(FloatingPointError) as err:
        Trainer(_cfg(out, imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 1, "SOLVER.BASE_LR": 1e30,
                                          "TRAIN.RESUME_CHANGED_CONFIG": True})).run()
    msg = str(err.value)
    assert "model_0000003.pth" in msg and "SOLVER.BASE_LR" in msg and "TRAIN.RESUME_CHANGED_CONFIG True" in msg
    assert _ckpts(out)[0] == "model_0000003.pth"  # the diverged ones are out of the way
    assert any(f.endswith(".nonfinite") for f in os.listdir(out / "checkpoints"))
    # the advice works as written: a sane lr and the override continue from it to the end, with finite losses
    t = Trainer(_cfg(out, imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 1, "TRAIN.RESUME_CHANGED_CONFIG": True}))
    t.run()
    assert t.iter == 8
    changes = [json.loads(x) for x in open(out / "config_changes.jsonl")]
    assert changes[0]["iter"] == 3 and changes[0]["changes"]["SOLVER.BASE_LR"] == ["0.3", "1e+30"]
    assert changes[-1]["iter"] == 3 and "SOLVER.BASE_LR" not in changes[-1]["changes"]  # back to model_3's lr


def test_blow_up_from_the_start_leaves_nothing_to_resume(tmp_path, imagefolder):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="the run starts over"):
        Trainer(_cfg(out, imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 1, "SOLVER.BASE_LR": 1e30})).run()
    assert _ckpts(out) == []
    t = Trainer(_cfg(out, imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 1}))  # the advice: rerun with a sane lr
    t.run()
    assert t.iter == 8


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, imagefolder):
    out = tmp_path / "run"
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 2})).run()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "epoch": 0, "lo')  # killed mid-write
    Trainer(_cfg(out, imagefolder)).run()
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in recs] == list(range(1, 9))
    assert "torn last line" in (out / "log.txt").read_text()


def test_changed_config_does_not_silently_resume(tmp_path, imagefolder):
    out = tmp_path / "run"
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 2})).run()
    before = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"SOLVER.BASE_LR: 0.3 in the checkpoint, 0.5 now") as err:
        Trainer(_cfg(out, imagefolder, **{"SOLVER.BASE_LR": 0.5})).run()
    assert "new OUTPUT_DIR" in str(err.value) and "TRAIN.RESUME_CHANGED_CONFIG True" in str(err.value)
    assert (out / "config.yaml").read_text() == before  # config.yaml still describes what ran
    # keys that only change how the run is watched may differ; they are recorded
    Trainer(_cfg(out, imagefolder, **{"TRAIN.LOG_PERIOD": 2, "TRAIN.STOP_AT_ITER": 4})).run()
    rec = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])
    assert rec["iter"] == 2 and rec["changes"]["TRAIN.LOG_PERIOD"] == ["1", "2"]
    assert "LOG_PERIOD: 2" in (out / "config.yaml").read_text()


def test_one_run_per_output_folder(tmp_path, imagefolder):
    out = tmp_path / "run"
    os.makedirs(out)
    holder = _hold_lock(out, "pretraining")
    try:
        t0 = time.time()
        with pytest.raises(OutputDirInUse, match=rf"pid {holder.pid}"):
            Trainer(_cfg(out, imagefolder)).run()
        assert time.time() - t0 < 60 and not os.path.exists(out / "metrics.jsonl")
    finally:
        holder.kill()  # a holder that dies leaves a stale lock file: the next run takes it
        holder.wait()
    t = Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 1}))
    t.run()
    assert t.iter == 1
    with OutputDirLock(str(out)):  # released at the end of the run
        pass


def test_orphaned_temp_files_are_removed_at_start(tmp_path, imagefolder):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "export").mkdir()
    for p in (out / "checkpoints" / "model_0000004.pth.tmp.12345", out / "export" / "resnet18.pth.tmp.999"):
        p.write_bytes(b"half a file")
    Trainer(_cfg(out, imagefolder, **{"TRAIN.STOP_AT_ITER": 1})).run()
    assert not [f for d in ("checkpoints", "export") for f in os.listdir(out / d) if ".tmp." in f]


def test_evaluators_take_the_same_lock(tmp_path, imagefolder):
    from transfer.common import end_run, start_run
    from transfer.config import setup_eval_cfg

    out = tmp_path / "eval"
    cfg = setup_eval_cfg("", ["OUTPUT_DIR", str(out), "DATA.TRAIN_DIR", str(imagefolder / "train"), "DATA.VAL_DIR",
                              str(imagefolder / "val")])
    os.makedirs(out)
    holder = _hold_lock(out, "detection")
    try:
        with pytest.raises(OutputDirInUse, match=r"what detection.*pid"):
            start_run(cfg, "linear evaluation")
    finally:
        holder.kill()
        holder.wait()
    start_run(cfg, "linear evaluation")
    assert json.loads((out / ".lock").read_text())["what"] == "linear evaluation"
    end_run(cfg)
