#!/usr/bin/env python
"""Export the student of a pretraining checkpoint (backbone in timm's key names + metadata, head separately).

    python tools/export.py runs/x/checkpoints/model_0005000.pth OUT_DIR
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.export import export_from_checkpoint  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="an iteration checkpoint written by tools/pretrain.py")
    p.add_argument("out_dir", help="folder for <arch>.pth and <arch>_head.pth")
    args = p.parse_args()
    for kind, path in export_from_checkpoint(args.checkpoint, args.out_dir).items():
        print(f"{kind}: {path}")
