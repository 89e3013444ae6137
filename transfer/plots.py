"""Training curves of pretraining runs from their ``metrics.jsonl`` (what ``pretrain/trainer.py`` writes), and the
information plane of linear evaluations (paper Figure 7, :func:`plot_info_plane`).

Each line is one JSON object: training records ``{iter, epoch, lr, loss, loss_<term>..., images_per_s,
skipped_images}`` every ``TRAIN.LOG_PERIOD`` iterations (one ``loss_<term>`` per term of the method: ``loss_mocov2``,
``loss_disco``, ...; every one gets a panel), and kNN-monitor records ``{iter, epoch, knn_top1, knn_top5}``. A linear
evaluation's ``metrics.jsonl`` (``{epoch, lr, loss, train_top1, [val_top1], [mi_xt, mi_ty]}``) plots too.
"""
import os
from typing import Dict, List, Sequence

from pretrain.runlog import read_jsonl

# (panel title, y key, x key); a panel is drawn when some run has that key. Every loss_* term a run logged gets a
# panel of its own after the total loss (loss_terms).
LOSS_PANEL = ("total loss", "loss", "iter")
PANELS = (
    ("learning rate", "lr", "iter"),
    ("kNN top-1 (%)", "knn_top1", "epoch"),
    ("linear: train top-1 (%)", "train_top1", "epoch"),
    ("linear: val top-1 (%)", "val_top1", "epoch"),
    ("linear: I(X;T) (bits)", "mi_xt", "epoch"),
    ("linear: I(T;Y) (bits)", "mi_ty", "epoch"),
)


def read_metrics(path: str) -> List[dict]:
    """The records of a ``metrics.jsonl`` (or of ``<run dir>/metrics.jsonl``), in file order; a truncated last line
    (a run killed while writing) is dropped with a warning, any other bad line is an error naming it."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give a run's OUTPUT_DIR or its metrics.jsonl")
    return read_jsonl(path)


def loss_terms(runs) -> List[str]:
    """Every ``loss_<term>`` key in the records of ``runs`` (lists of records), sorted."""
    return sorted({k for recs in runs for r in recs for k in r if k.startswith("loss_")})


def plan_panels(data: Dict[str, List[dict]]) -> List[tuple]:
    """``(title, key, x, [(label, [(x, y), ...]), ...])`` for every panel with data, in drawing order: total loss,
    each ``loss_*`` term, lr, kNN, linear evaluation. ``data``: label -> the run's records."""
    panels = []
    for title, key, x in (LOSS_PANEL, *((k, k, "iter") for k in loss_terms(data.values())), *PANELS):
        series = []
        for label, recs in data.items():
            pts = [(r.get(x, r.get("epoch")), r[key]) for r in recs if key in r and r.get(key) is not None]
            if pts and not (key.startswith("loss_") and all(y == 0 for _, y in pts)):  # a term a run did not have
                series.append((label, pts))
        if series:
            panels.append((title, key, x, series))
    return panels


# One style per run for the whole figure, fixed by the run's position in the run list (not by the panel): the i-th
# run has the i-th colour of matplotlib's default cycle, and its own line style and marker, so a panel holding only
# some of the runs still draws each in the colour its legend entry has in every other panel.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MANY_POINTS = 30  # series with fewer points draw a marker at each point


def run_styles(labels: Sequence[str]) -> Dict[str, dict]:
    """label -> ``dict(color, linestyle, marker)`` for ``plot`` (the same in every panel), by position in ``labels``."""
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: dict(color=colors[i % len(colors)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                        marker=MARKERS[i % len(MARKERS)]) for i, label in enumerate(labels)}


