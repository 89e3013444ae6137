"""Linear evaluation: the CLI end to end, a frozen backbone that stays bitwise unchanged, resume, --eval-only, strict
loading, official MoCo checkpoints and every student architecture."""
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import pretrain.runlog as runlog
from pretrain.export import export_encoder
from pretrain.formats import read_backbone
from pretrain.encoder import build_encoder
from transfer.common import EpochSampler, changed_keys, frozen_state, load_backbone
from transfer.config import setup_eval_cfg
from transfer.linear import LinearEvaluator, lr_factor, summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# teachers; resnet50 stays in (paper Figure 8)
TEACHERS_ONLY = {"resnet101", "resnet152", "resnet50x2", "vit_small_patch16_224", "xcit_small_12_p16_224"}


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_opts(out, data, weights, **over):
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": weights, "DATA.TRAIN_DIR": data / "train",
            "DATA.VAL_DIR": data / "val", "DATA.IMAGE_SIZE": 32, "DATA.VAL_RESIZE": 36, "DATA.NUM_WORKERS": 0,
            "SOLVER.EPOCHS": 2, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.5, "TEST.IMS_PER_BATCH": 32}
    opts.update(over)
    return [str(x) for kv in opts.items() for x in kv]


def cfg_of(*args, **kw):
    return setup_eval_cfg("", linear_opts(*args, **kw))


