#!/usr/bin/env python
"""Export the student of a pretraining checkpoint (backbone in timm's key names + metadata, head separately), and/or
describe what the checkpoint holds (MB per part: student, momentum encoder and queue, optimizer state, ...).

    python tools/export.py runs/x/checkpoints/model_0005000.pth OUT_DIR
    python tools/export.py runs/x/checkpoints/model_0005000.pth --describe [OUT_DIR]
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an iteration checkpoint written by tools/pretrain.py")
    p.add_argument("out_dir", nargs="?", default="", help="folder for <arch>.pth and <arch>_head.pth")
    p.add_argument("--describe", action="store_true",
                   help="print what the checkpoint holds, in MB per part (and export too if OUT_DIR is given)")
    args = p.parse_args()
    if not args.out_dir and not args.describe:
        p.error("give OUT_DIR (to export) and/or --describe")
    # imported after the command line is checked: --help and a wrong command line never import torch
    from pretrain.export import MB, describe_checkpoint, export_from_checkpoint, format_description

    if args.describe:
        print(format_description(args.checkpoint, *describe_checkpoint(args.checkpoint)))
    if args.out_dir:
        written = 0
        for kind, path in export_from_checkpoint(args.checkpoint, args.out_dir).items():
            size = os.path.getsize(path)
            written += size
            print(f"{kind}: {path} ({size / MB:.2f} MB)")
        total = os.path.getsize(args.checkpoint)
        print(f"wrote {written / MB:.2f} MB from the {total / MB:.2f} MB checkpoint ({100 * written / total:.1f}%): "
              f"the student only; the rest is state needed only to resume training (--describe itemises it)")


if __name__ == "__main__":
    main()
