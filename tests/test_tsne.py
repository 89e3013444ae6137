"""t-SNE (paper Figure 8) and training-curve plots: deterministic selection, an embedding that keeps separated
classes apart, PNGs written through the CLIs."""
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from transfer.plots import plot_training_curves, read_metrics
from transfer.tsne import select_tsne_indices, tsne_embed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tool, args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_selection_is_deterministic_and_balanced():
    targets = [i % 7 for i in range(140)]
    idx, classes = select_tsne_indices(targets, 3, 5, seed=0)
    assert (idx, classes) == select_tsne_indices(targets, 3, 5, seed=0)
    assert len(classes) == 3 and len(idx) == 15 and sorted({targets[i] for i in idx}) == classes
    assert select_tsne_indices(targets, 3, 5, seed=1) != (idx, classes)


def test_embedding_keeps_separated_classes_apart(caplog):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(25)
    feats = centres[labels] + 0.3 * torch.randn(100, 64, generator=g)
    with caplog.at_level(logging.INFO, logger="transfer"):
        emb = tsne_embed(feats, seed=0, perplexity=30)
    # scikit-learn's fit reports nothing: a log line before (what is embedded) and after (how long it took)
    msgs = [r.getMessage() for r in caplog.records if r.name == "transfer"]
    assert msgs[0] == "t-SNE of 100 points (64-d features, perplexity 30) started; scikit-learn reports nothing " \
                      "until it ends"
    assert re.fullmatch(r"t-SNE of 100 points done in \d+\.\d s", msgs[1]) and len(msgs) == 2
    assert emb.shape == (100, 2) and np.isfinite(emb).all()
    assert np.array_equal(emb, tsne_embed(feats, seed=0, perplexity=30))  # random_state fixed
    # leave-one-out 1-NN in the 2-D map: separated clusters stay separated
    d = torch.cdist(torch.as_tensor(emb), torch.as_tensor(emb)).fill_diagonal_(float("inf"))
    assert (labels[d.argmin(1)] == labels).float().mean() == 1.0


def test_cli_tsne_png(tmp_path, imagefolder, teacher_export):
    out = tmp_path / "tsne"
    stdout = _run("tsne.py", ["--config-file", os.path.join(ROOT, "configs/eval/tsne_imagenet.yaml"),
                              "OUTPUT_DIR", out, "MODEL.WEIGHTS", teacher_export, "DATA.TRAIN_DIR",
                              imagefolder / "train", "DATA.VAL_DIR", imagefolder / "val", "DATA.IMAGE_SIZE", 32,
                              "DATA.VAL_RESIZE", 36, "DATA.NUM_WORKERS", 0, "TSNE.NUM_CLASSES", 3,
                              "TSNE.PER_CLASS", 4, "TSNE.COMPARE_WEIGHTS", "['random']",
                              "TSNE.COMPARE_ARCHS", "['convnet_tiny']"])
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 12 and len(res["classes"]) == 3
    assert [m["arch"] for m in res["models"]] == ["resnet18", "convnet_tiny"]
    assert (out / "tsne.png").read_bytes()[:8] == PNG_MAGIC and (out / "tsne.png").stat().st_size > 10_000
    npz = np.load(out / "tsne.npz")
    assert npz["embedding_0"].shape == npz["embedding_1"].shape == (12, 2)
    assert "tsne resnet18 (moco) | convnet_tiny (random checkpoint) shapes: 3 classes x 4 images" in stdout


def test_training_curves_from_metrics_jsonl(tmp_path):
    runs = {}
    for name, dis in (("disco", 1.0), ("moco", 0.0)):
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"iter": i, "epoch": i // 10, "lr": 0.06 * (1 - i / 40), "loss": 5 - i / 10,
                             "loss_dis": dis * (1 - i / 50), "loss_co": 4 - i / 10, "images_per_s": 100.0,
                             "skipped_images": 0}) for i in range(1, 40, 5)]
        lines += [json.dumps({"iter": 40, "epoch": e, "knn_top1": 20.0 + e, "knn_top5": 60.0}) for e in (2, 4)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"iter": 41, "ep')  # killed mid-line
        runs[name] = d
    assert len(read_metrics(str(runs["disco"]))) == 10  # the truncated last line is skipped
    png = plot_training_curves({k: str(v) for k, v in runs.items()}, str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == PNG_MAGIC
    stdout = _run("plot_curves.py", [runs["disco"], runs["moco"] / "metrics.jsonl", "--labels", "DisCo", "MoCo-v2",
                                     "--out", tmp_path / "cli.png"])
    assert "curves of DisCo, MoCo-v2" in stdout and (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC
