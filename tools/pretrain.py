#!/usr/bin/env python
"""Pretrain a teacher with MoCo-v2 or distil a student with DisCo.

    python tools/pretrain.py --config-file configs/pretrain/quickstart.yaml [KEY VALUE ...] [--num-gpus N] [--resume]
    python tools/pretrain.py --slurm --partition P --nodes 1 --gpus-per-node 8 --config-file ... [--wait]

Writes OUTPUT_DIR/config.yaml, log.txt, metrics.jsonl, checkpoints/ and, at the end, export/ (the backbone and head
for the evaluators). A rerun continues from OUTPUT_DIR's newest checkpoint. Logic: pretrain.launch / pretrain.trainer.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import argument_parser  # noqa: E402  (light: --help and argument errors never import torch)


def build_parser():
    return argument_parser("pretrain", __doc__)


if __name__ == "__main__":
    args = build_parser().parse_args()
    from pretrain.launch import main

    main(args)
