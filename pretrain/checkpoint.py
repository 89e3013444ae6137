"""Atomic checkpoints, resume with fallback, exports that timm loads, and teacher loading from every known format."""
import functools
import glob
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .backbones import BACKBONES, build_backbone, get_spec
from .heads import build_head, infer_head_spec
from .model import Encoder

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "disco-transfer/v1"
_CKPT_RE = re.compile(r"model_(\d+)\.pth$")


def save_atomic(obj, path: str, dump: Callable = torch.save) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is never a partial file: temp file in the same folder + rename.
    ``dump(obj, file)`` serialises (``torch.save``; ``pickle.dump`` for detectron2's ``.pkl``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            dump(obj, f)
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
# Reading backbones (and their projection heads) from every checkpoint format we know


@dataclass
class BackboneCheckpoint:
    """A backbone read from a checkpoint: ``state_dict`` in timm key names (what ``build_backbone(arch)`` loads
    strictly), the projection head / classifier found beside it (``head``, prefix stripped; may be empty), the
    format name, and every key deliberately left out with the reason (``skipped``)."""

    arch: str
    state_dict: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    format: str
    skipped: Dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


# Where a backbone's classifier / projection head lives in timm models (and MoCo's / DisCo-pytorch's encoder_q).
_HEAD_PREFIXES = ("fc.", "classifier.", "head.")
# A key that any known backbone has: a state dict with one of these is a bare backbone (torchvision / timm).
_STEM_KEYS = ("conv1.weight", "conv_stem.weight", "patch_embed.proj.weight", "patch_embed.proj.0.0.weight",
              "features.0.0.weight")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _split_encoder(sd: Dict[str, torch.Tensor], prefix: str, skipped: Dict[str, str]):
    """Keys under ``prefix`` -> (backbone, head); every other key is recorded in ``skipped``."""
    backbone, head = {}, {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            what = ("the momentum (key) encoder" if "encoder_k" in k else "the MoCo queue" if "queue" in k
                    else "the teacher" if "teacher" in k else "not the student's query encoder")
            skipped[k] = f"{what}; only {prefix}* is the backbone"
            continue
        k2 = k[len(prefix):]
        if k2.startswith(_HEAD_PREFIXES):
            head_key = k2.split(".", 1)[1]
            # MoCo v1: one Linear "fc"; keep the Sequential layout of pretrain.heads (index 0)
            head["0." + head_key if head_key in ("weight", "bias") else head_key] = v
            skipped[k] = "projection head / classifier (not part of the backbone)"
        else:
            backbone[k2] = v
    return backbone, head


def _parse_checkpoint(ckpt, path: str) -> Tuple[str, Optional[str], Dict[str, torch.Tensor], Dict[str, torch.Tensor],
                                                  Dict[str, str], dict]:
    """-> (format, arch or None, backbone state dict, head state dict, skipped {key: reason}, metadata)."""
    skipped: Dict[str, str] = {}
    if isinstance(ckpt, dict) and ckpt.get("format") == EXPORT_FORMAT:
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        head_path = os.path.join(os.path.dirname(path), ckpt.get("head_file", ""))
        head = {}
        if ckpt.get("head_file") and os.path.isfile(head_path):
            head = dict(torch.load(head_path, map_location="cpu", weights_only=True)["state_dict"])
        return "export", ckpt["arch"], dict(ckpt["state_dict"]), head, skipped, meta
    if isinstance(ckpt, dict) and "student" in ckpt and "cfg" in ckpt:  # our iteration checkpoint (model_*.pth)
        from fvcore.common.config import CfgNode

        cfg = CfgNode.load_cfg(ckpt["cfg"])
        backbone, head = {}, {}
        for k, v in ckpt["student"].items():
            if k.startswith("encoder_q.backbone."):
                backbone[k[len("encoder_q.backbone."):]] = v
            elif k.startswith("encoder_q.head."):
                head[k[len("encoder_q.head."):]] = v
            else:
                skipped[k] = "the momentum encoder / queue of the pretraining run"
        meta = {"method": cfg.METHOD, "iteration": ckpt.get("iter"), "epoch": ckpt.get("epoch")}
        return "pretrain-checkpoint", cfg.MODEL.STUDENT.ARCH, backbone, head, skipped, meta
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a checkpoint this project knows (expected our export or pretraining "
                         f"checkpoint, a MoCo-v1/v2 or DisCo-pytorch .pth.tar, a SwAV or a timm/torchvision state "
                         f"dict)")
    arch = ckpt.get("arch") if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), str) else None
    meta = {k: ckpt[k] for k in ("epoch", "arch") if isinstance(ckpt, dict) and k in ckpt}
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in sd):
        # MoCo v1/v2 and DisCo-pytorch (whose student is MoCo's encoder_q; its teacher copies are skipped)
        fmt = "disco-pytorch" if any("teacher" in k for k in sd) else "moco"
        prefix = "module.encoder_q." if any(k.startswith("module.encoder_q.") for k in sd) else "encoder_q."
        backbone, head = _split_encoder(sd, prefix, skipped)
        return fmt, arch, backbone, head, skipped, meta
    stripped = {_strip(k, "module."): v for k, v in sd.items()}
    if any(k.startswith("projection_head.") for k in stripped):  # SwAV
        backbone, head = {}, {}
        for k, v in sd.items():
            k2 = _strip(k, "module.")
            if k2.startswith("projection_head."):
                head[k2[len("projection_head."):]] = v
                skipped[k] = "SwAV projection head (not part of the backbone)"
            elif k2.startswith("prototypes."):
                skipped[k] = "SwAV prototypes"
            else:
                backbone[k2] = v
        return "swav", arch, backbone, head, skipped, meta
    if any(k in stripped for k in _STEM_KEYS):  # a bare backbone (torchvision / timm / supervised)
        backbone = {}
        for k, v in sd.items():
            k2 = _strip(k, "module.")
            if k2.startswith(_HEAD_PREFIXES):
                skipped[k] = "classifier (not part of the backbone)"
            else:
                backbone[k2] = v
        return "state_dict", arch, backbone, {}, skipped, meta
    raise ValueError(f"{path}: cannot tell the checkpoint format (first keys: {sorted(sd)[:5]}); expected our "
                     f"export, MoCo / DisCo-pytorch ('module.encoder_q.*'), SwAV ('module.projection_head.*') or a "
                     f"backbone state dict")


