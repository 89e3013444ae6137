#!/usr/bin/env python
"""t-SNE of frozen features of N classes (the paper's Figure 8), one panel per model, written to OUTPUT_DIR/tsne.png.

    python tools/tsne.py --config-file configs/eval/tsne_imagenet.yaml DATA.TRAIN_DIR /datasets/imagenet/train \\
        DATA.VAL_DIR /datasets/imagenet/val MODEL.WEIGHTS runs/moco_effb0/export/efficientnet_b0.pth \\
        TSNE.COMPARE_WEIGHTS "['moco_v2_200ep_pretrain.pth.tar', 'runs/disco_r50_effb0/export/efficientnet_b0.pth']" \\
        TSNE.COMPARE_ARCHS "['resnet50', '']" OUTPUT_DIR runs/tsne

It trains nothing: no --resume or --eval-only. Logic: transfer.tsne.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import argument_parser  # noqa: E402  (light: --help and argument errors never import torch)


def build_parser():
    return argument_parser("tsne", __doc__)


if __name__ == "__main__":
    args = build_parser().parse_args()
    from pretrain.launch import launch_main
    from transfer.config import setup_eval_cfg
    from transfer.tsne import run

    launch_main(run, args, "tsne", lambda a: setup_eval_cfg(a.config_file, a.opts))
