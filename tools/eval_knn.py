#!/usr/bin/env python
"""Weighted kNN evaluation of a frozen backbone (DINO's protocol) on ImageFolder or CIFAR data.

    python tools/eval_knn.py --config-file configs/eval/knn_imagenet.yaml \
        MODEL.WEIGHTS runs/disco_r50_r18/export/resnet18.pth DATA.TRAIN_DIR /datasets/imagenet/train \
        DATA.VAL_DIR /datasets/imagenet/val OUTPUT_DIR runs/knn_r18 [KNN.K 20 KNN.TEMPERATURE 0.07] [--num-gpus 8]

Writes OUTPUT_DIR/results.json and prints one summary line.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.launch import argument_parser, launch_main  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.knn import run  # noqa: E402

if __name__ == "__main__":
    launch_main(run, argument_parser(__doc__).parse_args(), "eval_knn", lambda a: setup_eval_cfg(a.config_file, a.opts))