@functools.lru_cache(maxsize=None)
def arch_signature(arch: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of ``build_backbone(arch)``'s state dict."""
    with torch.device("meta"):  # shapes only: no memory, milliseconds even for R-152
        return {k: tuple(v.shape) for k, v in build_backbone(arch).state_dict().items()}


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> str:
    """The registry architecture whose keys and shapes are exactly those of ``state_dict``."""
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    for arch in BACKBONES:
        if arch_signature(arch) == have:
            return arch
    raise ValueError(f"no registered architecture ({', '.join(BACKBONES)}) has exactly these {len(have)} backbone "
                     f"keys and shapes; pass the architecture explicitly")


def read_backbone(path: str, arch: Optional[str] = None) -> BackboneCheckpoint:
    """Read the backbone (timm key names) and its head from any checkpoint format we know: our export and
    pretraining checkpoints, MoCo-v1/v2 and DisCo-pytorch ``.pth.tar`` (``module.encoder_q.*``), SwAV, and bare
    timm / torchvision state dicts. ``arch``: the registry name; default from the checkpoint, else inferred from the
    keys and shapes. Nothing is loaded into a model here: use :func:`load_strict` (or the converters)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    fmt, found_arch, backbone, head, skipped, meta = _parse_checkpoint(ckpt, path)
    if arch is None:
        arch = found_arch if found_arch in BACKBONES else infer_arch(backbone)
    return BackboneCheckpoint(arch, backbone, head, fmt, skipped, meta)


def key_mismatch(expected: Dict[str, Tuple[int, ...]], state_dict: Dict[str, torch.Tensor]
                 ) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, "key: checkpoint (shape) vs model (shape)" lines) of ``state_dict`` against
    the key -> shape map ``expected``; all empty when they match exactly."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shape = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if tuple(expected[k]) != tuple(state_dict[k].shape))
    return missing, unexpected, shape


def load_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that fails with the full lists of missing / unexpected / mis-shaped keys."""
    missing, unexpected, shape = key_mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()},
                                              state_dict)
    if missing or unexpected or shape:
        raise KeyError(f"{what} does not match the model.\n  missing keys ({len(missing)}): {missing}\n  unexpected "
                       f"keys ({len(unexpected)}): {unexpected}\n  shape mismatches ({len(shape)}): {shape}\nCheck "
                       f"that the architecture (MODEL.*.ARCH) is the one the checkpoint was trained with.")
    module.load_state_dict(state_dict, strict=True)


def load_teacher(path: str, arch: str) -> Tuple[Encoder, dict]:
    """Build ``arch`` and its pretrained projection head from ``path`` (any format of :func:`read_backbone`).

    Returns the encoder and a description (format, ignored keys, head spec). Only the teacher's query encoder and
    head are read: a MoCo checkpoint's queue / key encoder are reported as ignored and never touch the student.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist (MODEL.TEACHER.WEIGHTS)")
    ckpt = read_backbone(path, arch)
    if not ckpt.head:
        hint = (f"copy its head file {ckpt.metadata.get('head_file')} next to it" if ckpt.format == "export"
                else "use a checkpoint that keeps the projection head")
        raise ValueError(f"{path}: no projection head in the checkpoint; DisCo distils the teacher's head output "
                         f"({hint})")
    backbone = build_backbone(arch)
    load_strict(backbone, ckpt.state_dict,
                f"teacher backbone from {path} ({ckpt.format} format, MODEL.TEACHER.ARCH {arch})")
    spec = infer_head_spec(ckpt.head)
    if spec["in_dim"] != get_spec(arch).feature_dim:
        raise ValueError(f"{path}: the projection head takes {spec['in_dim']}-d features but {arch} gives "
                         f"{get_spec(arch).feature_dim}-d; is MODEL.TEACHER.ARCH right?")
    head = build_head(**spec)
    load_strict(head, ckpt.head, f"teacher projection head from {path}")
    ignored = [k for k, why in ckpt.skipped.items() if "head" not in why]
    return Encoder(backbone, head), {"format": ckpt.format, "ignored_keys": ignored, "head": spec}
