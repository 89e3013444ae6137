"""Atomic checkpoints, resume with fallback, exports that timm loads, and teacher loading from every known format."""
import glob
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from .backbones import build_backbone, get_spec
from .heads import build_head, infer_head_spec
from .model import Encoder

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "disco-transfer/v1"
_CKPT_RE = re.compile(r"model_(\d+)\.pth$")


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is never a partial file: temp file in the same folder + rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Checkpointer:
    """Iteration checkpoints ``OUTPUT_DIR/checkpoints/model_{iter:07d}.pth``; keeps the newest ``max_to_keep``."""

    def __init__(self, output_dir: str, max_to_keep: int = 3):
        self.dir = os.path.join(output_dir, "checkpoints")
        self.max_to_keep = max_to_keep

    def path(self, iteration: int) -> str:
        return os.path.join(self.dir, f"model_{iteration:07d}.pth")

    def list(self) -> List[str]:
        """Checkpoint paths, newest first."""
        found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(self.dir, "model_*.pth"))
                 if (m := _CKPT_RE.search(os.path.basename(p)))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, iteration: int) -> str:
        path = self.path(iteration)
        save_atomic(state, path)
        for old in self.list()[self.max_to_keep:]:
            os.remove(old)
        return path

    def load_latest(self) -> Tuple[Optional[dict], Optional[str]]:
        """The newest checkpoint that loads; an unreadable one (e.g. truncated) is skipped with a warning."""
        for path in self.list():
            try:
                return torch.load(path, map_location="cpu", weights_only=False), path
            except Exception as e:  # truncated / corrupted file: fall back to the previous one
                logger.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                               type(e).__name__, e)
        return None, None


# ----------------------------------------------------------------------------------------------------------------
# Export


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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an export of this project (no format {EXPORT_FORMAT!r})")
    backbone = build_backbone(ckpt["arch"])
    load_strict(backbone, ckpt["state_dict"], f"exported backbone {path}")
    return backbone, {k: v for k, v in ckpt.items() if k != "state_dict"}


# ----------------------------------------------------------------------------------------------------------------
# Teachers


def _split_teacher_checkpoint(ckpt, path: str) -> Tuple[str, Dict[str, torch.Tensor], Dict[str, torch.Tensor], List[str]]:
    """-> (format name, backbone state dict, head state dict, keys deliberately ignored)."""
    if isinstance(ckpt, dict) and ckpt.get("format") == EXPORT_FORMAT:
        head_path = os.path.join(os.path.dirname(path), ckpt["head_file"])
        if not os.path.isfile(head_path):
            raise FileNotFoundError(f"teacher export {path} names its projection head {ckpt['head_file']}, which is "
                                    f"missing; copy it next to the backbone file")
        head = torch.load(head_path, map_location="cpu", weights_only=True)["state_dict"]
        return "export", dict(ckpt["state_dict"]), dict(head), []
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a checkpoint this project knows (expected our export, a MoCo-v1/v2 .pth.tar "
                         f"or a SwAV state dict)")
    backbone, head, ignored = {}, {}, []
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in sd):  # MoCo v1 / v2
        fmt = "moco"
        for k, v in sd.items():
            k2 = k[len("module."):] if k.startswith("module.") else k
            if k2.startswith("encoder_q.fc."):
                head_key = k2[len("encoder_q.fc."):]
                head["0." + head_key if head_key in ("weight", "bias") else head_key] = v  # v1: one Linear "fc"
            elif k2.startswith("encoder_q."):
                backbone[k2[len("encoder_q."):]] = v
            else:  # encoder_k.*, queue, queue_ptr: the teacher's own MoCo state, never loaded anywhere
                ignored.append(k)
    elif any(k.startswith(("module.projection_head.", "projection_head.")) for k in sd):  # SwAV
        fmt = "swav"
        for k, v in sd.items():
            k2 = k[len("module."):] if k.startswith("module.") else k
            if k2.startswith("projection_head."):
                head[k2[len("projection_head."):]] = v
            elif k2.startswith("prototypes."):
                ignored.append(k)
            else:
                backbone[k2] = v
    else:
        raise ValueError(f"{path}: cannot tell the checkpoint format (first keys: {sorted(sd)[:5]}); expected our "
                         f"export, MoCo ('module.encoder_q.*') or SwAV ('module.projection_head.*')")
    if not head:
        raise ValueError(f"{path}: no projection head in the checkpoint; DisCo distils the teacher's head output")
    return fmt, backbone, head, ignored


def load_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that fails with the full lists of missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shape:
        raise KeyError(f"{what} does not match the model.\n  missing keys ({len(missing)}): {missing}\n  unexpected "
                       f"keys ({len(unexpected)}): {unexpected}\n  shape mismatches ({len(shape)}): {shape}\nCheck "
                       f"that the architecture (MODEL.*.ARCH) is the one the checkpoint was trained with.")
    module.load_state_dict(state_dict, strict=True)


def load_teacher(path: str, arch: str) -> Tuple[Encoder, dict]:
    """Build ``arch`` and its pretrained projection head from ``path`` (our export, MoCo-v1/v2, SwAV).

    Returns the encoder and a description (format, ignored keys, head spec). Only the teacher's query encoder and
    head are read: a MoCo checkpoint's queue / key encoder are reported as ignored and never touch the student.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist (MODEL.TEACHER.WEIGHTS)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    fmt, backbone_sd, head_sd, ignored = _split_teacher_checkpoint(ckpt, path)
    backbone = build_backbone(arch)
    load_strict(backbone, backbone_sd, f"teacher backbone from {path} ({fmt} format, MODEL.TEACHER.ARCH {arch})")
    spec = infer_head_spec(head_sd)
    if spec["in_dim"] != get_spec(arch).feature_dim:
        raise ValueError(f"{path}: the projection head takes {spec['in_dim']}-d features but {arch} gives "
                         f"{get_spec(arch).feature_dim}-d; is MODEL.TEACHER.ARCH right?")
    head = build_head(**spec)
    load_strict(head, head_sd, f"teacher projection head from {path}")
    return Encoder(backbone, head), {"format": fmt, "ignored_keys": ignored, "head": spec}
