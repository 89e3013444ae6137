"""Training curves (issue #11): each run keeps one colour / line style / marker in every panel, fixed by its position
in the run list; every panel's legend names exactly the runs drawn in it (one run too); a single-point series is
drawn with a marker on a non-degenerate, integer x axis."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")

from transfer.plots import MANY_POINTS, curves_figure, plot_training_curves, read_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


@pytest.fixture
def two_runs(tmp_path):
    """DisCo: total loss, loss_disco, lr, no kNN; MoCo-v2: total loss, loss_mocov2, lr and ONE kNN record (epoch 3)."""
    disco = [{"iter": i, "epoch": i // 10, "lr": 0.06, "loss": 6 - i / 10, "loss_disco": 1 - i / 50}
             for i in range(0, 40, 5)]
    moco = [{"iter": i, "epoch": i // 10, "lr": 0.03, "loss": 5 - i / 10, "loss_mocov2": 5 - i / 10}
            for i in range(0, 40, 5)]
    moco.append({"iter": 40, "epoch": 3, "knn_top1": 31.5, "knn_top5": 70.0})
    return {"DisCo": _write_run(tmp_path / "disco", disco), "MoCo-v2": _write_run(tmp_path / "moco", moco)}


def _figure(runs):
    return curves_figure({label: read_metrics(path) for label, path in runs.items()})


def _panels(fig):
    """title -> (axes, {label: Line2D}) of every drawn panel."""
    out = {}
    for ax in fig.axes:
        if ax.get_title():
            out[ax.get_title()] = (ax, {line.get_label(): line for line in ax.get_lines()})
    return out


def _legend(ax):
    legend = ax.get_legend()
    assert legend is not None, f"panel {ax.get_title()!r} has no legend"
    return [t.get_text() for t in legend.get_texts()]


def test_each_run_keeps_one_style_in_every_panel_and_legends_name_the_runs_drawn(two_runs):
    panels = _panels(_figure(two_runs))
    assert set(panels) == {"total loss", "loss_disco", "loss_mocov2", "learning rate", "kNN top-1 (%)"}
    drawn = {title: sorted(lines) for title, (_, lines) in panels.items()}
    assert drawn == {"total loss": ["DisCo", "MoCo-v2"], "learning rate": ["DisCo", "MoCo-v2"],
                     "loss_disco": ["DisCo"], "loss_mocov2": ["MoCo-v2"], "kNN top-1 (%)": ["MoCo-v2"]}
    for title, (ax, lines) in panels.items():
        assert _legend(ax) == [label for label in ("DisCo", "MoCo-v2") if label in lines], title
    styles = {}
    for title, (_, lines) in panels.items():
        for label, line in lines.items():
            styles.setdefault(label, set()).add((line.get_color(), line.get_linestyle(), line.get_marker()))
    assert {label: len(s) for label, s in styles.items()} == {"DisCo": 1, "MoCo-v2": 1}  # one style per run
    (disco,), (moco,) = styles["DisCo"], styles["MoCo-v2"]
    assert disco[0] != moco[0] and disco[1] != moco[1] and disco[2] != moco[2]
    # the bug of issue #11: a panel holding only the second run drew it in the first run's colour
    assert panels["kNN top-1 (%)"][1]["MoCo-v2"].get_color() == moco[0] != disco[0]
    # the colour is fixed by the run's position in the run list, not by which runs a panel has
    swapped = _panels(_figure({"MoCo-v2": two_runs["MoCo-v2"], "DisCo": two_runs["DisCo"]}))
    assert swapped["kNN top-1 (%)"][1]["MoCo-v2"].get_color() == disco[0]


def test_single_point_series_has_a_marker_and_an_integer_x_range(two_runs):
    ax, lines = _panels(_figure(two_runs))["kNN top-1 (%)"]
    line = lines["MoCo-v2"]
    assert len(line.get_xdata()) == 1
    assert line.get_marker() not in ("None", None, "", " ") and line.get_markersize() > 0
    lo, hi = ax.get_xlim()
    assert (lo, hi) == (2, 4)  # epoch 3 +- 1, not matplotlib's 2.85 .. 3.15
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_one_run_has_legends_and_long_series_no_markers(tmp_path):
    recs = [{"iter": i, "epoch": 0, "lr": 0.1, "loss": 3.0 - i / 100} for i in range(MANY_POINTS)]
    recs.append({"iter": 29, "epoch": 1, "knn_top1": 10.0})
    recs.append({"iter": 29, "epoch": 2, "knn_top1": 12.0})
    panels = _panels(_figure({"_only": _write_run(tmp_path / "run", recs)}))
    assert set(panels) == {"total loss", "learning rate", "kNN top-1 (%)"}
    for title, (ax, _) in panels.items():
        assert _legend(ax) == ["_only"], title  # one run, a label matplotlib would hide by default: still listed
    assert panels["total loss"][1]["_only"].get_marker() == "None"  # MANY_POINTS points: a plain line
    assert panels["kNN top-1 (%)"][1]["_only"].get_marker() == "o"  # 2 points: markers


def test_plot_training_curves_writes_the_figure(two_runs, tmp_path):
    png = plot_training_curves(two_runs, str(tmp_path / "out" / "curves.png"))
    assert png == str(tmp_path / "out" / "curves.png")
    assert open(png, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="no plottable metric"):
        plot_training_curves({"empty": _write_run(tmp_path / "empty", [{"iter": 1, "images_per_s": 3.0}])},
                             str(tmp_path / "x.png"))
