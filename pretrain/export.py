"""Exports: the student's backbone in timm key names (``timm.create_model(arch, num_classes=0,
checkpoint_path=...)`` loads it strictly) and its projection head, with the run's metadata."""
import logging
import os
from typing import Dict, Tuple

import torch

from .backbones import build_backbone, get_spec
from .checkpoint import load_strict, save_atomic
from .encoder import Encoder
from .formats import EXPORT_FORMAT, method_description, read_backbone
from .heads import build_head, infer_head_spec
from .safeload import load_torch

logger = logging.getLogger(__name__)


def export_encoder(encoder: Encoder, arch: str, out_dir: str, name: str, metadata: dict) -> Dict[str, str]:
    """Write ``{name}.pth`` (backbone in timm key names + metadata; ``timm.create_model(arch, num_classes=0,
    checkpoint_path=...)`` loads it strictly) and ``{name}_head.pth`` (the projection head, kept separately)."""
    backbone_path = os.path.join(out_dir, f"{name}.pth")
    head_path = os.path.join(out_dir, f"{name}_head.pth")
    head_sd = {k: v.detach().cpu().clone() for k, v in encoder.head.state_dict().items()}
    meta = dict(metadata, format=EXPORT_FORMAT, arch=arch, timm_arch=get_spec(arch).timm_arch,
                head_file=os.path.basename(head_path), head=infer_head_spec(head_sd))
    save_atomic({"state_dict": {k: v.detach().cpu().clone() for k, v in encoder.backbone.state_dict().items()},
                 **meta}, backbone_path)
    save_atomic({"state_dict": head_sd, **meta}, head_path)
    return {"backbone": backbone_path, "head": head_path}


def load_exported_backbone(path: str) -> Tuple[torch.nn.Module, dict]:
    """(backbone with the exported weights, metadata) from a ``{arch}.pth`` written by :func:`export_encoder`."""
    ckpt = load_torch(path, "exported backbone")
    if not isinstance(ckpt, dict) or ckpt.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an export of this project (no format {EXPORT_FORMAT!r})")
    backbone = build_backbone(ckpt["arch"])
    load_strict(backbone, ckpt["state_dict"], f"exported backbone {path}")
    return backbone, {k: v for k, v in ckpt.items() if k != "state_dict"}


def export_student(encoder: Encoder, cfg, iteration: int, epoch: int, out_dir: str = "") -> Dict[str, str]:
    """Write the student's backbone (timm keys) and head to ``out_dir`` (default ``OUTPUT_DIR/export``), with the
    method, the schedule position, the config and the teacher in the metadata. Rank 0 writes; others return {}."""
    from .distributed import is_main_process

    if not is_main_process():
        return {}
    arch = cfg.MODEL.STUDENT.ARCH
    distilled = bool(cfg.METHOD.DISTILLERS) if not isinstance(cfg.METHOD, str) else cfg.METHOD == "disco"
    meta = {"method": method_description(cfg), "epoch": epoch, "iteration": iteration,
            "feature_dim": get_spec(arch).feature_dim, "config": cfg.dump(),
            "teacher": {"arch": cfg.MODEL.TEACHER.ARCH, "weights": cfg.MODEL.TEACHER.WEIGHTS} if distilled else None}
    paths = export_encoder(encoder, arch, out_dir or os.path.join(cfg.OUTPUT_DIR, "export"), arch, meta)
    logger.info("exported %s", paths)
    return paths


def export_from_checkpoint(checkpoint: str, out_dir: str) -> Dict[str, str]:
    """Export the student of an iteration checkpoint (``OUTPUT_DIR/checkpoints/model_*.pth``); its config travels
    inside the checkpoint."""
    from fvcore.common.config import CfgNode

    ckpt = read_backbone(checkpoint, what="pretraining checkpoint")
    if ckpt.format != "pretrain-checkpoint":
        raise ValueError(f"{checkpoint} is not a pretraining checkpoint of this project (it reads as {ckpt.format}); "
                         f"give OUTPUT_DIR/checkpoints/model_<iter>.pth")
    encoder = Encoder(build_backbone(ckpt.arch), build_head(**infer_head_spec(ckpt.head)))
    load_strict(encoder.backbone, ckpt.state_dict, f"student backbone of {checkpoint}")
    load_strict(encoder.head, ckpt.head, f"student head of {checkpoint}")
    cfg = CfgNode.load_cfg(ckpt.metadata["config"])
    return export_student(encoder, cfg, ckpt.metadata["iteration"], ckpt.metadata["epoch"], out_dir)
