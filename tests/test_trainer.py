"""End-to-end pretraining on a tiny synthetic ImageFolder (CPU, 32 px)."""
import json
import os

import pytest
import timm
import torch

from conftest import assert_bitwise_equal, tiny_cfg
from pretrain.checkpoint import Checkpointer
from pretrain.model import Method
from pretrain.safeload import load_torch
from pretrain.trainer import Trainer


def _final_state(output_dir):
    state, _ = Checkpointer(str(output_dir)).load_latest()
    return state


def test_stopped_and_resumed_run_is_bitwise_equal(tmp_path, imagefolder, teacher_export):
    # 64 images / batch 8 = 8 iterations per epoch, 2 epochs; the stop falls mid-epoch.
    full = Trainer(tiny_cfg(tmp_path / "full", imagefolder, teacher_export))
    exports = full.run()
    part_cfg = tiny_cfg(tmp_path / "part", imagefolder, teacher_export, **{"TRAIN.STOP_AT_ITER": 11})
    assert Trainer(part_cfg).run() is None
    assert [os.path.basename(p) for p in Checkpointer(str(tmp_path / "part")).list()][0] == "model_0000011.pth"
    resumed = Trainer(tiny_cfg(tmp_path / "part", imagefolder, teacher_export), require_checkpoint=True)
    resumed.run()
    assert resumed.iter == full.iter == 16
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    for key in ("model", "optimizer", "scheduler", "teacher_buffers", "iter"):
        assert_bitwise_equal(a[key], b[key], key)
    # metrics.jsonl of the resumed run has each iteration once, with the required fields
    recs = [json.loads(x) for x in open(tmp_path / "part" / "metrics.jsonl") if '"loss"' in x]  # not teacher health
    iters = [r["iter"] for r in recs if "loss" in r]
    assert iters == list(range(1, 17))
    assert {"iter", "lr", "loss", "loss_disco", "loss_mocov2"} <= set(recs[0])
    assert all(r["loss_disco"] > 0 and r["loss_mocov2"] > 0 for r in recs)
    # the export loads strictly in timm and reproduces the student backbone
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, checkpoint_path=exports["backbone"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), full.model.student.backbone.eval()(x))
    meta = torch.load(exports["backbone"], weights_only=True)
    assert meta["teacher"]["weights"] == str(teacher_export) and meta["epoch"] == 2 and "DISCO" in meta["config"]
    assert meta["method"] == "mocov2 + disco"
    assert os.path.isfile(tmp_path / "full" / "config.yaml")


def test_teacher_unchanged_and_queue_not_overwritten(tmp_path, imagefolder, teacher_export):
    cfg = tiny_cfg(tmp_path / "run", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1, "TRAIN.STOP_AT_ITER": 3})
    t = Trainer(cfg)
    t.run()
    before = {k: v.clone() for k, v in t.model.teacher.state_dict().items()}
    resumed = Trainer(tiny_cfg(tmp_path / "run", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1}))
    resumed.setup()
    resumed.resume_or_start()
    saved = _final_state(tmp_path / "run")["model"]
    assert torch.equal(resumed.model.testbed.queue, saved["testbed.queue"])  # the resumed queue, not the teacher's
    assert int(resumed.model.testbed.queue_ptr) == int(saved["testbed.queue_ptr"]) == (3 * 8) % 32
    for k, v in resumed.model.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def _moco_teacher(path, queue_size=32, ptr=5):
    """A resnet18 teacher in the official MoCo-v2 .pth.tar layout, with its queue (128 x K) and pointer."""
    from pretrain.encoder import build_encoder

    torch.manual_seed(7)
    enc = build_encoder("resnet18", 64, 128)
    sd = {f"module.encoder_q.{k}": v for k, v in enc.backbone.state_dict().items()}
    sd.update({f"module.encoder_q.fc.{k}": v for k, v in enc.head.state_dict().items()})
    sd.update({k.replace("encoder_q", "encoder_k"): v for k, v in list(sd.items())})
    sd["module.queue"] = torch.nn.functional.normalize(torch.randn(128, queue_size), dim=0)
    sd["module.queue_ptr"] = torch.tensor([ptr])
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, path)
    return sd["module.queue"]


