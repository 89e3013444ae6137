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
