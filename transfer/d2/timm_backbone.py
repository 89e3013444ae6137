"""The timm students (EfficientNet-B0/B1, MobileNetV3-Large) as detectron2 backbones, C4 or FPN.

C4: ``build_timm_backbone`` returns the stride-16 feature (``res4``); :class:`TimmStageROIHeads` runs the rest of the
same timm model (the stride-32 blocks and, for EfficientNet, ``conv_head`` + ``bn2``) on each pooled box, so every
pretrained weight up to timm's ``forward_features`` output loads. FPN: ``build_timm_fpn_backbone`` puts
detectron2's FPN on the ``res2``..``res5`` features. Module names below ``body.`` / ``res5.`` are timm's own
(``blocks.5.0.conv_pw``), which keeps the converter's table (``transfer.convert.TIMM_LAYOUTS``) a prefix rule.
"""
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn

from transfer.convert import TimmLayout, get_timm_layout

FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# index into timm's feature_info (strides 2, 4, 8, 16, 32)
_FEATURE_INDEX = {"res2": 1, "res3": 2, "res4": 3, "res5": 4}
NORMS = ("BN", "SyncBN", "FrozenBN")


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Turn timm's BatchNorm layers into ``norm``. timm's own converters are used because they keep the activation
    of ``BatchNormAct2d`` (detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm`` would replace the whole layer
    and drop it). SyncBN on one process (no process group) computes plain BatchNorm."""
    if norm == "BN":
        return module
    if norm == "SyncBN":
        return convert_sync_batchnorm(module)
    if norm == "FrozenBN":
        return freeze_batch_norm_2d(module)
    raise ValueError(f"MODEL.TIMM.NORM {norm!r}: expected one of {NORMS}")


def _check_feature_info(layout: TimmLayout, feature_info) -> None:
    """The converter's table must describe the model timm builds (guards against a timm version change)."""
    for name, idx in _FEATURE_INDEX.items():
        info = feature_info[idx]
        want = f"blocks.{layout.feature_blocks[name]}"
        if info["module"] != want or info["reduction"] != FEATURE_STRIDES[name]:
            raise RuntimeError(f"timm's {layout.timm_arch} has its stride-{FEATURE_STRIDES[name]} feature at "
                               f"{info['module']} (stride {info['reduction']}), transfer.convert.TIMM_LAYOUTS says "
                               f"{want}; update the table for this timm version")


class TimmBackbone(Backbone):
    """A timm ``features_only`` student truncated after its last requested feature; ``forward`` returns
    ``{name: N x C x H/stride x W/stride}`` for ``out_features`` among res2 (1/4) .. res5 (1/32)."""

    def __init__(self, arch: str, out_features: Sequence[str], norm: str = "BN", freeze_at: int = 0):
        super().__init__()
        layout = get_timm_layout(arch)
        unknown = [f for f in out_features if f not in FEATURE_STRIDES]
        if unknown or not out_features:
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES {list(out_features)}: expected a non-empty subset of "
                             f"{list(FEATURE_STRIDES)}")
        self._out_features = sorted(out_features, key=FEATURE_STRIDES.get)
        self.body = timm.create_model(layout.timm_arch, pretrained=False, features_only=True,
                                      out_indices=tuple(_FEATURE_INDEX[f] for f in self._out_features))
        _check_feature_info(layout, self.body.feature_info.info)  # .info: all levels, not only out_indices
        # Blocks after the last requested feature are not part of this backbone (in C4 they are the ROI stage).
        self.body.blocks = self.body.blocks[: layout.feature_blocks[self._out_features[-1]] + 1]
        channels = dict(zip(self._out_features, self.body.feature_info.channels()))
        self._out_feature_channels = {f: channels[f] for f in self._out_features}
        self._out_feature_strides = {f: FEATURE_STRIDES[f] for f in self._out_features}
        self.body = convert_norm(self.body, norm)
        self._freeze(layout, freeze_at)

    def _freeze(self, layout: TimmLayout, freeze_at: int) -> None:
        """detectron2's ``BACKBONE.FREEZE_AT``: 1 freezes the stem, k >= 2 also the blocks up to res{k}'s feature
        (no gradient, BatchNorm frozen)."""
        if freeze_at <= 0:
            return
        for name in layout.stem:
            setattr(self.body, name, self._frozen(getattr(self.body, name)))
        if freeze_at >= 2:
            last = layout.feature_blocks[f"res{min(freeze_at, 5)}"]
            for i in range(min(last + 1, len(self.body.blocks))):
                self.body.blocks[i] = self._frozen(self.body.blocks[i])

    @staticmethod
    def _frozen(module: nn.Module) -> nn.Module:
        module = freeze_batch_norm_2d(module)
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self._out_features, self.body(x)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


