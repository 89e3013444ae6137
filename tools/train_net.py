#!/usr/bin/env python
"""Fine-tune a converted student in detectron2 (C4 Faster R-CNN on VOC, Mask R-CNN C4 on COCO) and evaluate it.

    python tools/convert_to_d2.py runs/disco_r18/export/resnet18.pth r18.pkl
    python tools/train_net.py --config-file configs/detection/voc/r18_C4_24k.yaml --num-gpus 8 \\
        MODEL.WEIGHTS r18.pkl OUTPUT_DIR runs/det/voc_r18
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS runs/det/voc_r18/model_final.pth
    python tools/train_net.py --config-file ... --slurm --gpus-per-node 8 --partition learnfair ...

Datasets under $DETECTRON2_DATASETS (VOC2007/, VOC2012/, coco/) or the synthetic ones (DATASETS.SYNTHETIC_ROOT).
Writes detectron2's outputs to OUTPUT_DIR (model_*.pth, metrics.json, log.txt) and results.json with the final
evaluation. Logic: transfer.d2.train.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import argument_parser, user_errors  # noqa: E402  (light: --help never imports torch)


def build_parser():
    return argument_parser("train_net", __doc__)


if __name__ == "__main__":
    args = build_parser().parse_args()
    from transfer.d2.train import main

    with user_errors("train_net"):  # main refuses some flag combinations before launch_main checks the config
        main(args)
