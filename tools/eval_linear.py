#!/usr/bin/env python
"""Linear evaluation of a frozen backbone: ImageNet, semi-supervised 1 % / 10 % subsets, CIFAR-10/100.

    python tools/eval_linear.py --config-file configs/eval/linear_imagenet_resnet.yaml \\
        MODEL.WEIGHTS runs/disco_r50_r18/export/resnet18.pth DATA.TRAIN_DIR /datasets/imagenet/train \\
        DATA.VAL_DIR /datasets/imagenet/val OUTPUT_DIR runs/linear_r18 [--num-gpus 8] [--eval-only] [--resume]
    python tools/eval_linear.py --slurm --partition P --gpus-per-node 8 --config-file ... [--wait]

Writes OUTPUT_DIR/results.json and prints one summary line; reruns continue from OUTPUT_DIR's newest checkpoint.
Knowledge distillation (paper Table 2 "KD"): add KD.TEACHER_CLASSIFIER <the teacher's own linear-evaluation
OUTPUT_DIR> (configs/eval/table2_kd_resnet.yaml / table2_kd_mobile.yaml).
Logic: transfer.linear.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import argument_parser  # noqa: E402  (light: --help and argument errors never import torch)


def build_parser():
    return argument_parser("eval_linear", __doc__)


if __name__ == "__main__":
    args = build_parser().parse_args()
    from pretrain.launch import launch_main
    from transfer.config import setup_eval_cfg
    from transfer.linear import run

    launch_main(run, args, "eval_linear", lambda a: setup_eval_cfg(a.config_file, a.opts))
