#!/usr/bin/env python
"""One markdown table, and sweep plots, of a study made of many tools/compare_distillers.py runs (one --output-dir
per cell of a grid): every (cell, method) of DIR/results.json with the cell's overrides, the teacher, kNN and linear
top-1 as mean +- std over seeds, and each seed's linear top-1.

    python tools/collect_studies.py DIR [DIR ...] [--output FILE.md] [--sweep KEY --method NAME [--default VALUE]
                                    --plot PREFIX] [--baseline DIR:METHOD]
    python tools/collect_studies.py runs/study14/* --output runs/study14/results.md
    python tools/collect_studies.py runs/study14/weight* runs/compare --sweep LOSS.DISCO.WEIGHT --method disco \\
        --default 1.0 --plot runs/study14/weight --baseline runs/compare:mocov2

--sweep writes PREFIX_linear.png and PREFIX_knn.png: linear and kNN top-1 of METHOD against KEY over the cells whose
only override is KEY (with --default, a cell without overrides is the point KEY = VALUE, the config's own value);
every --baseline (repeatable) is that folder's METHOD summary, a horizontal band labelled "METHOD (DIR basename)".
Logic: transfer.study, transfer.plots.
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import HelpFormatter, user_errors  # noqa: E402  (light: no torch)
from transfer.study import load_cells, markdown, sweep_points  # noqa: E402

METRICS = (("linear", "linear top-1 (%)"), ("knn", "kNN top-1 (%)"))  # (PREFIX_<name>.png, y label)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/collect_studies.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="compare_distillers output folders (--output-dir)")
    p.add_argument("--output", default="", metavar="FILE.md", help="also write the table to this file")
    p.add_argument("--sweep", default="", metavar="KEY", help="plot METHOD against this override key")
    p.add_argument("--method", default="", metavar="NAME", help="the method of the sweep (with --sweep)")
    p.add_argument("--default", default=None, metavar="VALUE",
                   help="KEY's value in a cell without overrides, which then joins the sweep (default: left out)")
    p.add_argument("--plot", default="", metavar="PREFIX", help="the sweep's PNGs: PREFIX_linear.png, PREFIX_knn.png")
    p.add_argument("--baseline", action="append", default=[], metavar="DIR:METHOD",
                   help="a horizontal band in the sweep plots: METHOD's mean +- std in the folder DIR (repeatable)")
    return p


def baseline_rows(specs, parser) -> dict:
    """``{"METHOD (DIR basename)": row}`` of the ``DIR:METHOD`` specs (rows of :func:`transfer.study.load_cells`)."""
    out = {}
    for spec in specs:
        folder, sep, method = spec.rpartition(":")
        if not sep or not folder or not method:
            parser.error(f"--baseline {spec!r}: give DIR:METHOD, e.g. runs/compare:mocov2")
        rows = {r["method"]: r for r in load_cells([folder])}
        if method not in rows:
            parser.error(f"--baseline {spec}: {os.path.join(folder, 'results.json')} has no method {method!r} (it "
                         f"has {', '.join(rows) or 'none'})")
        out[f"{method} ({os.path.basename(os.path.normpath(folder))})"] = rows[method]
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep and not (args.method and args.plot):
        parser.error("--sweep needs --method NAME and --plot PREFIX")
    if not args.sweep and (args.method or args.plot or args.default is not None or args.baseline):
        parser.error("--method, --default, --plot and --baseline only go with --sweep KEY")
    with user_errors("collect_studies"):
        rows = load_cells(args.dirs)
        sweeps, baselines = {}, {}
        if args.sweep:  # everything checked before anything is written
            baselines = baseline_rows(args.baseline, parser)
            for metric, _ in METRICS:
                sweeps[metric] = sweep_points(rows, args.sweep, args.method, args.default, metric=metric)
            if not sweeps["linear"]:
                parser.error(f"no cell of {args.method!r} whose only override is {args.sweep}"
                             f"{'' if args.default is None else ' (nor one without overrides)'} among "
                             f"{' '.join(args.dirs)}")
        table = markdown(rows)
        print(table)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(table + "\n")
            print(f"-> {args.output}")
        if sweeps:
            from transfer.plots import plot_sweep

            for metric, label in METRICS:
                points = sweeps[metric]
                path = plot_sweep({args.method: points}, f"{args.plot}_{metric}.png", args.sweep,
                                  {b: r[metric][:2] for b, r in baselines.items()}, metric_label=label)
                print(f"{label} of {args.method} vs {args.sweep} at "
                      f"{', '.join(f'{p[0]:g}' for p in points)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
