"""The frozen teacher: a pretrained backbone and the projection head it was pretrained with, from any format."""
import os
from typing import Tuple

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
