"""Exports: the student's backbone in timm key names (``timm.create_model(arch, num_classes=0,
checkpoint_path=...)`` loads it strictly) and its projection head, with the run's metadata. And what an iteration
checkpoint holds, in bytes per part (:func:`describe_checkpoint`): an export keeps only the student."""
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .backbones import build_backbone, get_spec
from .checkpoint import load_strict, save_atomic, verify_checkpoint
from .encoder import Encoder
from .formats import EXPORT_FORMAT, method_description, read_backbone
from .heads import build_head, head_activation, infer_head_spec
from .safeload import load_torch

logger = logging.getLogger(__name__)


def export_encoder(encoder: Encoder, arch: str, out_dir: str, name: str, metadata: dict) -> Dict[str, str]:
    """Write ``{name}.pth`` (backbone in timm key names + metadata; ``timm.create_model(arch, num_classes=0,
    checkpoint_path=...)`` loads it strictly) and ``{name}_head.pth`` (the projection head, kept separately)."""
    backbone_path = os.path.join(out_dir, f"{name}.pth")
    head_path = os.path.join(out_dir, f"{name}_head.pth")
    head_sd = {k: v.detach().cpu().clone() for k, v in encoder.head.state_dict().items()}
    meta = dict(metadata, format=EXPORT_FORMAT, arch=arch, timm_arch=get_spec(arch).timm_arch,
                head_file=os.path.basename(head_path), head=infer_head_spec(head_sd, head_activation(encoder.head)))
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
    encoder = Encoder(build_backbone(ckpt.arch), build_head(**infer_head_spec(ckpt.head, ckpt.head_act)))
    load_strict(encoder.backbone, ckpt.state_dict, f"student backbone of {checkpoint}")
    load_strict(encoder.head, ckpt.head, f"student head of {checkpoint}")
    cfg = CfgNode.load_cfg(ckpt.metadata["config"])
    return export_student(encoder, cfg, ckpt.metadata["iteration"], ckpt.metadata["epoch"], out_dir)


# ---------------------------------------------------------------------------------------------------------------
# What an iteration checkpoint holds

MB = 1e6  # the sizes printed: megabytes of 10^6 bytes


@dataclass
class CheckpointPart:
    """One row of :func:`describe_checkpoint`: ``nbytes`` of the file's data that is this part, and what it is."""

    name: str
    nbytes: int
    detail: str