class TimmROIStage(nn.Module):
    """The part of a timm student after its stride-16 feature, run on pooled regions: ``blocks.<c4_split>..`` (first
    one stride 2) then, where timm's ``forward_features`` has them, ``conv_head`` and ``bn2`` (BatchNorm + act).
    ``R x C16 x P x P -> R x out_channels x ceil(P/2) x ceil(P/2)``."""

    def __init__(self, arch: str, norm: str = "BN"):
        super().__init__()
        layout = get_timm_layout(arch)
        model = timm.create_model(layout.timm_arch, pretrained=False, num_classes=0)
        # keep timm's block indices as names (blocks.5, blocks.6), so the checkpoint keys are timm's unchanged
        self.blocks = nn.Sequential(OrderedDict(
            (str(i), model.blocks[i]) for i in range(layout.c4_split, len(model.blocks))))
        self._after = list(layout.after_blocks)
        for name in self._after:
            setattr(self, name, getattr(model, name))
        self.out_channels = (model.conv_head.out_channels if "conv_head" in self._after
                             else model.feature_info[-1]["num_chs"])
        convert_norm(self, norm)  # replaces the BatchNorm children in place (self is not a BatchNorm itself)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        for name in self._after:
            x = getattr(self, name)(x)
        return x


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """``MODEL.TIMM.ARCH`` as a backbone with ``MODEL.TIMM.OUT_FEATURES`` (C4: ["res4"])."""
    if input_shape.channels != 3:
        raise ValueError(f"the timm students take 3-channel images, got {input_shape.channels} (MODEL.PIXEL_MEAN)")
    return TimmBackbone(cfg.MODEL.TIMM.ARCH, cfg.MODEL.TIMM.OUT_FEATURES, cfg.MODEL.TIMM.NORM,
                        cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """FPN (``MODEL.FPN.*``, P2-P6 with the max-pooled top level) on the timm backbone's ``MODEL.FPN.IN_FEATURES``."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@ROI_HEADS_REGISTRY.register()
class TimmStageROIHeads(Res5ROIHeads):
    """C4 ROI heads whose per-region stage is :class:`TimmROIStage` (as ``self.res5``) of ``MODEL.TIMM.ARCH``."""

    @classmethod
    def _build_res5_block(cls, cfg) -> Tuple[nn.Module, int]:
        if list(cfg.MODEL.ROI_HEADS.IN_FEATURES) != ["res4"]:
            raise ValueError(f"TimmStageROIHeads continues the student after its stride-16 feature: "
                             f"MODEL.ROI_HEADS.IN_FEATURES must be ['res4'], got {cfg.MODEL.ROI_HEADS.IN_FEATURES}")
        stage = TimmROIStage(cfg.MODEL.TIMM.ARCH, cfg.MODEL.TIMM.NORM)
        return stage, stage.out_channels


__all__: List[str] = ["TimmBackbone", "TimmROIStage", "TimmStageROIHeads", "build_timm_backbone",
                      "build_timm_fpn_backbone", "convert_norm"]
