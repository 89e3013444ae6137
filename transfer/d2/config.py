"""detectron2 config for the detection transfer: detectron2's defaults + this project's keys, strict yaml.

``get_cfg()`` is detectron2's default config as a :class:`CfgNode` that rejects duplicated yaml keys in every file
of a ``_BASE_`` chain (PyYAML silently keeps the last one), with :func:`add_disco_config` applied.
"""
from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg as _d2_get_cfg

from pretrain.cfgnode import StrictYamlMixin


class CfgNode(StrictYamlMixin, _D2CfgNode):
    """detectron2's CfgNode; ``merge_from_file`` raises ``DuplicateKeyError`` naming the key, line and file."""


def add_disco_config(cfg: _D2CfgNode) -> None:
    """Add this project's keys (with their defaults) to a detectron2 config, in place."""
    CN = type(cfg)
    # Root of the synthetic detection sets (tools/make_data.py): when set, <root>/VOC2007 is registered as
    # shapes_voc_2007_trainval / shapes_voc_2007_test and <root>/coco as shapes_coco_train / shapes_coco_val.
    cfg.DATASETS.SYNTHETIC_ROOT = ""

    # Iterations between training log lines (loss, lr, time per iteration, ETA: detectron2's CommonMetricPrinter)
    # and metrics.json / TensorBoard entries; detectron2 hard-codes 20 (DefaultTrainer.build_hooks' PeriodicWriter).
    # The instant tests use 1, so a few-iteration CPU run shows its progress from the first iteration.
    cfg.SOLVER.LOG_PERIOD = 20

    cfg.MODEL.TIMM = CN()
    # Student architecture for BACKBONE.NAME build_timm_backbone / build_timm_fpn_backbone: a pretrain.backbones
    # registry name (efficientnet_b0, efficientnet_b1, mobilenetv3_large_100).
    cfg.MODEL.TIMM.ARCH = ""
    # Features the timm backbone returns, named by stride like ResNet's: res2 (1/4), res3 (1/8), res4 (1/16),
    # res5 (1/32). C4 uses ["res4"] (the stride-32 stage runs in TimmStageROIHeads); FPN uses res2..res5.
    cfg.MODEL.TIMM.OUT_FEATURES = ["res4"]
    # Norm of every timm BatchNorm (backbone and ROI stage): "BN", "SyncBN" (one process: plain BN) or "FrozenBN".
    cfg.MODEL.TIMM.NORM = "FrozenBN"


def get_cfg() -> CfgNode:
    """detectron2's default config (as a strict-yaml :class:`CfgNode`) with this project's keys added."""
    cfg = CfgNode(_d2_get_cfg())
    add_disco_config(cfg)
    return cfg