def _nbytes(obj, seen: set) -> int:
    """Bytes ``obj`` takes in a ``torch.save`` file: a tensor's storage (each storage once: ``seen`` holds the
    storages already counted), containers summed, any other value its pickled length."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen and storage.nbytes():
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(k, seen) + _nbytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    return len(pickle.dumps(obj, protocol=2))


def _tensor_summary(tensors: List[torch.Tensor]) -> str:
    if len(tensors) == 1:
        t = tensors[0]
        return f"{' x '.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).replace('torch.', '')}"
    return f"{len(tensors)} tensors, {sum(t.numel() for t in tensors) / 1e6:.3g}M values"


def _group(state: Dict[str, torch.Tensor], depth: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Keys grouped by their first ``depth`` dotted components, in first-seen order."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        groups.setdefault(".".join(k.split(".")[:depth]), {})[k] = v
    return groups


def describe_checkpoint(path: str) -> Tuple[List[CheckpointPart], dict]:
    """``(parts, info)`` of an iteration checkpoint (``OUTPUT_DIR/checkpoints/model_*.pth``): where its bytes go.

    Parts, in order: ``student backbone`` and ``student projection head`` (what an export keeps), the testbed's
    state per module (``testbed.encoder_k``: MoCo-v2's momentum key encoder, ``testbed.queue``: its keys, ...), each
    distiller's state (``distillers.<name>``; a row with 0 bytes for a configured distiller that has none), the
    frozen teacher's buffers (``teacher buffers``: BatchNorm statistics; its weights are not in the checkpoint),
    ``optimizer state`` (SGD momentum / AdamW moments: one or two copies of the trained parameters), ``other``
    (scheduler, AMP scaler, RNG states, config, counters) and ``file overhead`` (the pickle and the zip records: the
    file's size minus the rest). Tensors count their storage bytes, each storage once; other values their pickled
    length. The rows sum to the file size. ``info``: ``size`` (bytes), ``iteration``, ``epoch``, ``method``,
    ``arch`` (the student).

    Checkpoints of earlier versions (``student``: MoCo's ``encoder_q.*``, ``encoder_k.*``, ``queue``) are described
    under today's names. The file is verified (zip checksums) and read with :func:`pretrain.safeload.load_torch`."""
    from fvcore.common.config import CfgNode

    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretraining checkpoint {path!r} does not exist")
    verify_checkpoint(path)
    ckpt = load_torch(path, "pretraining checkpoint")
    if not (isinstance(ckpt, dict) and "cfg" in ckpt and ("model" in ckpt or "student" in ckpt)):
        raise ValueError(f"{path} is not a pretraining checkpoint of this project (a dict with 'cfg' and the method's "
                         f"state 'model'); give OUTPUT_DIR/checkpoints/model_<iter>.pth")
    if "model" in ckpt:
        state, model_key = ckpt["model"], "model"
    else:  # before methods were plug-ins: MoCo's encoder_q is the student, the rest its testbed (mocov2)
        state, model_key = {("student." + k[len("encoder_q."):]) if k.startswith("encoder_q.") else f"testbed.{k}": v
                            for k, v in ckpt["student"].items()}, "student"
    cfg = CfgNode.load_cfg(ckpt["cfg"])
    seen: set = set()
    parts: List[CheckpointPart] = []

    def add(name: str, tensors: Dict[str, torch.Tensor], detail: str = "") -> None:
        parts.append(CheckpointPart(name, _nbytes(tensors, seen), detail or _tensor_summary(list(tensors.values()))))

    by_role = _group(state, 1)
    student = _group(by_role.pop("student", {}), 2)
    add("student backbone", student.pop("student.backbone", {}))
    add("student projection head", student.pop("student.head", {}))
    for name, tensors in student.items():
        add(name, tensors)
    for role in ("testbed", "distillers"):  # testbed.<module or buffer>, distillers.<name>
        for name, tensors in _group(by_role.pop(role, {}), 2).items():
            add(name, tensors)
    if not isinstance(cfg.METHOD, str):
        for name in cfg.METHOD.DISTILLERS:  # a distiller without parameters or buffers (DisCo's is a loss only)
            if f"distillers.{name}" not in {p.name for p in parts}:
                parts.append(CheckpointPart(f"distillers.{name}", 0, "no state (no parameters or buffers)"))
    for name, tensors in by_role.items():  # a part of the method this version does not know by name
        add(name, tensors)
    counted = {model_key}
    if ckpt.get("teacher_buffers"):
        n = len(ckpt["teacher_buffers"])
        add("teacher buffers", ckpt["teacher_buffers"], f"{n} buffers (BatchNorm statistics; the frozen weights "
                                                         f"are reloaded from MODEL.TEACHER.WEIGHTS)")
    counted.add("teacher_buffers")
    if "optimizer" in ckpt:
        opt = ckpt["optimizer"]
        kinds = sorted({k for s in opt.get("state", {}).values() for k in s if isinstance(s.get(k), torch.Tensor)})
        n = sum(len(g.get("params", ())) for g in opt.get("param_groups", ()))
        parts.append(CheckpointPart("optimizer state", _nbytes(opt, seen),
                                    f"{', '.join(kinds) or 'no buffers yet'} of {n} parameter tensors"))
        counted.add("optimizer")
    rest = {k: v for k, v in ckpt.items() if k not in counted}
    parts.append(CheckpointPart("other", _nbytes(rest, seen), ", ".join(rest)))
    size = os.path.getsize(path)
    parts.append(CheckpointPart("file overhead", size - sum(p.nbytes for p in parts), "pickle and zip records"))
    info = {"size": size, "iteration": ckpt.get("iter"), "epoch": ckpt.get("epoch"),
            "method": method_description(cfg), "arch": cfg.MODEL.STUDENT.ARCH}
    return parts, info


EXPORTED_PARTS = ("student backbone", "student projection head")  # what export_from_checkpoint keeps


def format_description(path: str, parts: List[CheckpointPart], info: dict) -> str:
    """The table of :func:`describe_checkpoint` (MB of 10^6 bytes, share of the file), with what an export keeps."""
    size = info["size"]
    lines = [f"{path}: {size / MB:.2f} MB, iteration {info['iteration']} (epoch {info['epoch']}), method "
             f"{info['method']}, student {info['arch']}",
             f"  {'part':<28} {'MB':>9} {'share':>7}  contents"]
    for p in parts:
        lines.append(f"  {p.name:<28} {p.nbytes / MB:>9.2f} {100 * p.nbytes / size:>6.1f}%  {p.detail}")
    kept = sum(p.nbytes for p in parts if p.name in EXPORTED_PARTS)
    lines.append(f"an export (tools/export.py CHECKPOINT OUT_DIR) keeps the student backbone and projection head: "
                 f"{kept / MB:.2f} MB of {size / MB:.2f} MB; the rest is only needed to resume training")
    return "\n".join(lines)
