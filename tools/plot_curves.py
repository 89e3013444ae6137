#!/usr/bin/env python
"""Plot training curves (losses, lr, kNN top-1) of one or more runs from their metrics.jsonl to a PNG.

    python tools/plot_curves.py runs/disco_r50_r18 runs/moco_r18 [--labels DisCo MoCo-v2] [--out curves.png]
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from transfer.plots import labels_for, plan_panels, plot_training_curves, read_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR) or metrics.jsonl files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per run (default: the run folder names)")
    p.add_argument("--out", default="", help="PNG to write (default: <first run>/curves.png)")
    args = p.parse_args()
    labels = args.labels or labels_for(args.runs)
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        p.error(f"give one distinct label per run ({len(args.runs)} runs, labels {labels})")
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(os.path.abspath(args.runs[0]))
    runs = dict(zip(labels, args.runs))
    out = plot_training_curves(runs, args.out or os.path.join(first, "curves.png"))
    panels = plan_panels({label: read_metrics(path) for label, path in runs.items()})
    print(f"curves of {', '.join(labels)} -> {out} (panels: {', '.join(key for _, key, _, _ in panels)})")


if __name__ == "__main__":
    main()
