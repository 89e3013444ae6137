"""The frozen teacher: a pretrained backbone and the projection head it was pretrained with, from any format."""
import logging
import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from .backbones import build_backbone, get_spec
from .checkpoint import load_strict
from .encoder import Encoder
from .formats import read_backbone
from .heads import build_head, infer_head_spec

logger = logging.getLogger(__name__)


def load_teacher(path: str, arch: str, head_required: bool = True) -> Tuple[Encoder, dict]:
    """Build ``arch`` and its pretrained projection head from ``path`` (any format of :func:`read_backbone`).

    The head is built as the checkpoint's format says (:attr:`BackboneCheckpoint.head_act`: GELU for DINO, ReLU
    otherwise). A file without a projection head (a bare backbone: DINO's ``dino_deitsmall16_pretrain.pth``, a
    torchvision / timm state dict, an export whose head file is missing) is an error unless ``head_required`` is
    False: then the head is ``nn.Identity()`` and the teacher's embedding is its L2-normalised pooled backbone
    feature (a ViT's / XCiT's class token after the final norm), of ``feature_dim(arch)`` dimensions.

    Returns the encoder and a description: ``format``, ``ignored_keys`` (what the file holds that is loaded
    nowhere), ``head`` (the :func:`pretrain.heads.build_head` arguments, ``act`` included; None without a head),
    ``head_act`` (None without a head), ``embedding`` (``"projection head"`` or ``"backbone feature"``) and
    ``queue`` (the checkpoint's MoCo queue or {}). Only the teacher's query encoder and head are loaded: a MoCo
    checkpoint's queue / key encoder, DINO's student, optimizer, centre and the last layer of its head, SwAV's
    prototypes are reported as ignored; the queue reaches the student only through :func:`copy_teacher_queue`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} does not exist (MODEL.TEACHER.WEIGHTS)")
    ckpt = read_backbone(path, arch, what="teacher checkpoint (MODEL.TEACHER.WEIGHTS)")
    if not ckpt.head and head_required:
        hint = (f"copy its head file {ckpt.metadata.get('head_file')} next to it" if ckpt.format == "export"
                else "use a checkpoint that keeps the projection head (DINO: the training checkpoint.pth, not the "
                     "backbone-only release)")
        raise ValueError(f"{path}: no projection head in the {ckpt.format} checkpoint; DisCo distils the teacher's "
                         f"head output ({hint}), or load it with head_required=False to distil the L2-normalised "
                         f"backbone feature ({get_spec(arch).feature_dim}-d) instead")
    backbone = build_backbone(arch)
    load_strict(backbone, ckpt.state_dict,
                f"teacher backbone from {path} ({ckpt.format} format, MODEL.TEACHER.ARCH {arch})")
    ignored = [k for k in ckpt.skipped if k not in set(ckpt.head_sources.values())]
    if not ckpt.head:
        return Encoder(backbone, nn.Identity()), {"format": ckpt.format, "ignored_keys": ignored, "head": None,
                                                  "head_act": None, "embedding": "backbone feature",
                                                  "queue": ckpt.queue}
    head_file = (os.path.join(os.path.dirname(path), ckpt.metadata["head_file"]) if ckpt.format == "export"
                 else path)  # our export keeps the head in <arch>_head.pth next to the backbone
    missing = _incomplete_head(ckpt.head)
    if missing:
        raise KeyError(f"teacher projection head from {head_file} is incomplete: missing {missing} (it has "
                       f"{sorted(ckpt.head)}); the file is damaged or not a projection head, re-export the teacher")
    spec = infer_head_spec(ckpt.head, ckpt.head_act)
    if spec["in_dim"] != get_spec(arch).feature_dim:
        raise ValueError(f"{head_file}: the projection head takes {spec['in_dim']}-d features but {arch} gives "
                         f"{get_spec(arch).feature_dim}-d; is MODEL.TEACHER.ARCH right?")
    head = build_head(**spec)
    load_strict(head, ckpt.head, f"teacher projection head from {head_file} ({ckpt.format} format)")
    return Encoder(backbone, head), {"format": ckpt.format, "ignored_keys": ignored, "head": spec,
                                     "head_act": ckpt.head_act, "embedding": "projection head", "queue": ckpt.queue}


def copy_teacher_queue(testbed, queue: Dict[str, torch.Tensor], path: str) -> None:
    """``MODEL.TEACHER.COPY_QUEUE``: start the student's MoCo queue (and pointer) as the teacher checkpoint's, as the
    official code does (its non-strict load of the teacher's ``module.queue`` / ``module.queue_ptr`` into the
    student). Called when the method is built, so a resumed run's own queue, loaded afterwards, wins (the official
    code loads the teacher after resuming and overwrites it). A file without a queue (an export, a SwAV checkpoint)
    leaves the queue random, as the official code does, with a warning."""
    if not isinstance(getattr(testbed, "queue", None), torch.Tensor):
        raise ValueError(f"MODEL.TEACHER.COPY_QUEUE True needs a testbed with a MoCo queue (METHOD.TESTBED mocov2); "
                         f"{type(testbed).__name__} has none: set MODEL.TEACHER.COPY_QUEUE False")
    if not queue:
        logger.warning("MODEL.TEACHER.COPY_QUEUE: the teacher file %s has no MoCo queue (an export or a SwAV "
                       "checkpoint keeps none), so the student's queue starts random; to copy it, pass the teacher's "
                       "MoCo .pth.tar or its pretraining checkpoint (model_final.pth) as MODEL.TEACHER.WEIGHTS", path)
        return
    q = queue["queue"]
    if tuple(q.shape) != tuple(testbed.queue.shape):
        raise ValueError(f"MODEL.TEACHER.COPY_QUEUE: the teacher's queue in {path} is {tuple(q.shape)} (dim x K) but "
                         f"the student's is {tuple(testbed.queue.shape)}: set MODEL.MOCO.QUEUE_SIZE {q.shape[1]} "
                         f"(and MODEL.STUDENT.HEAD.OUT_DIM {q.shape[0]}), or MODEL.TEACHER.COPY_QUEUE False")
    with torch.no_grad():
        testbed.queue.copy_(q.to(testbed.queue.dtype))
        testbed.queue_ptr.copy_(queue["queue_ptr"].reshape(testbed.queue_ptr.shape) % q.shape[1])
    logger.info("the student's MoCo queue starts as the teacher's (%s, pointer %d; MODEL.TEACHER.COPY_QUEUE)",
                path, int(testbed.queue_ptr))


def _incomplete_head(head: dict) -> List[str]:
    """Keys a ``build_head`` state dict (layers ``0.``, ``1.``, ... of an ``nn.Sequential``) must have but ``head``
    lacks: the first layer's weight, and the weight (and a linear layer's bias) of every layer some key names."""
    layers = sorted({int(k.split(".")[0]) for k in head if k.split(".")[0].isdigit()} | {0})
    missing = [f"{i}.weight" for i in layers if f"{i}.weight" not in head]
    missing += [f"{i}.bias" for i in layers if getattr(head.get(f"{i}.weight"), "ndim", 0) == 2
                and f"{i}.bias" not in head]
    return sorted(missing)