def _cli(args, cwd=ROOT):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_linear.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_cli_trains_evaluates_and_eval_only_reloads(tmp_path, imagefolder, teacher_export):
    out = tmp_path / "lin"
    stdout = _cli(["--config-file", os.path.join(ROOT, "configs/eval/linear_imagenet_resnet.yaml"),
                   *linear_opts(out, imagefolder, teacher_export)])
    res = json.loads((out / "results.json").read_text())
    assert res["eval"] == "linear" and res["arch"] == "resnet18" and res["checkpoint_format"] == "export"
    assert res["epochs"] == 2 and res["train_images"] == 64 and res["val_images"] == 16 and res["num_classes"] == 4
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["top5"] == 100  # 4 classes: top-5 covers all
    summary = [line for line in stdout.splitlines() if line.startswith("linear resnet18 shapes:")]
    assert summary == [summary_line(res)]
    assert (out / "config.yaml").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(r["lr"] == 0.5 for r in lines)

    # --eval-only: the saved classifier, evaluated again without training, gives the same numbers
    (out / "results.json").unlink()
    stdout = _cli(["--config-file", os.path.join(ROOT, "configs/eval/linear_imagenet_resnet.yaml"), "--eval-only",
                   *linear_opts(out, imagefolder, teacher_export)])
    again = json.loads((out / "results.json").read_text())
    assert (again["top1"], again["top5"], again["epochs"]) == (res["top1"], res["top5"], 2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # nothing trained


def test_eval_only_without_a_classifier_is_an_error(tmp_path, imagefolder, teacher_export):
    with pytest.raises(FileNotFoundError, match="no readable classifier checkpoint"):
        LinearEvaluator(cfg_of(tmp_path, imagefolder, teacher_export)).eval_only()


def test_backbone_frozen_bitwise_and_classifier_learns(tmp_path, imagefolder):
    # non-trivial BN statistics: a train-mode BN would move them at the first batch
    torch.manual_seed(3)
    enc = build_encoder("resnet18", 32, 16)
    with torch.no_grad():
        for m in enc.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = export_encoder(enc, "resnet18", str(tmp_path / "exp"), "resnet18", {"method": "disco"})["backbone"]
    ev = LinearEvaluator(cfg_of(tmp_path / "out", imagefolder, path))
    ev.setup()
    before, clf_before = frozen_state(ev.backbone), frozen_state(ev.classifier)
    ev.resume_or_start()
    for _ in range(2):
        ev.train_epoch()
    assert changed_keys(before, frozen_state(ev.backbone)) == []
    assert changed_keys(read_backbone(path).state_dict, frozen_state(ev.backbone)) == []
    assert changed_keys(clf_before, frozen_state(ev.classifier)) == ["bias", "weight"]
    assert not any(p.requires_grad for p in ev.backbone.parameters()) and not ev.backbone.training
    assert clf_before["bias"].abs().sum() == 0 and 0.005 < clf_before["weight"].std() < 0.015  # MoCo's init


def test_resume_after_interruption_equals_uninterrupted(tmp_path, imagefolder, teacher_export):
    over = {"SOLVER.EPOCHS": 3, "SOLVER.STEPS": "(1, 2)"}  # lr changes at every epoch: the scheduler must resume
    full = LinearEvaluator(cfg_of(tmp_path / "full", imagefolder, teacher_export, **over)).run()
    first = LinearEvaluator(cfg_of(tmp_path / "cut", imagefolder, teacher_export, **over,
                                   **{"SOLVER.STOP_AT_EPOCH": 1})).run()
    assert first is None and not (tmp_path / "cut" / "results.json").exists()
    resumed = LinearEvaluator(cfg_of(tmp_path / "cut", imagefolder, teacher_export, **over)).run()
    assert (resumed["top1"], resumed["top5"], resumed["epochs"]) == (full["top1"], full["top5"], 3)
    a = torch.load(tmp_path / "full/checkpoints/model_0000003.pth", weights_only=False)
    b = torch.load(tmp_path / "cut/checkpoints/model_0000003.pth", weights_only=False)
    for k in a["classifier"]:
        assert torch.equal(a["classifier"][k], b["classifier"][k]), k
    assert [json.loads(x)["lr"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([0.5, 0.05, 0.005])


def test_resume_with_another_lr_is_refused_unless_asked(tmp_path, imagefolder, teacher_export):
    """A finished classifier is not silently reported again under another config (it was, with a lower lr): the
    error names the key and both values; SOLVER.RESUME_CHANGED_CONFIG continues and records the change; keys that
    only change how the run is watched (TEST.*, workers) or what it is evaluated on (DATA.VAL_DIR) resume freely."""
    out = tmp_path / "probe"
    done = LinearEvaluator(cfg_of(out, imagefolder, teacher_export)).run()
    again = LinearEvaluator(cfg_of(out, imagefolder, teacher_export, **{"TEST.IMS_PER_BATCH": 8})).run()
    assert again["top1"] == done["top1"]
    other_split = LinearEvaluator(cfg_of(out, imagefolder, teacher_export,
                                         **{"DATA.VAL_DIR": imagefolder / "train"})).run()  # a new report
    assert other_split["epochs"] == done["epochs"]
    with pytest.raises(ValueError, match=r"SOLVER.BASE_LR: 0.5 in the checkpoint, 0.05 now(.|\n)*"
                                         r"SOLVER.RESUME_CHANGED_CONFIG True"):
        LinearEvaluator(cfg_of(out, imagefolder, teacher_export, **{"SOLVER.BASE_LR": 0.05})).run()
    LinearEvaluator(cfg_of(out, imagefolder, teacher_export, **{"SOLVER.BASE_LR": 0.05,
                                                                 "SOLVER.RESUME_CHANGED_CONFIG": True})).run()
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changes"]["SOLVER.BASE_LR"] == ["0.5", "0.05"]


def test_strict_loading_names_missing_keys(tmp_path, teacher_export):
    ckpt = torch.load(teacher_export, weights_only=False)
    del ckpt["state_dict"]["layer4.1.bn2.running_var"]
    broken = tmp_path / "broken.pth"
    torch.save(ckpt, broken)
    with pytest.raises(KeyError, match=r"missing keys \(1\): \['layer4.1.bn2.running_var'\]"):
        load_backbone(str(broken))
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS"):
        load_backbone(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        load_backbone("")


def test_official_moco_checkpoint(tmp_path):
    torch.manual_seed(5)
    enc = build_encoder("resnet18", 64, 16).eval()
    sd = {f"module.encoder_q.{k}": v for k, v in enc.backbone.state_dict().items()}
    sd.update({f"module.encoder_q.fc.{k}": v for k, v in enc.head.state_dict().items()})
    sd.update({k.replace("encoder_q", "encoder_k"): v + 1 for k, v in sd.items()})
    sd.update({"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    backbone, info = load_backbone(str(path), "resnet18")
    assert info["format"] == "moco" and "module.queue" in info["skipped"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), enc.backbone(x))


@pytest.mark.parametrize("arch", [a for a in __import__("pretrain.backbones", fromlist=["BACKBONES"]).BACKBONES
                                  if a not in TEACHERS_ONLY])
def test_every_student_architecture(tmp_path, imagefolder, arch):
    torch.manual_seed(0)
    path = export_encoder(build_encoder(arch, 32, 16), arch, str(tmp_path), arch, {"method": "disco"})["backbone"]
    res = LinearEvaluator(cfg_of(tmp_path / "out", imagefolder, path, **{
        "SOLVER.EPOCHS": 1, "SOLVER.IMS_PER_BATCH": 32, "DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True,
        "DATA.VAL_RESIZE": 32})).run()
    assert res["arch"] == arch and 0 <= res["top1"] <= 100 and res["val_images"] == 16


def test_schedules_and_sampler():
    cfg = setup_eval_cfg("", [])
    assert [lr_factor(cfg, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = setup_eval_cfg("", ["SOLVER.SCHEDULER", "cosine"])
    assert lr_factor(cos, 0) == 1 and lr_factor(cos, 50) == pytest.approx(0.5) and lr_factor(cos, 99) < 0.001
    # two processes together cover the epoch exactly once (plus wrap-around padding) with equal shares
    a, b = EpochSampler(7, 0, 2, seed=1), EpochSampler(7, 1, 2, seed=1)
    assert len(a.indices()) == len(b.indices()) == 4 and set(a.indices() + b.indices()) == set(range(7))
    one = EpochSampler(7, seed=1)
    assert sorted(one.indices()) == list(range(7))
    one.set_epoch(1)
    assert one.indices() != EpochSampler(7, seed=1).indices()
    with pytest.raises(ValueError, match="CACHE_FEATURES needs DATA.TRAIN_AUGMENT False"):
        setup_eval_cfg("", ["SOLVER.CACHE_FEATURES", "True"])


@pytest.mark.parametrize("cached", [False, True])
def test_two_processes_train_the_same_classifier_as_one(tmp_path, imagefolder, teacher_export, cached):
    """--num-gpus 2 (gloo on CPU): each process takes every other sample of each global batch and DDP averages the
    gradients, so the global batches, and hence the classifier, are those of a single process. Cached: the two
    processes extract interleaved halves of the features and all-gather them back into dataset order."""
    over = {"DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True} if cached else {}
    runs = {1: LinearEvaluator(cfg_of(tmp_path / "p1", imagefolder, teacher_export, **over)).run()}
    _cli(["--num-gpus", "2", *linear_opts(tmp_path / "p2", imagefolder, teacher_export, **over)])
    runs[2] = json.loads((tmp_path / "p2/results.json").read_text())
    for n in (1, 2):
        runs[n]["clf"] = torch.load(tmp_path / f"p{n}/checkpoints/model_0000002.pth", weights_only=False)["classifier"]
    assert runs[2]["val_images"] == runs[1]["val_images"] == 16  # every image evaluated once, none padded
    assert abs(runs[2]["top1"] - runs[1]["top1"]) <= 100 / 16 + 1e-6
    for k in runs[1]["clf"]:
        torch.testing.assert_close(runs[2]["clf"][k], runs[1]["clf"][k], rtol=1e-4, atol=1e-5)


CACHED = {"DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True, "DATA.VAL_RESIZE": 32}


def test_progress_bars_and_a_log_line_per_epoch(tmp_path, imagefolder, teacher_export, capsys, caplog, monkeypatch):
    """Feature extraction, every epoch (running loss and lr in the postfix) and the evaluation show a tqdm bar on
    stderr; each epoch also logs its line. The bars are shown from the start here (the run is seconds long)."""
    monkeypatch.setattr(runlog, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(runlog, "PROGRESS_INTERVAL_S", (0.0, 0.0))
    with caplog.at_level(logging.INFO, logger="transfer"):
        LinearEvaluator(cfg_of(tmp_path, imagefolder, teacher_export, **CACHED, **{"SOLVER.BASE_LR": 0.02})).run()
    err = capsys.readouterr().err
    eta = r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+"
    assert re.search(rf"train features: 100%\|.*\| 64/64 {eta}img/s\]", err), err
    assert re.search(rf"val features: 100%\|.*\| 16/16 {eta}img/s\]", err), err
    for epoch in (1, 2):  # 64 images / batch 16; the running mean loss of a healthy probe stays near ln(4)
        assert re.search(rf"epoch {epoch}/2: +100%\|.*\| 4/4 {eta}batch/s, loss=1\.\d+, lr=0\.02\]", err), err
    assert re.search(rf"evaluate: 100%\|.*\| 16/16 {eta}img/s\]", err), err
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [m.split(":")[0] for m in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.fullmatch(r"epoch \d/2: lr 0\.02 loss 1\.\d{4} train top-1 \d+\.\d\d", m) for m in epochs), epochs


def _exploded(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and
            r.getMessage().startswith("training loss exploded")]


def test_exploding_loss_is_warned_once_and_recorded(tmp_path, imagefolder, teacher_export, caplog):
    """lr 30 (the paper's, for ResNets) on 64 tiny images: the mean loss reaches ~1000 x ln(4) in the first epoch.
    One warning for the run, also after a resume (it is kept in the checkpoint), listed in results.json."""
    over = {**CACHED, "SOLVER.BASE_LR": 30, "SOLVER.EPOCHS": 3}
    with caplog.at_level(logging.INFO, logger="transfer"):
        assert LinearEvaluator(cfg_of(tmp_path, imagefolder, teacher_export, **over,
                                      **{"SOLVER.STOP_AT_EPOCH": 1})).run() is None
    (first,) = _exploded(caplog)
    msg = first.getMessage()
    assert "the mean loss of epoch 1 is" in msg and "more than 10 x ln(4) = 13.9" in msg
    assert "Lower SOLVER.BASE_LR (now 30): try SOLVER.BASE_LR 3," in msg
    assert "assumes ImageNet-scale training on BatchNorm-normalised features" in msg
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer"):
        res = LinearEvaluator(cfg_of(tmp_path, imagefolder, teacher_export, **over)).run()  # resumes at epoch 1
    assert _exploded(caplog) == [] and res["epochs"] == 3
    assert res["warnings"] == [msg] == json.loads((tmp_path / "results.json").read_text())["warnings"]
    reminders = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert reminders == [f"this run's results come with a warning (results.json 'warnings'): {msg}"]


def test_healthy_loss_is_not_warned_and_non_finite_loss_is_an_error(tmp_path, imagefolder, teacher_export, caplog):
    with caplog.at_level(logging.INFO, logger="transfer"):
        res = LinearEvaluator(cfg_of(tmp_path / "ok", imagefolder, teacher_export, **CACHED, **{
            "SOLVER.BASE_LR": 0.02, "SOLVER.EPOCHS": 3})).run()
    assert res["warnings"] == [] and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ok/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and max(losses) < 2  # near ln(4) = 1.39, far below the 13.9 that warns
    with pytest.raises(FloatingPointError, match="non-finite loss in epoch 1; lower SOLVER.BASE_LR"):
        LinearEvaluator(cfg_of(tmp_path / "inf", imagefolder, teacher_export, **CACHED,
                               **{"SOLVER.BASE_LR": 1e38})).run()


def test_summary_lines_print_accuracies_with_two_decimals():
    """linear, semi-supervised and CIFAR runs share summary_line (kNN: tests/test_knn.py)."""
    r = {"eval": "linear", "arch": "resnet18", "dataset": "imagenet", "subset": "", "train_images": 1281167,
         "top1": 61.234, "top5": 99.996, "epochs": 100}
    assert summary_line(r) == "linear resnet18 imagenet: top-1 61.23 top-5 100.00 (100 epochs)"
    assert summary_line({**r, "eval": "semi", "subset": "1percent.txt", "train_images": 12811, "top1": 5.0}) == \
        "semi resnet18 imagenet (1percent.txt, 12811 images): top-1 5.00 top-5 100.00 (100 epochs)"
    assert summary_line({**r, "dataset": "cifar10", "top1": 88.125, "top5": 99.5}) == \
        "linear resnet18 cifar10: top-1 88.12 top-5 99.50 (100 epochs)"
