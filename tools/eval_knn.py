#!/usr/bin/env python
"""Weighted kNN evaluation of a frozen backbone (DINO's protocol) on ImageFolder or CIFAR data.

    python tools/eval_knn.py --config-file configs/eval/knn_imagenet.yaml \\
        MODEL.WEIGHTS runs/disco_r50_r18/export/resnet18.pth DATA.TRAIN_DIR /datasets/imagenet/train \\
        DATA.VAL_DIR /datasets/imagenet/val OUTPUT_DIR runs/knn_r18 [KNN.K 20 KNN.TEMPERATURE 0.07] [--num-gpus 8]

Writes OUTPUT_DIR/results.json and prints one summary line. It trains nothing: no --resume or --eval-only.
Logic: transfer.knn.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import argument_parser  # noqa: E402  (light: --help and argument errors never import torch)


def build_parser():
    return argument_parser("eval_knn", __doc__)


if __name__ == "__main__":
    args = build_parser().parse_args()
    from pretrain.launch import launch_main
    from transfer.config import setup_eval_cfg
    from transfer.knn import run

    launch_main(run, args, "eval_knn", lambda a: setup_eval_cfg(a.config_file, a.opts))