def test_copy_queue_from_teacher_at_start_never_on_resume(tmp_path, imagefolder, teacher_export, caplog):
    """MODEL.TEACHER.COPY_QUEUE (the official code): the student's queue and pointer start as the teacher
    checkpoint's; a resumed run keeps its own queue (the official code overwrote it); bad inputs are named."""
    teacher = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    tq = _moco_teacher(teacher)
    opts = {"SOLVER.EPOCHS": 1, "MODEL.TEACHER.COPY_QUEUE": True}
    t = Trainer(tiny_cfg(tmp_path / "run", imagefolder, teacher, **opts, **{"TRAIN.STOP_AT_ITER": 3}))
    t.setup()
    assert torch.equal(t.model.testbed.queue, tq) and int(t.model.testbed.queue_ptr) == 5
    t.run()
    saved = _final_state(tmp_path / "run")["model"]
    assert int(saved["testbed.queue_ptr"]) == (5 + 3 * 8) % 32
    assert torch.equal(saved["testbed.queue"][:, :5], tq[:, :5])  # the teacher's entries not yet replaced
    assert not torch.equal(saved["testbed.queue"][:, 5:29], tq[:, 5:29])  # the student's keys
    resumed = Trainer(tiny_cfg(tmp_path / "run", imagefolder, teacher, **opts))
    resumed.setup()
    resumed.resume_or_start()
    assert torch.equal(resumed.model.testbed.queue, saved["testbed.queue"])
    assert int(resumed.model.testbed.queue_ptr) == 29
    # a queue of another size: an error naming the key to change
    with pytest.raises(ValueError, match=r"MODEL.MOCO.QUEUE_SIZE 32 .*COPY_QUEUE False"):
        Trainer(tiny_cfg(tmp_path / "k64", imagefolder, teacher, **opts, **{"MODEL.MOCO.QUEUE_SIZE": 64})).setup()
    # a teacher file without a queue (our export): the queue stays random, with a warning saying what to pass
    caplog.set_level("WARNING")
    plain = Trainer(tiny_cfg(tmp_path / "export", imagefolder, teacher_export, **opts))
    plain.setup()
    assert "has no MoCo queue" in caplog.text and "model_final.pth" in caplog.text
    assert not torch.equal(plain.model.testbed.queue, tq)
    # our own pretraining checkpoint carries its queue too
    from pretrain.formats import read_backbone
    ck = read_backbone(str(Checkpointer(str(tmp_path / "run")).list()[-1]))
    assert torch.equal(ck.queue["queue"], saved["testbed.queue"]) and int(ck.queue["queue_ptr"]) == 29


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, imagefolder, monkeypatch):
    real = Method.losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(Method, "losses", poisoned)
    cfg = tiny_cfg(tmp_path / "run", imagefolder, **{"TRAIN.CHECKPOINT_PERIOD": 2})
    with pytest.raises(FloatingPointError, match=r"iteration 4.*model_0000002\.pth"):
        Trainer(cfg).run()
    assert [os.path.basename(p) for p in Checkpointer(str(tmp_path / "run")).list()] == ["model_0000002.pth"]
    assert _final_state(tmp_path / "run")["iter"] == 2


def test_knn_monitor_and_eval_only(tmp_path, imagefolder):
    cfg = tiny_cfg(tmp_path / "run", imagefolder, **{"DATA.VAL_DIR": str(imagefolder / "val"), "SOLVER.EPOCHS": 1})
    Trainer(cfg).run()
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    knn = [r for r in recs if "knn_top1" in r]
    assert len(knn) == 1 and 0 <= knn[0]["knn_top1"] <= 100
    acc = Trainer(cfg).evaluate()
    assert acc["top1"] == pytest.approx(knn[0]["knn_top1"])


def test_corrupt_image_skipped_and_counted(tmp_path, imagefolder):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(imagefolder / "train", data / "train")
    victim = sorted((data / "train").rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated JPEG
    cfg = tiny_cfg(tmp_path / "strict", data, **{"SOLVER.EPOCHS": 1})
    with pytest.raises(RuntimeError, match=str(victim.name)):
        Trainer(cfg).run()
    cfg = tiny_cfg(tmp_path / "skip", data, **{"SOLVER.EPOCHS": 1, "DATA.SKIP_CORRUPT": True})
    Trainer(cfg).run()
    recs = [json.loads(x) for x in open(tmp_path / "skip" / "metrics.jsonl") if "loss" in x]
    assert recs[-1]["skipped_images"] == 1


def test_export_from_checkpoint_cli(tmp_path, imagefolder):
    import subprocess
    import sys

    cfg = tiny_cfg(tmp_path / "run", imagefolder, **{"SOLVER.EPOCHS": 1, "TRAIN.STOP_AT_ITER": 2})
    t = Trainer(cfg)
    t.run()
    ckpt = Checkpointer(str(tmp_path / "run")).list()[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "export.py"), ckpt, str(tmp_path / "exp")],
                         check=True, capture_output=True, text=True).stdout
    assert "backbone" in out
    model = timm.create_model("resnet18", pretrained=False, num_classes=0,
                              checkpoint_path=str(tmp_path / "exp" / "resnet18.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), t.model.student.backbone.eval()(x))
    assert torch.load(tmp_path / "exp" / "resnet18.pth", weights_only=True)["iteration"] == 2


def test_checkpoint_of_an_earlier_version_resumes(tmp_path, imagefolder, teacher_export):
    """A checkpoint written before methods were plug-ins (MoCo's ``student``: encoder_q / encoder_k / queue) resumes
    into the mocov2 testbed and ends bitwise where an uninterrupted run ends."""
    full = Trainer(tiny_cfg(tmp_path / "full", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1}))
    full.run()
    part = tiny_cfg(tmp_path / "old", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1, "TRAIN.STOP_AT_ITER": 3})
    Trainer(part).run()
    path = Checkpointer(str(tmp_path / "old")).list()[0]
    state = load_torch(path)
    model = state.pop("model")
    del state["format"]
    state["student"] = {("encoder_q." + k[len("student."):]) if k.startswith("student.") else k[len("testbed."):]: v
                        for k, v in model.items()}
    assert {"encoder_k.backbone.conv1.weight", "queue", "queue_ptr", "encoder_q.head.0.weight"} <= set(state["student"])
    torch.save(state, path)
    Trainer(tiny_cfg(tmp_path / "old", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1})).run()
    assert_bitwise_equal(_final_state(tmp_path / "full")["model"], _final_state(tmp_path / "old")["model"])
