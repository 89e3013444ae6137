"""The frozen teacher: a pretrained backbone and the projection head it was pretrained with, from any format."""
import os
from typing import List, Tuple

from .backbones import build_backbone, get_spec
from .checkpoint import load_strict
from .encoder import Encoder
from .formats import read_backbone
from .heads import build_head, infer_head_spec


def load_teacher(path: str, arch: str) -> Tuple[Encoder, dict]:
    """Build ``arch`` and its pretrained projection head from ``path`` (any format of :func:`read_backbone`).

    Returns the encoder and a description (format, ignored keys, head spec). Only the teacher's query encoder and
    head are read: a MoCo checkpoint's queue / key encoder are reported as ignored and never touch the student.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist (MODEL.TEACHER.WEIGHTS)")
    ckpt = read_backbone(path, arch, what="teacher checkpoint (MODEL.TEACHER.WEIGHTS)")
    if not ckpt.head:
        hint = (f"copy its head file {ckpt.metadata.get('head_file')} next to it" if ckpt.format == "export"
                else "use a checkpoint that keeps the projection head")
        raise ValueError(f"{path}: no projection head in the checkpoint; DisCo distils the teacher's head output "
                         f"({hint})")
    backbone = build_backbone(arch)
    load_strict(backbone, ckpt.state_dict,
                f"teacher backbone from {path} ({ckpt.format} format, MODEL.TEACHER.ARCH {arch})")
    head_file = (os.path.join(os.path.dirname(path), ckpt.metadata["head_file"]) if ckpt.format == "export"
                 else path)  # our export keeps the head in <arch>_head.pth next to the backbone
    missing = _incomplete_head(ckpt.head)
    if missing:
        raise KeyError(f"teacher projection head from {head_file} is incomplete: missing {missing} (it has "
                       f"{sorted(ckpt.head)}); the file is damaged or not a projection head, re-export the teacher")
    spec = infer_head_spec(ckpt.head)
    if spec["in_dim"] != get_spec(arch).feature_dim:
        raise ValueError(f"{head_file}: the projection head takes {spec['in_dim']}-d features but {arch} gives "
                         f"{get_spec(arch).feature_dim}-d; is MODEL.TEACHER.ARCH right?")
    head = build_head(**spec)
    load_strict(head, ckpt.head, f"teacher projection head from {head_file}")
    ignored = [k for k, why in ckpt.skipped.items() if "head" not in why]
    return Encoder(backbone, head), {"format": ckpt.format, "ignored_keys": ignored, "head": spec}


def _incomplete_head(head: dict) -> List[str]:
    """Keys a ``build_head`` state dict (layers ``0.``, ``1.``, ... of an ``nn.Sequential``) must have but ``head``
    lacks: the first layer's weight, and the weight (and a linear layer's bias) of every layer some key names."""
    layers = sorted({int(k.split(".")[0]) for k in head if k.split(".")[0].isdigit()} | {0})
    missing = [f"{i}.weight" for i in layers if f"{i}.weight" not in head]
    missing += [f"{i}.bias" for i in layers if getattr(head.get(f"{i}.weight"), "ndim", 0) == 2
                and f"{i}.bias" not in head]
    return sorted(missing)
