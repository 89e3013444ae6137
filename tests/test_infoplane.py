"""The information plane (paper Figure 7): the binning estimator on cases with known answers, the linear evaluator's
per-epoch I(X;T) / I(T;Y) records on a tiny synthetic CIFAR-10 (cached and uncached, the classifier unchanged by
the option), and the Figure 7 plot of several runs (function and tools/plot_curves.py)."""
import json
import math
import os
import subprocess
import sys

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from pretrain.synthetic import write_cifar  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.infoplane import discretize, information_plane, mutual_information  # noqa: E402
from transfer.linear import LinearEvaluator  # noqa: E402
from transfer.plots import info_plane_figure, plot_info_plane, read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the estimator


def test_bins_are_right_closed_equal_widths_of_0_1():
    b = discretize(torch.tensor([0.0, 1e-9, 0.1, 0.1 + 1e-9, 0.5, 0.99, 1.0, 1.5, -0.2], dtype=torch.float64), 10)
    assert b.tolist() == [0, 0, 0, 1, 4, 9, 9, 9, 0]  # (k/10, (k+1)/10] -> k, as pandas.cut; 0 in the first bin


def test_a_deterministic_injective_map_gives_log2_n():
    n, bins = 30, 30
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / bins  # one image per bin of class 0's probability
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)  # softmax gives back (p, 1 - p)
    labels = torch.arange(n) % 3
    mi = information_plane(logits, labels, bins)
    assert mi["mi_xt"] == pytest.approx(math.log2(n), abs=1e-12) and mi["h_x"] == pytest.approx(math.log2(n))
    # every image its own pattern: T determines Y, so I(T;Y) = H(Y) (3 balanced classes)
    assert mi["mi_ty"] == pytest.approx(math.log2(3), abs=1e-12) == pytest.approx(mi["h_y"])


