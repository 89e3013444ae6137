"""Reading a backbone (and its projection head) from every checkpoint format we know: our exports and pretraining
checkpoints, MoCo-v1/v2 and DisCo-pytorch ``.pth.tar``, SwAV, and bare timm / torchvision state dicts."""
import functools
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .backbones import BACKBONES, build_backbone
from .safeload import load_torch

EXPORT_FORMAT = "disco-transfer/v1"  # the "format" field of our exports (OUTPUT_DIR/export/<arch>.pth)


@dataclass
class BackboneCheckpoint:
    """A backbone read from a checkpoint: ``state_dict`` in timm key names (what ``build_backbone(arch)`` loads
    strictly), the projection head / classifier found beside it (``head``, prefix stripped; may be empty), the
    format name, and every key deliberately left out with the reason (``skipped``). ``queue``: a MoCo checkpoint's
    queue of keys (``{"queue": CxK, "queue_ptr": (1,)}``, also reported in ``skipped``) when the file has one, for
    ``MODEL.TEACHER.COPY_QUEUE``; empty otherwise."""

    arch: str
    state_dict: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    format: str
    skipped: Dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    queue: Dict[str, torch.Tensor] = field(default_factory=dict)


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
            head = dict(load_torch(head_path, "projection head file")["state_dict"])
        return "export", ckpt["arch"], dict(ckpt["state_dict"]), head, skipped, meta
    if isinstance(ckpt, dict) and "cfg" in ckpt and ("model" in ckpt or "student" in ckpt):
        # our iteration checkpoint (model_*.pth): the student is "student.*" of the method's state ("model"), or
        # "encoder_q.*" of MoCo's in the checkpoints written before methods were plug-ins ("student")
        from fvcore.common.config import CfgNode

        cfg = CfgNode.load_cfg(ckpt["cfg"])
        state, prefix = (ckpt["model"], "student.") if "model" in ckpt else (ckpt["student"], "encoder_q.")
        backbone, head = {}, {}
        for k, v in state.items():
            if k.startswith(prefix + "backbone."):
                backbone[k[len(prefix + "backbone."):]] = v
            elif k.startswith(prefix + "head."):
                head[k[len(prefix + "head."):]] = v
            else:
                skipped[k] = "not the student (momentum encoder, queue, ... of the pretraining run)"
        meta = {"method": method_description(cfg), "iteration": ckpt.get("iter"), "epoch": ckpt.get("epoch"),
                "config": ckpt["cfg"], "queue": _queue(state, "testbed.") if "model" in ckpt else {}}
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
        meta["queue"] = _queue(sd, prefix[:-len("encoder_q.")])
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


def method_description(cfg) -> str:
    """``mocov2 + disco`` from a pretraining config (``METHOD.TESTBED`` / ``METHOD.DISTILLERS``); the configs written
    before methods were plug-ins said ``METHOD: disco`` / ``moco``."""
    if isinstance(cfg.METHOD, str):
        return cfg.METHOD
    names = ([cfg.METHOD.TESTBED] if cfg.METHOD.TESTBED != "none" else []) + list(cfg.METHOD.DISTILLERS)
    return " + ".join(names) or "none"


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


def read_backbone(path: str, arch: Optional[str] = None, what: str = "checkpoint") -> BackboneCheckpoint:
    """Read the backbone (timm key names) and its head from any checkpoint format we know: our export and
    pretraining checkpoints, MoCo-v1/v2 and DisCo-pytorch ``.pth.tar`` (``module.encoder_q.*``), SwAV, and bare
    timm / torchvision state dicts. ``arch``: the registry name; default from the checkpoint, else inferred from the
    keys and shapes. Nothing is loaded into a model here: use :func:`load_strict` (or the converters).

    The file is read with :func:`pretrain.safeload.load_torch` (``what`` names it in errors): only tensors, numbers,
    strings, containers and the few plain types of the published formats; a checkpoint whose pickle asks for
    anything else (code) raises :class:`pretrain.safeload.UnsafeCheckpointError` and nothing of it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    ckpt = load_torch(path, what)
    fmt, found_arch, backbone, head, skipped, meta = _parse_checkpoint(ckpt, path)
    if arch is None:
        arch = found_arch if found_arch in BACKBONES else infer_arch(backbone)
    queue = meta.pop("queue", {})
    return BackboneCheckpoint(arch, backbone, head, fmt, skipped, meta, queue)


def _queue(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The MoCo queue (CxK) and its pointer under ``prefix`` (``module.`` / ``""`` in MoCo's and DisCo-pytorch's
    .pth.tar, ``testbed.`` in our pretraining checkpoints), or {} when the file has none."""
    queue, ptr = sd.get(prefix + "queue"), sd.get(prefix + "queue_ptr")
    if not isinstance(queue, torch.Tensor) or queue.ndim != 2 or not isinstance(ptr, torch.Tensor):
        return {}
    return {"queue": queue, "queue_ptr": ptr.reshape(1).long()}
