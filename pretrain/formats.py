"""Reading a backbone (and its projection head) from every checkpoint format we know: our exports and pretraining
checkpoints, MoCo-v1/v2 and DisCo-pytorch ``.pth.tar``, the SwAV repository's releases (SwAV, DeepCluster-v2,
SeLa-v2), DINO's training checkpoints and backbone-only releases, and bare timm / torchvision state dicts.

Format names (``BackboneCheckpoint.format``): ``export``, ``pretrain-checkpoint``, ``moco``, ``disco-pytorch``,
``swav`` (one prototype layer, ``module.prototypes.weight``), ``swav-multi-prototypes`` (DeepCluster-v2 / SeLa-v2:
``module.prototypes.prototypes<i>.weight``, one per clustering head), ``dino`` (main_dino.py's ``checkpoint.pth``) and
``state_dict`` (a bare backbone: timm, torchvision, DINO's ``dino_deitsmall16_pretrain.pth`` /
``dino_xcit_small_12_p16_pretrain.pth``). Backbone keys come out in timm's names; the xcit repository's XCiT names
(DINO's XCiT files) are mapped to timm's (:func:`xcit_official_to_timm`)."""
import argparse
import functools
import os
import re
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
    ``MODEL.TEACHER.COPY_QUEUE``; empty otherwise. ``head_act``: the activation between the head's layers
    (``"relu"`` or ``"gelu"``, :func:`pretrain.heads.build_head`'s ``act``), which no state dict records: the format
    tells it (DINO: GELU). ``head_sources``: head key -> the checkpoint key it was read from (those keys are in
    ``skipped`` too, as not part of the backbone, but they are loaded)."""

    arch: str
    state_dict: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    format: str
    skipped: Dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    queue: Dict[str, torch.Tensor] = field(default_factory=dict)
    head_act: str = "relu"
    head_sources: Dict[str, str] = field(default_factory=dict)


# Where a backbone's classifier / projection head lives in timm models (and MoCo's / DisCo-pytorch's encoder_q).
_HEAD_PREFIXES = ("fc.", "classifier.", "head.")
# A key that any known backbone has: a state dict with one of these is a bare backbone (torchvision / timm).
_STEM_KEYS = ("conv1.weight", "conv_stem.weight", "patch_embed.proj.weight", "patch_embed.proj.0.0.weight",
              "features.0.0.weight")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _head_key(key: str) -> str:
    """A head key in :func:`pretrain.heads.build_head`'s layout: a head that is one Linear (MoCo-v1 ``fc``, SwAV with
    ``hidden_mlp 0``, DINO with ``nlayers 1``) is layer 0 of the ``nn.Sequential``."""
    return "0." + key if key in ("weight", "bias") else key


def _split_encoder(sd: Dict[str, torch.Tensor], prefix: str, skipped: Dict[str, str], sources: Dict[str, str]):
    """Keys under ``prefix`` -> (backbone, head); every other key is recorded in ``skipped``, every head key's source
    in ``sources``."""
    backbone, head = {}, {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            what = ("the momentum (key) encoder" if "encoder_k" in k else "the MoCo queue" if "queue" in k
                    else "the teacher" if "teacher" in k else "not the student's query encoder")
            skipped[k] = f"{what}; only {prefix}* is the backbone"
            continue
        k2 = k[len(prefix):]
        if k2.startswith(_HEAD_PREFIXES):
            head_key = _head_key(k2.split(".", 1)[1])  # MoCo v1: one Linear "fc"
            head[head_key] = v
            sources[head_key] = k
            skipped[k] = "projection head / classifier (not part of the backbone)"
        else:
            backbone[k2] = v
    return backbone, head


def _parse_checkpoint(ckpt, path: str, dino_network: str = "teacher"
                      ) -> Tuple[str, Optional[str], Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, str],
                                 dict]:
    """-> (format, arch or None, backbone state dict, head state dict, skipped {key: reason}, metadata). Besides the
    file's own metadata, ``metadata`` carries ``queue``, ``head_act`` and ``head_sources`` for
    :class:`BackboneCheckpoint` (popped by :func:`read_backbone`)."""
    skipped: Dict[str, str] = {}
    if isinstance(ckpt, dict) and ckpt.get("format") == EXPORT_FORMAT:
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        head_path = os.path.join(os.path.dirname(path), ckpt.get("head_file", ""))
        head = {}
        if ckpt.get("head_file") and os.path.isfile(head_path):
            head = dict(load_torch(head_path, "projection head file")["state_dict"])
        head_spec = ckpt.get("head") if isinstance(ckpt.get("head"), dict) else {}
        meta.update(head_act=head_spec.get("act", "relu"),
                    head_sources={k: f"{ckpt['head_file']}:{k}" for k in head})
        return "export", ckpt["arch"], dict(ckpt["state_dict"]), head, skipped, meta
    if isinstance(ckpt, dict) and "cfg" in ckpt and ("model" in ckpt or "student" in ckpt):
        # our iteration checkpoint (model_*.pth): the student is "student.*" of the method's state ("model"), or
        # "encoder_q.*" of MoCo's in the checkpoints written before methods were plug-ins ("student")
        from fvcore.common.config import CfgNode

        cfg = CfgNode.load_cfg(ckpt["cfg"])
        # the encoder the run exports: the student, or another module of the method (DINO's EMA teacher,
        # "testbed.teacher"), named by the checkpoint since it could say
        state, prefix = ((ckpt["model"], ckpt.get("exported", "student") + ".") if "model" in ckpt
                         else (ckpt["student"], "encoder_q."))
        backbone, head, sources = {}, {}, {}
        for k, v in state.items():
            if k.startswith(prefix + "backbone."):
                backbone[k[len(prefix + "backbone."):]] = v
            elif k.startswith(prefix + "head."):
                head[k[len(prefix + "head."):]] = v
                sources[k[len(prefix + "head."):]] = k
            else:
                skipped[k] = "not the exported encoder (momentum encoder, queue, ... of the pretraining run)"
        meta = {"method": method_description(cfg), "iteration": ckpt.get("iter"), "epoch": ckpt.get("epoch"),
                "config": ckpt["cfg"], "queue": _queue(state, "testbed.") if "model" in ckpt else {},
                # MODEL.STUDENT.HEAD.ACT: configs written before it existed built ReLU heads
                "head_act": str(cfg.MODEL.STUDENT.HEAD.get("ACT", "relu")), "head_sources": sources}
        return "pretrain-checkpoint", cfg.MODEL.STUDENT.ARCH, backbone, head, skipped, meta
    if _is_dino(ckpt):
        return _parse_dino(ckpt, path, dino_network)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a checkpoint this project knows (expected our export or pretraining "
                         f"checkpoint, a MoCo-v1/v2 or DisCo-pytorch .pth.tar, a SwAV / DeepCluster-v2 / SeLa-v2 "
                         f"release, a DINO checkpoint ('student' / 'teacher') or a timm/torchvision state dict)")
    arch = ckpt.get("arch") if isinstance(ckpt, dict) and isinstance(ckpt.get("arch"), str) else None
    meta = {k: ckpt[k] for k in ("epoch", "arch") if isinstance(ckpt, dict) and k in ckpt}
    sources: Dict[str, str] = {}
    meta["head_sources"] = sources
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in sd):
        # MoCo v1/v2 and DisCo-pytorch (whose student is MoCo's encoder_q; its teacher copies are skipped)
        fmt = "disco-pytorch" if any("teacher" in k for k in sd) else "moco"
        prefix = "module.encoder_q." if any(k.startswith("module.encoder_q.") for k in sd) else "encoder_q."
        backbone, head = _split_encoder(sd, prefix, skipped, sources)
        meta["queue"] = _queue(sd, prefix[:-len("encoder_q.")])
        return fmt, arch, backbone, head, skipped, meta
    stripped = {_strip(k, "module."): v for k, v in sd.items()}
    if any(k.startswith("projection_head.") for k in stripped):
        return _parse_swav(sd, arch, meta)
    if any(k in stripped for k in _STEM_KEYS):  # a bare backbone (torchvision / timm / supervised / DINO releases)
        backbone = {}
        for k, v in sd.items():
            k2 = _strip(k, "module.")
            if k2.startswith(_HEAD_PREFIXES):
                skipped[k] = "classifier (not part of the backbone)"
            else:
                backbone[k2] = v
        return "state_dict", arch, backbone, {}, skipped, meta
    raise ValueError(f"{path}: cannot tell the checkpoint format (first keys: {sorted(sd)[:5]}); expected our "
                     f"export, MoCo / DisCo-pytorch ('module.encoder_q.*'), SwAV / DeepCluster-v2 / SeLa-v2 "
                     f"('module.projection_head.*'), DINO ('student' / 'teacher') or a backbone state dict")


# ---------------------------------------------------------------------------------------------------------------
# The SwAV repository's releases (facebookresearch/swav): SwAV, DeepCluster-v2, SeLa-v2


_MULTI_PROTOTYPES = re.compile(r"prototypes\.prototypes(\d+)\.weight")


def _parse_swav(sd: Dict[str, torch.Tensor], arch: Optional[str], meta: dict):
    """A bare state dict with DDP's ``module.`` prefix: the ResNet, ``projection_head.*`` (Linear 0, BatchNorm1d 1,
    ReLU, Linear 3: 2048 -> 2048 -> 128 for the R-50 releases; one Linear ``projection_head.weight`` with
    ``hidden_mlp 0``) and the prototypes: one bias-free Linear ``prototypes.weight`` (SwAV) or, for the multi-head
    clustering of DeepCluster-v2 and SeLa-v2, ``src/resnet50.py``'s ``MultiPrototypes``: ``prototypes.prototypes<i>
    .weight``, one K_i x 128 layer per head (DeepCluster-v2's release: 3 x 3000). The prototypes are the clustering
    targets on top of the projection, not part of it: reported as skipped, with the number of heads in
    ``metadata["prototype_heads"]``."""
    skipped: Dict[str, str] = {}
    sources: Dict[str, str] = meta["head_sources"]
    stripped = [_strip(k, "module.") for k in sd]
    multi = sorted({int(m.group(1)) for k in stripped if (m := _MULTI_PROTOTYPES.fullmatch(k))})
    heads = len(multi) if multi else int("prototypes.weight" in stripped)
    backbone, head = {}, {}
    for k, v in sd.items():
        k2 = _strip(k, "module.")
        if k2.startswith("projection_head."):
            head_key = _head_key(k2[len("projection_head."):])
            head[head_key] = v
            sources[head_key] = k
            skipped[k] = "SwAV projection head (not part of the backbone)"
        elif k2.startswith("prototypes."):
            what = (f"DeepCluster-v2 / SeLa-v2 prototypes: one of {heads} clustering heads" if multi
                    else "SwAV prototypes")
            skipped[k] = (f"{what} ({' x '.join(map(str, v.shape))}): the clustering targets scored on the "
                          f"projection, not part of the projection head")
        else:
            backbone[k2] = v
    meta["prototype_heads"] = heads
    return ("swav-multi-prototypes" if multi else "swav"), arch, backbone, head, skipped, meta


# ---------------------------------------------------------------------------------------------------------------
# DINO (facebookresearch/dino main_dino.py): {"student", "teacher", "optimizer", "epoch", "args", "dino_loss",
# "fp16_scaler"}; each network is utils.MultiCropWrapper(backbone, DINOHead): "backbone.*" and "head.*", with DDP's
# "module." in front for the student (and for the teacher when the backbone has BatchNorm: then it is DDP-wrapped too)

DINO_NETWORKS = ("teacher", "student")
_DINO_OTHER = {
    "optimizer": "optimizer state (not weights)",
    "fp16_scaler": "mixed-precision loss-scaler state (not weights)",
}


def _is_dino(ckpt) -> bool:
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(n), dict) for n in DINO_NETWORKS):
        return False
    return any(_strip(k, "module.").startswith("backbone.") for k in ckpt["teacher"])


def _dino_arch(args: Optional[dict]) -> Optional[str]:
    """The registry name of DINO's ``--arch`` / ``--patch_size`` (``vit_small`` + 16 -> ``vit_small_patch16_224``;
    ``xcit_small_12_p16`` -> ``xcit_small_12_p16_224``; ``resnet50``), or None (then the keys and shapes decide)."""
    if not isinstance(args, dict) or not isinstance(args.get("arch"), str):
        return None
    name = args["arch"].replace("deit", "vit")  # as main_dino.py renames it
    for candidate in (f"{name}_patch{args.get('patch_size')}_224", f"{name}_224", name):
        if candidate in BACKBONES:
            return candidate
    return None


def _parse_dino(ckpt: dict, path: str, network: str):
    """One network of a DINO training checkpoint: its backbone, and its head's MLP (``head.mlp.*``: Linear, GELU,
    Linear, GELU, Linear, 384/2048/2048/256 for ViT-S; with ``--use_bn_in_head`` a BatchNorm1d after each hidden
    Linear; ``nlayers 1``: one Linear ``head.mlp.weight``) as a GELU head in :func:`pretrain.heads.build_head`'s
    layout. The head's weight-normalised ``last_layer`` (bottleneck -> 65536 outputs) is skipped: DINO feeds it the
    L2-normalised MLP output, the embedding this projection head gives (the encoder normalises). Every key of the
    network must be ``backbone.*`` or ``head.*``."""
    if network not in DINO_NETWORKS:
        raise ValueError(f"dino_network {network!r}: choose one of {', '.join(DINO_NETWORKS)} (DINO evaluates and "
                         f"releases the teacher)")
    other = DINO_NETWORKS[1 - DINO_NETWORKS.index(network)]
    backbone, head, sources, skipped, unexpected = {}, {}, {}, {}, []
    for k, v in ckpt[network].items():
        k2 = _strip(k, "module.")
        if k2.startswith("backbone."):
            backbone[k2[len("backbone."):]] = v
        elif k2.startswith("head.mlp."):
            head_key = _head_key(k2[len("head.mlp."):])
            head[head_key] = v
            sources[head_key] = f"{network}.{k}"
            skipped[f"{network}.{k}"] = "DINO projection head (not part of the backbone)"
        elif k2.startswith("head.last_layer."):
            skipped[f"{network}.{k}"] = ("DINO head's weight-normalised last layer (bottleneck -> prototypes, the "
                                         "input of DINO's softmax): not part of the projection head distilled here")
        else:
            unexpected.append(k)
    if unexpected:
        raise ValueError(f"{path}: DINO checkpoint's {network} has {len(unexpected)} keys outside 'backbone.*' / "
                         f"'head.mlp.*' / 'head.last_layer.*': {sorted(unexpected)[:8]}; the file is not "
                         f"main_dino.py's checkpoint (or is damaged)")
    why_other = ("the DINO student: DINO evaluates and releases its EMA teacher (read_backbone(..., "
                 "dino_network='student') reads this one)" if other == "student"
                 else "the DINO teacher (dino_network='student' was asked for)")
    skipped.update({f"{other}.{k}": why_other for k in ckpt[other]})
    meta: dict = {"network": network, "head_act": "gelu", "head_sources": sources}
    for key, value in ckpt.items():
        if key in DINO_NETWORKS:
            continue
        if key == "epoch":
            meta["epoch"] = value
        elif key == "args":
            meta["args"] = dict(vars(value)) if isinstance(value, argparse.Namespace) else value
        elif key == "dino_loss" and isinstance(value, dict):
            skipped.update({f"dino_loss.{k}": "DINO's centre of the teacher outputs (a running training statistic "
                                              "of the loss, not a weight)" for k in value})
        else:
            skipped[key] = _DINO_OTHER.get(key, "not a network of DINO's checkpoint")
    arch = _dino_arch(meta.get("args"))
    if arch:
        meta["arch"] = arch
    return "dino", arch, backbone, head, skipped, meta


# ---------------------------------------------------------------------------------------------------------------
# Key names of other code bases -> timm's

_XCIT_QKV = re.compile(r"(cls_attn_blocks\.\d+\.attn\.)qkv\.(weight|bias)")


def xcit_official_to_timm(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The xcit repository's XCiT keys (what DINO's XCiT checkpoints hold) -> timm's: ``pos_embeder.*`` ->
    ``pos_embed.*``, and each class-attention block's fused ``attn.qkv`` (3C x C, q then k then v rows) split into
    timm's ``attn.q`` / ``attn.k`` / ``attn.v`` (timm computes the query of the class token only). What timm's own
    ``timm.models.xcit.checkpoint_filter_fn`` does for the official weights. -> (state dict, {old key: new key(s)});
    a state dict without those keys is returned as is, with an empty map."""
    out, renamed = {}, {}
    for k, v in state_dict.items():
        m = _XCIT_QKV.fullmatch(k)
        if m and v.shape[0] % 3 == 0:
            names = [f"{m.group(1)}{x}.{m.group(2)}" for x in "qkv"]
            out.update(zip(names, v.chunk(3, dim=0)))
            renamed[k] = ", ".join(names)
        elif k.startswith("pos_embeder."):
            out["pos_embed." + k[len("pos_embeder."):]] = v
            renamed[k] = "pos_embed." + k[len("pos_embeder."):]
        else:
            out[k] = v
    return (out, renamed) if renamed else (state_dict, {})


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


