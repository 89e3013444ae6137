#!/usr/bin/env python
"""t-SNE of frozen features of N classes (the paper's Figure 8), one panel per model, written to OUTPUT_DIR/tsne.png.

    python tools/tsne.py --config-file configs/eval/tsne_imagenet.yaml DATA.TRAIN_DIR /datasets/imagenet/train \
        DATA.VAL_DIR /datasets/imagenet/val MODEL.WEIGHTS runs/moco_effb0/export/efficientnet_b0.pth \
        TSNE.COMPARE_WEIGHTS "['moco_v2_200ep_pretrain.pth.tar', 'runs/disco_r50_effb0/export/efficientnet_b0.pth']" \
        TSNE.COMPARE_ARCHS "['resnet50', '']" OUTPUT_DIR runs/tsne
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.launch import argument_parser, launch_main  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.tsne import run  # noqa: E402

if __name__ == "__main__":
    launch_main(run, argument_parser(__doc__).parse_args(), "tsne", lambda a: setup_eval_cfg(a.config_file, a.opts))