def test_t_independent_of_y_gives_zero():
    i = torch.arange(40)
    t, y = i % 4, (i // 4) % 10  # every value of T sees each of the 10 labels exactly once: exactly independent
    mi = mutual_information(t, y)
    assert mi["mi_ty"] == pytest.approx(0.0, abs=1e-12) and mi["mi_xt"] == pytest.approx(2.0, abs=1e-12)
    # independent draws: zero within the finite-sample bias, about (|T| - 1)(|Y| - 1) / (2 N ln 2) = 0.0003 bits
    g = torch.Generator().manual_seed(0)
    t, y = torch.randint(5, (20000,), generator=g), torch.randint(3, (20000,), generator=g)
    assert 0.0 <= mutual_information(t, y)["mi_ty"] < 0.003


def test_t_equal_to_y_one_hot_gives_h_y():
    counts = [10, 5, 3, 2]  # unbalanced: H(Y) is not log2(4)
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    h_y = -sum(c / 20 * math.log2(c / 20) for c in counts)
    mi = information_plane(torch.nn.functional.one_hot(y, 4).double(), y, bins=30, softmax=False)
    assert mi["mi_ty"] == pytest.approx(h_y, abs=1e-12) and mi["mi_xt"] == pytest.approx(h_y, abs=1e-12)
    assert mi["h_y"] == pytest.approx(h_y, abs=1e-12)
    # a constant output carries nothing: 0 and 0
    const = information_plane(torch.zeros(20, 4), y, bins=30)
    assert const["mi_xt"] == 0.0 and const["mi_ty"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# the linear evaluator


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", num_classes=4, train_per_class=12, test_per_class=5, seed=0)
    return root


def _run(out, root, weights, **over):
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": weights, "DATA.ROOT": root, "DATA.IMAGE_SIZE": 32,
            "DATA.VAL_RESIZE": 32, "DATA.NUM_WORKERS": 0, "SOLVER.EPOCHS": 3, "SOLVER.STEPS": "(2,)",
            "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.1, "TEST.IMS_PER_BATCH": 64, **over}
    cfg = setup_eval_cfg(os.path.join(ROOT, "configs/eval/cifar10.yaml"), [str(x) for kv in opts.items() for x in kv])
    return LinearEvaluator(cfg).run()


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def linear_runs(cifar_root, teacher_export, tmp_path_factory):
    """cached: INFO_PLANE on, all 48 training images; uncached: on, 20 images; plain: uncached, off."""
    base = tmp_path_factory.mktemp("linear")
    on = {"INFO_PLANE.ENABLED": True}
    _run(base / "cached", cifar_root, teacher_export, **on)
    uncached = {"SOLVER.CACHE_FEATURES": False}
    _run(base / "uncached", cifar_root, teacher_export, **uncached, **on, **{"INFO_PLANE.MAX_IMAGES": 20})
    _run(base / "plain", cifar_root, teacher_export, **uncached)
    return base


def test_linear_evaluator_records_the_plane_every_epoch(linear_runs):
    recs = _records(linear_runs / "cached")
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]  # epoch 0: the initial classifier, the path's start
    assert "loss" not in recs[0] and all("loss" in r for r in recs[1:])
    for r in recs:
        assert r["mi_xt_max"] == pytest.approx(math.log2(48), abs=1e-6)  # 4 x 12 images, MAX_IMAGES 1000
        assert r["mi_ty_max"] == pytest.approx(2.0, abs=1e-6)  # 4 balanced classes
        assert 0.0 <= r["mi_xt"] <= r["mi_xt_max"] + 1e-9 and 0.0 <= r["mi_ty"] <= min(r["mi_xt"], 2.0) + 1e-9
    assert len({(r["mi_xt"], r["mi_ty"]) for r in recs}) > 1  # the path moves as the classifier trains
    log = (linear_runs / "cached" / "log.txt").read_text()
    assert "information plane (INFO_PLANE): I(X;T) and I(T;Y) of the softmax output on 48 training images, 30 bins" \
        in log and f"I(X;T) {recs[-1]['mi_xt']:.3f} I(T;Y) {recs[-1]['mi_ty']:.3f} bits" in log


def test_uncached_estimate_and_the_classifier_is_unchanged(linear_runs):
    recs = _records(linear_runs / "uncached")
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]
    assert all(r["mi_xt_max"] == pytest.approx(math.log2(20), abs=1e-6) for r in recs)  # 5 of each class
    plain = _records(linear_runs / "plain")
    assert [r["epoch"] for r in plain] == [1, 2, 3] and not any("mi_xt" in r for r in plain)
    a, b = (torch.load(linear_runs / d / "checkpoints" / "model_0000003.pth", weights_only=False)["classifier"]
            for d in ("uncached", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the option changes nothing of the training
    assert [r["loss"] for r in recs[1:]] == [r["loss"] for r in plain]


# ---------------------------------------------------------------------------------------------------------------
# the plot


def test_figure_7_plot_of_several_runs(linear_runs, tmp_path):
    runs = {"cached": str(linear_runs / "cached"), "20 images": str(linear_runs / "uncached"),
            "no plane": str(linear_runs / "plain")}
    fig = info_plane_figure({label: read_metrics(p) for label, p in runs.items()})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "I(X;T) (bits)" and ax.get_ylabel() == "I(T;Y) (bits)"
    paths = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert sorted(paths) == ["20 images", "cached"]  # a run without records draws nothing
    assert len(paths["cached"].get_xdata()) == 4 and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "cached", "20 images"]
    assert paths["cached"].get_color() != paths["20 images"].get_color()
    png = plot_info_plane(runs, str(tmp_path / "plane" / "fig7.png"))
    assert open(png, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="INFO_PLANE.ENABLED True"):
        plot_info_plane({"no plane": runs["no plane"]}, str(tmp_path / "x.png"))

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_curves.py"), runs["cached"],
                           runs["20 images"], "--labels", "cached", "uncached", "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC and "mi_xt, mi_ty" in proc.stdout
    assert (tmp_path / "c_info_plane.png").read_bytes()[:8] == PNG_MAGIC
    assert f"information plane of cached, uncached -> {tmp_path / 'c_info_plane.png'}" in proc.stdout
