#!/usr/bin/env python
"""Pretrain a teacher with MoCo-v2 or distil a student with DisCo.

    python tools/pretrain.py --config-file configs/pretrain/quickstart.yaml [--num-gpus N] [--resume] [KEY VALUE ...]
    python tools/pretrain.py --slurm --partition P --nodes 1 --gpus-per-node 8 --config-file ... [--wait]
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.launch import argument_parser, main  # noqa: E402

if __name__ == "__main__":
    main(argument_parser().parse_args())
