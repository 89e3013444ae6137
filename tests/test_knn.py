"""Weighted kNN: perfect features -> 100 %, random features -> chance, the CLI end to end, and the functions the
pretrainer's online monitor uses."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pretrain.export import load_exported_backbone
from pretrain.knn import KnnData, knn_accuracy, knn_evaluate
from transfer.knn import knn_summary_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(n_per_class, num_classes, dim=32, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(x, dim=1), labels


def test_separable_features_give_100_percent():
    train_f, train_l = _clusters(30, 10, seed=0)
    test_f, test_l = _clusters(10, 10, seed=0)  # the same centres
    test_f = F.normalize(test_f + 0.05 * torch.randn(test_f.shape, generator=torch.Generator().manual_seed(9)), dim=1)
    acc = knn_accuracy(train_f, train_l, test_f, test_l, 10, k=20, temperature=0.07)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_random_features_are_at_chance():
    g = torch.Generator().manual_seed(1)
    train_f = F.normalize(torch.randn(2000, 64, generator=g), dim=1)
    test_f = F.normalize(torch.randn(2000, 64, generator=g), dim=1)
    train_l, test_l = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    acc = knn_accuracy(train_f, train_l, test_f, test_l, 10, k=20, temperature=0.07)
    assert 6.0 < acc["top1"] < 14.0 and 40.0 < acc["top5"] < 60.0  # chance: 10 % and 50 %


def test_cli_end_to_end_and_the_monitor_api(tmp_path, imagefolder, teacher_export):
    out = tmp_path / "knn"
    opts = ["OUTPUT_DIR", out, "MODEL.WEIGHTS", teacher_export, "DATA.TRAIN_DIR", imagefolder / "train",
            "DATA.VAL_DIR", imagefolder / "val", "DATA.IMAGE_SIZE", 32, "DATA.VAL_RESIZE", 37, "DATA.NUM_WORKERS", 0,
            "KNN.K", 5, "KNN.TEMPERATURE", 0.1, "KNN.MAX_TRAIN_IMAGES", 40]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_knn.py"), "--config-file",
                           os.path.join(ROOT, "configs/eval/knn_imagenet.yaml"), *map(str, opts)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["eval"] == "knn" and res["k"] == 5 and res["temperature"] == 0.1 and res["arch"] == "resnet18"
    assert res["train_images"] == 40 and res["val_images"] == 16 and 0 <= res["top1"] <= res["top5"] <= 100
    assert f"knn resnet18 shapes (40 class-balanced): top-1 {res['top1']:.2f}" in proc.stdout

    # the online monitor's entry points (pretrain/trainer.py) share the code: with the same transform (bicubic
    # resize to 32 / 0.875 = 37, centre crop 32) and the same class-balanced bank they give the same numbers
    backbone, _ = load_exported_backbone(teacher_export)
    data = KnnData(str(imagefolder / "train"), str(imagefolder / "val"), 32, max_train_images=40)
    acc = knn_evaluate(backbone, data, torch.device("cpu"), k=5, temperature=0.1)
    assert len(data.bank) == 40
    assert (round(acc["top1"], 3), round(acc["top5"], 3)) == (res["top1"], res["top5"])


def test_summary_line_prints_accuracies_with_two_decimals():
    r = {"arch": "resnet18", "dataset": "imagenet", "subset": "", "top1": 48.2, "top5": 71.004, "k": 20,
         "temperature": 0.07, "train_images": 1281167}
    assert knn_summary_line(r) == "knn resnet18 imagenet: top-1 48.20 top-5 71.00 (k=20, T=0.07, 1281167 train images)"
    assert knn_summary_line({**r, "subset": "40 class-balanced", "top1": 100.0, "top5": 100.0}) == \
        "knn resnet18 imagenet (40 class-balanced): top-1 100.00 top-5 100.00 (k=20, T=0.07, 1281167 train images)"
