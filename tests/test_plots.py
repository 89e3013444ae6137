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


# ---------------------------------------------------------------------------------------------------------------
# A benchmark's results table: protocol bars (paper Figures 5 and 6) and hidden-dim sweeps (paper Figure 9)

from transfer.plots import (bar_groups, hidden_dim_figure, hidden_dim_sweeps, plot_hidden_dim,  # noqa: E402
                            plot_protocol_bars, protocol_bars_figure, protocol_metrics)


def _row(run, method, group="", seed=None, hidden_dim=None, paper=None, **cells):
    row = {"run": run, "method": method, "group": group, "seed": seed, "hidden_dim": hidden_dim, "cells": cells}
    if paper is not None:
        row["paper"] = paper
    return row


@pytest.fixture
def table():
    """Group resnet18 first (DisCo before MoCo-v2), then efficientnet_b0 (MoCo-v2 only): DisCo/resnet18 has 3 seeds
    and a paper value on one of them; voc_ap50 has no value anywhere (None and NaN)."""
    return [
        _row("d18-s0", "disco", "resnet18", 0, linear_top1=60.0, knn_top1=50.0, voc_ap50=None),
        _row("m18", "mocov2", "resnet18", 0, paper={"linear_top1": 52.5}, linear_top1=52.0),
        _row("d18-s1", "disco", "resnet18", 1, paper={"linear_top1": 65.2}, linear_top1=62.0, knn_top1=52.0),
        _row("mb0", "mocov2", "efficientnet_b0", 0, linear_top1=40.0, voc_ap50=float("nan")),
        _row("d18-s2", "disco", "resnet18", 2, linear_top1=64.0, knn_top1=54.0),
    ]


def test_bar_groups_mean_std_paper_and_first_seen_order(table):
    groups = bar_groups(table, "linear_top1")
    assert list(groups) == ["resnet18", "efficientnet_b0"]
    assert list(groups["resnet18"]) == ["disco", "mocov2"]
    mean, std, n, paper = groups["resnet18"]["disco"]
    assert (mean, n, paper) == (pytest.approx(62.0), 3, 65.2)
    assert std == pytest.approx(2.0)  # sample std of 60, 62, 64
    assert groups["resnet18"]["mocov2"] == (52.0, None, 1, 52.5)  # one seed: no std
    assert groups["efficientnet_b0"] == {"mocov2": (40.0, None, 1, None)}
    assert bar_groups(table, "knn_top1") == {"resnet18": {"disco": (pytest.approx(52.0), pytest.approx(2.0), 3,
                                                                    None)}}
    assert bar_groups(table, "voc_ap50") == {}  # None and NaN are no values
    assert bar_groups([_row("a", "disco", linear_top1=1.0)], "linear_top1") == {"": {"disco": (1.0, None, 1, None)}}


def test_protocol_metrics_drop_the_empty_and_keep_the_given_order(table):
    assert protocol_metrics(table) == ["linear_top1", "knn_top1"]  # first seen; voc_ap50 has no value
    assert protocol_metrics(table, ["knn_top1", "voc_ap50", "coco_box_ap", "linear_top1"]) == ["knn_top1",
                                                                                                "linear_top1"]


def _paper_marks(ax):
    """The y of every horizontal segment of a line collection (the black paper markers; error bars are vertical)."""
    from matplotlib.collections import LineCollection

    return sorted(float(seg[0][1]) for c in ax.collections if isinstance(c, LineCollection)
                  for seg in c.get_segments() if len(seg) == 2 and seg[0][1] == seg[1][1])


def test_protocol_bars_figure_panels_bars_paper_markers_and_labels(table):
    fig = protocol_bars_figure(table)
    assert [ax.get_title() for ax in fig.axes] == ["linear_top1", "knn_top1"]  # one axes per metric with data
    linear, knn = fig.axes
    assert len(linear.patches) == 3 and len(knn.patches) == 1  # disco + mocov2 on resnet18, mocov2 on b0
    assert [t.get_text() for t in linear.get_xticklabels()] == ["resnet18", "efficientnet_b0"]
    heights = sorted(round(p.get_height(), 6) for p in linear.patches)
    assert heights == [40.0, 52.0, 62.0]
    assert sorted(t.get_text() for t in linear.texts) == ["40.0", "52.0", "62.0"]
    colour = {round(p.get_height(), 6): p.get_facecolor() for p in linear.patches}
    assert colour[62.0] == knn.patches[0].get_facecolor() != colour[52.0]  # disco's colour in both panels
    assert colour[52.0] == colour[40.0]  # mocov2 in both groups
    assert _paper_marks(linear) == [52.5, 65.2] and _paper_marks(knn) == []
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["disco", "mocov2",
                                                                                              "paper"]
    single = protocol_bars_figure([_row("a", "disco", linear_top1=1.0), _row("b", "mocov2", linear_top1=2.0)])
    assert [t.get_text() for t in single.axes[0].get_xticklabels()] == ["all"]
    with pytest.raises(ValueError, match="no value"):
        protocol_bars_figure(table, ["voc_ap50"])


def _sweep_rows():
    """DisCo (resnet18) at 512 (3 seeds, paper 60.0) and 2048 (one seed, paper 63.0) plus a hidden-dim-less row;
    MoCo-v2 at a single hidden dim (no sweep)."""
    return [
        _row("d-2048", "disco", "resnet18", 0, 2048, paper={"linear_top1": 63.0}, linear_top1=62.5),
        _row("d-512-0", "disco", "resnet18", 0, 512, linear_top1=58.0),
        _row("d-512-1", "disco", "resnet18", 1, 512, paper={"linear_top1": 60.0}, linear_top1=59.0),
        _row("d-512-2", "disco", "resnet18", 2, 512, linear_top1=60.0),
        _row("d-none", "disco", "resnet18", 0, None, linear_top1=99.0),
        _row("m-512", "mocov2", "resnet18", 0, 512, linear_top1=50.0),
    ]


def test_hidden_dim_sweeps_numbers_and_the_plot(tmp_path):
    sweeps = hidden_dim_sweeps(_sweep_rows(), "linear_top1")
    assert list(sweeps) == ["disco (resnet18)"]  # mocov2 has one hidden dim: no sweep
    (d512, mean, std, n, paper), last = sweeps["disco (resnet18)"]
    assert (d512, mean, n, paper) == (512, pytest.approx(59.0), 3, 60.0) and std == pytest.approx(1.0)
    assert last == (2048, 62.5, None, 1, 63.0)
    assert hidden_dim_sweeps(_sweep_rows(), "knn_top1") == {}
    ax = hidden_dim_figure(_sweep_rows()).axes[0]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [512, 2048]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["512", "2048"]
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    assert len(hollow) == 1 and list(hollow[0].get_ydata()) == [60.0, 63.0]
    png = plot_hidden_dim(_sweep_rows(), str(tmp_path / "figs" / "hidden.png"))
    assert png == str(tmp_path / "figs" / "hidden.png") and open(png, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="no hidden-dim sweep of 'linear_top1'"):
        plot_hidden_dim([r for r in _sweep_rows() if r["method"] == "mocov2"], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_plot_protocol_bars_writes_the_figure(table, tmp_path):
    png = plot_protocol_bars(table, str(tmp_path / "figs" / "bars.png"), metrics=["knn_top1"])
    assert png == str(tmp_path / "figs" / "bars.png")
    data = open(png, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