def read_backbone(path: str, arch: Optional[str] = None, what: str = "checkpoint",
                  dino_network: str = "teacher") -> BackboneCheckpoint:
    """Read the backbone (timm key names) and its head from any checkpoint format we know (module docstring): our
    export and pretraining checkpoints, MoCo-v1/v2 and DisCo-pytorch ``.pth.tar`` (``module.encoder_q.*``), the SwAV
    repository's SwAV / DeepCluster-v2 / SeLa-v2 releases, DINO's training checkpoints (``dino_network``: which of
    its networks, by default the EMA teacher that DINO evaluates and releases) and backbone-only releases, and bare
    timm / torchvision state dicts. ``arch``: the registry name; default from the checkpoint, else inferred from the
    keys and shapes. Nothing is loaded into a model here: use :func:`load_strict` (or the converters), which name
    every missing / unexpected key.

    The file is read with :func:`pretrain.safeload.load_torch` (``what`` names it in errors): only tensors, numbers,
    strings, containers and the few plain types of the published formats (DINO's ``args`` is an
    ``argparse.Namespace``); a checkpoint whose pickle asks for anything else (code) raises
    :class:`pretrain.safeload.UnsafeCheckpointError` and nothing of it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    ckpt = load_torch(path, what)
    fmt, found_arch, backbone, head, skipped, meta = _parse_checkpoint(ckpt, path, dino_network)
    backbone, renamed = xcit_official_to_timm(backbone)
    if renamed:
        meta["renamed_keys"] = renamed  # the xcit repository's names (DINO's XCiT) -> timm's
    if arch is None:
        arch = found_arch if found_arch in BACKBONES else infer_arch(backbone)
    queue = meta.pop("queue", {})
    head_act, head_sources = meta.pop("head_act", "relu"), meta.pop("head_sources", {})
    return BackboneCheckpoint(arch, backbone, head, fmt, skipped, meta, queue, head_act, head_sources)


def _queue(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The MoCo queue (CxK) and its pointer under ``prefix`` (``module.`` / ``""`` in MoCo's and DisCo-pytorch's
    .pth.tar, ``testbed.`` in our pretraining checkpoints), or {} when the file has none."""
    queue, ptr = sd.get(prefix + "queue"), sd.get(prefix + "queue_ptr")
    if not isinstance(queue, torch.Tensor) or queue.ndim != 2 or not isinstance(ptr, torch.Tensor):
        return {}
    return {"queue": queue, "queue_ptr": ptr.reshape(1).long()}
