"""detectron2 extensions for the detection transfer; importing this package registers them.

- ROI heads (``ROI_HEADS_REGISTRY``): ``Res5ROIHeadsExtraNorm`` (MoCo's C4 head, res5 + one more norm) and
  ``Res5ROIHeadsAnyDepth`` (no extra norm), both with res5 built for ``RESNETS.DEPTH`` (BasicBlocks for R-18/34);
  ``TimmStageROIHeads`` (the timm student's stride-32 stage as the per-region head).
- Backbones (``BACKBONE_REGISTRY``): ``build_timm_backbone``, ``build_timm_fpn_backbone``.
- Config: ``get_cfg()`` / ``add_disco_config(cfg)``; weights: ``check_pretrained_load``.
"""
from .config import CfgNode, add_disco_config, get_cfg
from .roi_heads import Res5ROIHeadsAnyDepth, Res5ROIHeadsExtraNorm, build_res5
from .timm_backbone import (TimmBackbone, TimmROIStage, TimmStageROIHeads, build_timm_backbone,
                            build_timm_fpn_backbone)
from .weights import LoadReport, check_pretrained_load, default_config, describe_model_cfg, layout_of

__all__ = ["CfgNode", "add_disco_config", "get_cfg", "Res5ROIHeadsAnyDepth", "Res5ROIHeadsExtraNorm", "build_res5",
           "TimmBackbone", "TimmROIStage", "TimmStageROIHeads", "build_timm_backbone", "build_timm_fpn_backbone",
           "LoadReport", "check_pretrained_load", "default_config", "describe_model_cfg", "layout_of"]