def curves_figure(data: Dict[str, List[dict]]):
    """The figure of :func:`plot_training_curves` (a ``matplotlib.figure.Figure``, no pyplot state, no backend
    change) for ``data``: label -> the run's records, in run order. Each run keeps one colour / line style / marker
    in every panel (:func:`run_styles`); every panel has a legend naming exactly the runs drawn in it; a series with
    fewer than ``MANY_POINTS`` points has a marker at each point, and a panel whose points all share one x gets the
    x range ``x - 1 .. x + 1`` (iterations and epochs are whole numbers: the ticks are integers)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = plan_panels(data)
    if not panels:
        raise ValueError(f"no plottable metric in the runs {list(data)} (expected keys like loss, lr, knn_top1)")
    styles = run_styles(list(data))
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, key, x, series) in zip(axes.flat, panels):
        lines = []
        for label, pts in series:
            xs, ys = zip(*pts)
            style = dict(styles[label])
            if len(pts) >= MANY_POINTS:
                style["marker"] = None
            lines += ax.plot(xs, ys, label=label, markersize=3 if len(pts) > 1 else 6, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        all_x = {px for _, p in series for px, _ in p}
        if len(all_x) == 1:  # matplotlib would widen a single x by +-5 %: 0.95 .. 1.05 epochs
            (only,) = all_x
            ax.set_xlim(only - 1, only + 1)
        if key == "lr" and all(y > 0 for _, p in series for _, y in p):
            ax.set_yscale("log")  # step schedules span decades
        ax.grid(alpha=0.3)
        # handles and labels given explicitly: a label starting with "_" (a run folder "_old") is still listed
        ax.legend(lines, [label for label, _ in series], fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_training_curves(runs: Dict[str, str], path: str) -> str:
    """One figure, one panel per quantity present (losses, lr, kNN top-1, ...), one line per run, written to the PNG
    ``path``; returns ``path``. ``runs``: label -> run dir or metrics.jsonl, in the order that fixes each run's colour.
    ``x`` is the iteration for training records (the linear evaluator's epoch when a run has no iterations) and the
    epoch for kNN records. The figure is :func:`curves_figure`'s."""
    fig = curves_figure({label: read_metrics(p) for label, p in runs.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def labels_for(paths: Sequence[str]) -> List[str]:
    """Default curve labels: each run folder's name (the folder holding metrics.jsonl)."""
    out = []
    for p in paths:
        d = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        out.append(os.path.basename(os.path.normpath(d)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The information plane (paper Figure 7)


def info_plane_paths(data: Dict[str, List[dict]]) -> Dict[str, List[tuple]]:
    """label -> ``[(epoch, I(X;T), I(T;Y), log2 N, H(Y)), ...]`` by epoch, from the ``mi_xt`` / ``mi_ty`` records of
    a linear evaluation with INFO_PLANE.ENABLED (a later record of the same epoch, from a rerun, replaces an earlier
    one); runs without such records are left out."""
    out = {}
    for label, recs in data.items():
        by_epoch = {}
        for r in recs:
            if r.get("mi_xt") is not None and r.get("mi_ty") is not None:
                by_epoch[r.get("epoch", 0)] = (r["mi_xt"], r["mi_ty"], r.get("mi_xt_max"), r.get("mi_ty_max"))
        if by_epoch:
            out[label] = [(e, *by_epoch[e]) for e in sorted(by_epoch)]
    return out


def info_plane_figure(data: Dict[str, List[dict]]):
    """The figure of :func:`plot_info_plane` (a ``matplotlib.figure.Figure``): I(X;T) on x, I(T;Y) on y, one path per
    run (the run's colour, line style and marker of :func:`run_styles`, so it matches the curves), every estimate a
    marker filled with its epoch's colour (colour bar), the first one (the initial classifier) larger; dotted lines
    at the upper bounds log2 N and H(Y) when the runs share them."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    paths = info_plane_paths(data)
    if not paths:
        raise ValueError(f"no information-plane records (mi_xt, mi_ty) in the runs {list(data)}: run the linear "
                         f"evaluation with INFO_PLANE.ENABLED True")
    styles = run_styles(list(data))
    cmap = matplotlib.colormaps["viridis"]
    norm = Normalize(0, max(1, max(p[0] for pts in paths.values() for p in pts)))
    fig = Figure(figsize=(6.6, 4.8))
    ax = fig.subplots()
    handles = []
    for label, pts in paths.items():
        style = styles[label]
        epochs, xs, ys = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        handles += ax.plot(xs, ys, color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                           markerfacecolor="none", markersize=6, linewidth=1.2, label=label, zorder=2)
        ax.scatter(xs, ys, c=epochs, cmap=cmap, norm=norm, marker=style["marker"], edgecolors=style["color"],
                   s=[70 if i == 0 else 30 for i in range(len(pts))], linewidths=0.8, zorder=3)
    for index, axline, name in ((3, ax.axvline, "log2 N"), (4, ax.axhline, "H(Y)")):
        bounds = {p[index] for pts in paths.values() for p in pts}
        if len(bounds) == 1 and None not in bounds:
            (value,) = bounds
            axline(value, color="0.5", linestyle=":", linewidth=1)
            if index == 3:
                ax.annotate(f"{name} = {value:.2f}", (value, 0), xycoords=("data", "axes fraction"),
                            xytext=(-3, 3), textcoords="offset points", ha="right", fontsize=7, color="0.4")
            else:
                ax.annotate(f"{name} = {value:.2f}", (0, value), xycoords=("axes fraction", "data"),
                            xytext=(3, -9), textcoords="offset points", fontsize=7, color="0.4")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="epoch (largest marker: before training)")
    ax.set_xlabel("I(X;T) (bits)")
    ax.set_ylabel("I(T;Y) (bits)")
    ax.set_title("information plane of the linear classifier's output", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_info_plane(runs: Dict[str, str], path: str) -> str:
    """The information-plane paths (:func:`info_plane_figure`) of ``runs`` (label -> a linear evaluation's run dir or
    metrics.jsonl, in the order that fixes each run's colour) written to the PNG ``path``; returns ``path``."""
    fig = info_plane_figure({label: read_metrics(p) for label, p in runs.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------------
# A benchmark's results table: protocol bars (paper Figures 5 and 6) and hidden-dim sweeps (paper Figure 9)
#
# ``rows``: one dict per benchmark run, ``{"run": str, "method": str, "group": str, "seed": int | None,
# "hidden_dim": int | None, "cells": {metric: float}, ["paper": {metric: float}]}``. A cell or paper value that is
# missing, None or not finite (a failed run's NaN) counts as absent.


def _finite(values: dict, metric: str):
    """``values[metric]`` as a float, or None when it is missing, None or not finite."""
    import math

    v = (values or {}).get(metric)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _summary(values: List[float]) -> tuple:
    """``(mean, sample std or None when fewer than 2 values, n)``."""
    import statistics

    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _first_seen(items) -> list:
    """The distinct items in their first-seen order."""
    return list(dict.fromkeys(items))


def group_label(group: str) -> str:
    """The x tick label of a group: the group itself, ``"all"`` for the empty group (nothing else varies)."""
    return group if group else "all"


def bar_groups(rows: Sequence[dict], metric: str) -> Dict[str, Dict[str, tuple]]:
    """``{group: {method: (mean, std or None, n, paper or None)}}`` of ``metric`` over ``rows``, groups and methods in
    first-seen order: mean and sample std (None with one run) over the rows of that (group, method) with a value of
    ``metric`` (one per seed), ``n`` how many, and ``paper`` the first ``paper[metric]`` among all the rows of that
    (group, method). A (group, method) without any value is left out, and so is a group left empty."""
    values, papers = {}, {}
    for r in rows:
        key = (r.get("group") or "", r["method"])
        v = _finite(r.get("cells"), metric)
        if v is not None:
            values.setdefault(key, []).append(v)
        p = _finite(r.get("paper"), metric)
        if p is not None:
            papers.setdefault(key, p)
    out = {}
    for group, method in _first_seen((r.get("group") or "", r["method"]) for r in rows):
        if (group, method) in values:
            out.setdefault(group, {})[method] = (*_summary(values[(group, method)]), papers.get((group, method)))
    return out


def protocol_metrics(rows: Sequence[dict], metrics: Sequence[str] = None) -> List[str]:
    """The metrics :func:`protocol_bars_figure` draws: ``metrics`` in the given order, or every metric of any row's
    cells in first-seen order, less those without a single value."""
    if metrics is None:
        metrics = _first_seen(m for r in rows for m in (r.get("cells") or {}))
    return [m for m in _first_seen(metrics) if any(_finite(r.get("cells"), m) is not None for r in rows)]


def protocol_bars_figure(rows: Sequence[dict], metrics: Sequence[str] = None):
    """The figure of :func:`plot_protocol_bars` (a ``matplotlib.figure.Figure``): one panel per metric with data
    (:func:`protocol_metrics`), titled by the metric; groups on x in first-seen order (``""`` labelled ``"all"``),
    within a group one bar per method, the method's colour fixed by its first-seen position among all rows (the
    colours of :func:`run_styles`) in every panel, one legend for the figure. A bar is the mean over seeds of
    :func:`bar_groups`, with its value above it (1 decimal) and a sample-std error bar when there are 2+ seeds; the
    paper's value is a short black horizontal line across the bar."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = protocol_metrics(rows, metrics)
    if not names:
        wanted = "any metric" if metrics is None else f"the metrics {list(metrics)}"
        raise ValueError(f"no value of {wanted} in the cells of the runs {[r.get('run') for r in rows]}")
    methods = _first_seen(r["method"] for r in rows)
    colors = {m: s["color"] for m, s in run_styles(methods).items()}
    tables = [bar_groups(rows, m) for m in names]
    widest = max(len(t) * max(len(g) for g in t.values()) for t in tables)
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    width_in = max(4.6, 1.4 + 0.42 * widest)
    fig = Figure(figsize=(width_in * cols, 3.4 * nrows + 0.4))
    axes = fig.subplots(nrows, cols, squeeze=False)
    any_paper = False
    for ax, metric, table in zip(axes.flat, names, tables):
        per_group = max(len(g) for g in table.values())
        width = 0.8 / per_group
        top = 0.0
        for i, (group, by_method) in enumerate(table.items()):
            start = i - width * (len(by_method) - 1) / 2
            for j, (method, (mean, std, _n, paper)) in enumerate(by_method.items()):
                x = start + j * width
                ax.bar(x, mean, width * 0.92, color=colors[method], label=method)
                if std is not None:
                    ax.errorbar(x, mean, yerr=std, color="0.2", capsize=3, linewidth=1, fmt="none")
                if paper is not None:
                    ax.hlines(paper, x - width * 0.46, x + width * 0.46, colors="black", linewidth=2.2, zorder=4)
                    any_paper = True
                above = max(mean + (std or 0.0), paper if paper is not None else mean)
                ax.annotate(f"{mean:.1f}", (x, above), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
                top = max(top, above)
        ax.set_xticks(range(len(table)))
        ax.set_xticklabels([group_label(g) for g in table])
        ax.set_xlim(-0.6, len(table) - 0.4)
        if top > 0 and all(mean >= 0 for g in table.values() for mean, *_ in g.values()):
            ax.set_ylim(0, top * 1.15)  # room for the value labels
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        fig.delaxes(ax)
    handles = [Patch(color=colors[m]) for m in methods]
    labels = list(methods)
    if any_paper:
        handles.append(Line2D([], [], color="black", linewidth=2.2))
        labels.append("paper")
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return fig


def plot_protocol_bars(rows: Sequence[dict], path: str, metrics: Sequence[str] = None) -> str:
    """The protocol bars of ``rows`` (:func:`protocol_bars_figure`) written to the PNG ``path``; returns ``path``."""
    fig = protocol_bars_figure(rows, metrics)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def series_label(method: str, group: str) -> str:
    """The legend label of a (method, group) series: the method, with the group in parentheses when there is one."""
    return f"{method} ({group})" if group else method


def hidden_dim_sweeps(rows: Sequence[dict], metric: str) -> Dict[str, List[tuple]]:
    """``{label: [(hidden_dim, mean, std or None, n, paper or None), ...]}`` sorted by hidden_dim, one series per
    (method, group) in first-seen order (label :func:`series_label`), over the rows with a positive ``hidden_dim``
    and a value of ``metric``: mean and sample std (None with one run) over the seeds of each hidden dim, ``paper``
    the first ``paper[metric]`` among them. Only series with at least 2 distinct hidden dims are kept (a hidden dim
    of 0, a head without a hidden layer, has no place on the log axis and is left out)."""
    values, papers = {}, {}
    for r in rows:
        dim = r.get("hidden_dim")
        v = _finite(r.get("cells"), metric)
        if dim is None or dim <= 0 or v is None:
            continue
        key = (r["method"], r.get("group") or "")
        values.setdefault(key, {}).setdefault(int(dim), []).append(v)
        p = _finite(r.get("paper"), metric)
        if p is not None:
            papers.setdefault(key, {}).setdefault(int(dim), p)
    out = {}
    for (method, group), by_dim in values.items():  # dicts keep first-seen order
        if len(by_dim) >= 2:
            out[series_label(method, group)] = [(d, *_summary(by_dim[d]), papers.get((method, group), {}).get(d))
                                                for d in sorted(by_dim)]
    return out


def _finish(fig, ax, handles, labels, xlabel: str, ylabel: str):
    """Axis labels, the title ``<ylabel> vs <xlabel>``, a light grid and the legend; returns ``fig``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs {xlabel}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _mean_std_line(ax, pts, style: dict, **kw):
    """``ax.errorbar`` of points ``(x, mean, std or None, ...)``: the mean with sample-std error bars (none for one
    seed); returns the line, for the legend."""
    yerr = [float("nan") if p[2] is None else p[2] for p in pts]
    return ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, capsize=3, markersize=5, linewidth=1.4,
                       **kw, **style).lines[0]


def hidden_dim_figure(rows: Sequence[dict], metric: str = "linear_top1"):
    """The figure of :func:`plot_hidden_dim` (a ``matplotlib.figure.Figure``), paper Figure 9: the hidden dim on a
    log2 x axis with a tick at each value present, ``metric`` on y, one line per series of :func:`hidden_dim_sweeps`
    (mean over seeds, sample-std error bars; colour, line style and marker of :func:`run_styles`), the paper's values
    as hollow markers of the series' colour. ValueError when no series has 2+ hidden dims."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    sweeps = hidden_dim_sweeps(rows, metric)
    if not sweeps:
        raise ValueError(f"no hidden-dim sweep of {metric!r} in the runs {[r.get('run') for r in rows]}: a "
                         f"(method, group) needs values of {metric} at 2 or more distinct hidden_dim")
    styles = run_styles(list(sweeps))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    handles, labels, any_paper = [], [], False
    for label, pts in sweeps.items():
        style = styles[label]
        handles.append(_mean_std_line(ax, pts, style))
        labels.append(label)
        paper = [(p[0], p[4]) for p in pts if p[4] is not None]
        if paper:
            any_paper = True
            ax.plot(*zip(*paper), linestyle="none", marker=style["marker"], markersize=9, markerfacecolor="none",
                    markeredgecolor=style["color"], markeredgewidth=1.4, zorder=4)
    dims = sorted({p[0] for pts in sweeps.values() for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims)
    ax.set_xticklabels([str(d) for d in dims])
    ax.xaxis.set_minor_locator(NullLocator())
    if any_paper:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=9, markerfacecolor="none",
                              markeredgecolor="0.3"))
        labels.append("paper (hollow)")
    return _finish(fig, ax, handles, labels, "hidden dim", metric)


def plot_hidden_dim(rows: Sequence[dict], path: str, metric: str = "linear_top1") -> str:
    """The hidden-dim sweeps of ``rows`` (:func:`hidden_dim_figure`) written to the PNG ``path``; returns ``path``."""
    fig = hidden_dim_figure(rows, metric)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------------
# A study's sweep: one metric of compare_distillers cells against one override (tools/collect_studies.py)
#
# ``series``: ``{label: [(x, mean, std or None, n, per-seed values), ...]}`` (transfer.study.sweep_points);
# ``baselines``: ``{label: (mean, std or None)}``.


def is_power_of_two_grid(xs: Sequence[float]) -> bool:
    """True when every x is positive and every ratio between them is a power of two (1, 2, 4, 0.5, ...): such a
    sweep reads best on a log2 axis."""
    import math

    xs = [float(x) for x in xs]
    if not xs or any(not math.isfinite(x) or x <= 0 for x in xs):
        return False
    lo = min(xs)
    return all(abs(math.log2(x / lo) - round(math.log2(x / lo))) < 1e-9 for x in xs)


def sweep_figure(series: Dict[str, List[tuple]], key: str, baselines: Dict[str, tuple] = None,
                 metric_label: str = "linear top-1 (%)"):
    """The figure of :func:`plot_sweep` (a ``matplotlib.figure.Figure``): ``key`` on x with a tick at each value
    present (a log2 axis when :func:`is_power_of_two_grid`), ``metric_label`` on y, one line per series (mean over
    seeds with sample-std error bars, none with one seed; colour, line style and marker of :func:`run_styles`), each
    seed's value as a small dot of the series' colour (one legend entry for all); every baseline a dashed horizontal
    line at its mean with a shaded +-std band, in a colour after the series'. ValueError when no series has a
    point."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    series = {label: list(pts) for label, pts in series.items() if pts}
    if not series:
        raise ValueError(f"no point to plot against {key}: every series is empty")
    baselines = dict(baselines or {})
    styles = run_styles(list(series) + [b for b in baselines if b not in series])
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    handles, labels, any_seed = [], [], False
    for label, pts in series.items():
        style = styles[label]
        handles.append(_mean_std_line(ax, pts, style, zorder=3))
        labels.append(label)
        seeds = [(p[0], v) for p in pts for v in p[4]]
        if seeds:
            ax.scatter(*zip(*seeds), s=14, color=style["color"], alpha=0.6, linewidths=0, zorder=4)
            any_seed = True
    for label, (mean, std) in baselines.items():
        color = styles[label]["color"]
        handles.append(ax.axhline(mean, color=color, linestyle="--", linewidth=1.2, zorder=2))
        labels.append(label)
        if std is not None:
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.15, linewidth=0, zorder=1)
    if any_seed:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=4, color="0.4", alpha=0.6))
        labels.append("one seed (dots)")
    xs = sorted({p[0] for pts in series.values() for p in pts})
    if is_power_of_two_grid(xs):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    if len(xs) == 1:  # matplotlib would widen a single x by +-5 % (a factor of 2 either way on the log axis)
        ax.set_xlim(*((xs[0] / 2, xs[0] * 2) if ax.get_xscale() == "log" else (xs[0] - 1, xs[0] + 1)))
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    return _finish(fig, ax, handles, labels, key, metric_label)


def plot_sweep(series: Dict[str, List[tuple]], path: str, key: str, baselines: Dict[str, tuple] = None,
               metric_label: str = "linear top-1 (%)") -> str:
    """The sweep of ``series`` against ``key`` with ``baselines`` (:func:`sweep_figure`) written to the PNG ``path``;
    returns ``path``."""
    fig = sweep_figure(series, key, baselines, metric_label)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
