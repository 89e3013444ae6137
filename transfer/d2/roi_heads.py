"""C4 ROI heads whose per-region stage is the student's own last stage, so every pretrained weight loads.

detectron2's stock ``Res5ROIHeads`` always builds res5 from three BottleneckBlocks (2048 channels), whatever
``RESNETS.DEPTH`` says: with a ResNet-18/34 student, res5 then has no counterpart in the checkpoint and stays random
(the official DisCo runs silently did this). :func:`build_res5` builds res5 as the ResNet of ``RESNETS.DEPTH`` has it:
BasicBlocks 256 -> 512 (2 blocks for R-18, 3 for R-34) or BottleneckBlocks 1024 -> 2048.
"""
from typing import Tuple

from detectron2.layers import get_norm
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn

# Blocks in res5 (ResNet's conv5_x / torchvision's layer4) per depth.
RES5_BLOCKS = {18: 2, 34: 3, 50: 3, 101: 3, 152: 3}


def build_res5(cfg) -> Tuple[nn.Sequential, int]:
    """res5 of the ResNet of ``cfg.MODEL.RESNETS`` (first block stride 2) -> (module, output channels).

    Input: the res4 feature (``RES2_OUT_CHANNELS * 4`` channels) pooled per box, ``R x C x P x P``; output
    ``R x out_channels x ceil(P/2) x ceil(P/2)``. Keys ``<i>.conv1.weight``, ``<i>.shortcut.norm.bias``, ... as in
    detectron2's backbone res5, so a converted ``layer4`` loads by name.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in RES5_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {r.DEPTH} is not a ResNet depth ({sorted(RES5_BLOCKS)})")
    if r.RES5_DILATION != 1:
        # In a C4 head res5 runs on pooled boxes; detectron2's stock head ignores this key, we refuse it instead.
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION {r.RES5_DILATION} is not supported in a C4 ROI head (res5 "
                         f"runs on pooled regions with stride 2); set it to 1")
    if r.DEFORM_ON_PER_STAGE[-1]:
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE[-1]: deformable convolutions are not supported in the "
                         "res5 ROI head")
    in_channels = r.RES2_OUT_CHANNELS * 4  # res4's output
    num_blocks = RES5_BLOCKS[r.DEPTH]
    stride_per_block = [2] + [1] * (num_blocks - 1)
    if r.DEPTH in (18, 34):
        if r.RES2_OUT_CHANNELS != 64 or r.NUM_GROUPS != 1:
            raise ValueError(f"ResNet-{r.DEPTH} needs MODEL.RESNETS.RES2_OUT_CHANNELS 64 and NUM_GROUPS 1 (got "
                             f"{r.RES2_OUT_CHANNELS}, {r.NUM_GROUPS})")
        out_channels = in_channels * 2  # 256 -> 512
        blocks = ResNet.make_stage(BasicBlock, num_blocks, stride_per_block=stride_per_block,
                                   in_channels=in_channels, out_channels=out_channels, norm=r.NORM)
    else:
        out_channels = r.RES2_OUT_CHANNELS * 8  # 1024 -> 2048 for R-50
        blocks = ResNet.make_stage(BottleneckBlock, num_blocks, stride_per_block=stride_per_block,
                                   in_channels=in_channels, out_channels=out_channels,
                                   bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
                                   num_groups=r.NUM_GROUPS, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1)
    return nn.Sequential(*blocks), out_channels


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsAnyDepth(Res5ROIHeads):
    """``Res5ROIHeads`` with res5 from :func:`build_res5` (BasicBlocks for R-18/34), no extra norm."""

    @classmethod
    def _build_res5_block(cls, cfg) -> Tuple[nn.Sequential, int]:
        return build_res5(cfg)


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """MoCo's C4 head: res5 (:func:`build_res5`) followed by one more norm of ``RESNETS.NORM`` (``res5.norm``).

    res5 ends in a residual sum + ReLU with no normalisation; the extra norm puts the region features on a
    normalised scale for the randomly initialised box / mask predictors. It is new: not in any checkpoint.
    """

    @classmethod
    def _build_res5_block(cls, cfg) -> Tuple[nn.Sequential, int]:
        res5, out_channels = build_res5(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels

