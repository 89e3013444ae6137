#!/usr/bin/env python
"""Plot training curves (losses, lr, kNN top-1) of one or more runs from their metrics.jsonl to a PNG, and, when
linear evaluations among them recorded it (INFO_PLANE.ENABLED True), their information plane (paper Figure 7) to
a second PNG (default: the curves' name with _info_plane, e.g. curves_info_plane.png).

    python tools/plot_curves.py runs/disco_r50_r18 runs/moco_r18 [--labels DisCo MoCo-v2] [--out curves.png]
    python tools/plot_curves.py runs/lin_disco runs/lin_moco --labels DisCo MoCo-v2 [--info-plane-out plane.png]
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from transfer.plots import (info_plane_paths, labels_for, plan_panels, plot_info_plane,  # noqa: E402
                            plot_training_curves, read_metrics)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR) or metrics.jsonl files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per run (default: the run folder names)")
    p.add_argument("--out", default="", help="PNG to write (default: <first run>/curves.png)")
    p.add_argument("--info-plane-out", default="",
                   help="PNG of the information plane, written when some run has mi_xt / mi_ty records (default: "
                        "the --out name with _info_plane before .png)")
    args = p.parse_args()
    labels = args.labels or labels_for(args.runs)
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        p.error(f"give one distinct label per run ({len(args.runs)} runs, labels {labels})")
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(os.path.abspath(args.runs[0]))
    runs = dict(zip(labels, args.runs))
    data = {label: read_metrics(path) for label, path in runs.items()}
    paths = info_plane_paths(data)
    if args.info_plane_out and not paths:
        p.error("--info-plane-out: no run has information-plane records (mi_xt, mi_ty); run the linear evaluation "
                "with INFO_PLANE.ENABLED True")
    out = plot_training_curves(runs, args.out or os.path.join(first, "curves.png"))
    panels = plan_panels(data)
    print(f"curves of {', '.join(labels)} -> {out} (panels: {', '.join(key for _, key, _, _ in panels)})")
    if paths:
        plane = plot_info_plane(runs, args.info_plane_out or os.path.splitext(out)[0] + "_info_plane.png")
        print(f"information plane of {', '.join(paths)} -> {plane}")


if __name__ == "__main__":
    main()
