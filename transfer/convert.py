"""Student backbones -> detectron2 weights: explicit key tables per architecture family, pure functions.

Every key of the input is either mapped to a FULL detectron2 model key (``backbone.res4.2.conv1.norm.weight``,
``roi_heads.res5.0.shortcut.weight``, ...) or dropped with a reason; a key that is neither is an error. Full names
mean the output needs no suffix-matching heuristic (``matching_heuristics: False``): detectron2's heuristics plus its
shape-mismatch skipping are how a res5 that does not exist in the checkpoint silently stays random.

Layouts: ``"C4"`` (res2-4 / the stride-16 part in ``backbone.``, the last stage in the ROI head ``roi_heads.res5.``)
and ``"FPN"`` (everything up to stride 32 in the FPN's ``backbone.bottom_up.``).
"""
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from pretrain.checkpoint import key_mismatch, save_atomic
from pretrain.formats import arch_signature, read_backbone

LAYOUTS = ("C4", "FPN")
AUTHOR = "disco-transfer"

# ----------------------------------------------------------------------------------------------------------------
# ResNet (torchvision / timm key names) -> detectron2 ResNet

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(src: str, dst: str) -> Dict[str, str]:
    return {f"{src}.{f}": f"{dst}.{f}" for f in _BN_FIELDS}


RESNET_STEM = {"conv1.weight": "stem.conv1.weight", **_bn("bn1", "stem.conv1.norm")}
RESNET_STAGES = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}
# Inside one residual block (BasicBlock: conv1-2 / bn1-2; Bottleneck: conv1-3 / bn1-3; first block: downsample).
RESNET_BLOCK = {
    "conv1.weight": "conv1.weight", "conv2.weight": "conv2.weight", "conv3.weight": "conv3.weight",
    **_bn("bn1", "conv1.norm"), **_bn("bn2", "conv2.norm"), **_bn("bn3", "conv3.norm"),
    "downsample.0.weight": "shortcut.weight", **_bn("downsample.1", "shortcut.norm"),
}
RESNET_DROPPED = {"fc.weight": "ImageNet classifier (not part of the backbone)",
                  "fc.bias": "ImageNet classifier (not part of the backbone)"}
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50x2")


def resnet_d2_name(key: str) -> Optional[str]:
    """torchvision name -> detectron2 ResNet name relative to the backbone (``layer3.1.bn2.weight`` ->
    ``res4.1.conv2.norm.weight``); None when the tables do not know the key."""
    if key in RESNET_STEM:
        return RESNET_STEM[key]
    parts = key.split(".", 2)  # layerN, block index, rest
    if len(parts) == 3 and parts[0] in RESNET_STAGES and parts[1].isdigit() and parts[2] in RESNET_BLOCK:
        return f"{RESNET_STAGES[parts[0]]}.{parts[1]}.{RESNET_BLOCK[parts[2]]}"
    return None


def _place_resnet(name: str, layout: str) -> str:
    """Backbone-relative detectron2 name -> full model key for ``layout``."""
    if layout == "FPN":
        return "backbone.bottom_up." + name
    if name.startswith("res5."):  # C4: res5 runs per region in the ROI head
        return "roi_heads." + name
    return "backbone." + name


# ----------------------------------------------------------------------------------------------------------------
# timm students (EfficientNet / MobileNetV3: conv_stem, bn1, blocks.0-6, ...) -> transfer.d2.timm_backbone


@dataclass(frozen=True)
class TimmLayout:
    """Where each part of a timm student goes. ``feature_blocks``: the block (index into ``blocks``) whose output is
    the feature of each stride (res2 = 1/4 ... res5 = 1/32; timm's ``feature_info``). ``after_blocks``: modules
    that timm's ``forward_features`` applies after the blocks (spatially): the C4 ROI stage runs them too.
    ``dropped``: top-level modules detection does not use, with the reason."""

    timm_arch: str
    num_blocks: int
    feature_blocks: Dict[str, int]
    after_blocks: Tuple[str, ...] = ()
    dropped: Dict[str, str] = field(default_factory=dict)
    stem: Tuple[str, ...] = ("conv_stem", "bn1")

    @property
    def c4_split(self) -> int:
        """First block of the C4 ROI stage (everything after the stride-16 feature)."""
        return self.feature_blocks["res4"] + 1


_EFFNET_FEATURES = {"res2": 1, "res3": 2, "res4": 4, "res5": 6}
TIMM_LAYOUTS: Dict[str, TimmLayout] = {
    "efficientnet_b0": TimmLayout("efficientnet_b0", 7, _EFFNET_FEATURES, after_blocks=("conv_head", "bn2")),
    "efficientnet_b1": TimmLayout("efficientnet_b1", 7, _EFFNET_FEATURES, after_blocks=("conv_head", "bn2")),
    "mobilenetv3_large_100": TimmLayout(
        "mobilenetv3_large_100", 7, _EFFNET_FEATURES,
        dropped={"conv_head": "MobileNetV3's pre-logits layer: a 1x1 conv timm applies after global pooling, not a "
                              "spatial feature"}),
}


def get_timm_layout(arch: str) -> TimmLayout:
    if arch not in TIMM_LAYOUTS:
        raise KeyError(f"no detectron2 layout for timm student {arch!r}; known: {', '.join(sorted(TIMM_LAYOUTS))}")
    return TIMM_LAYOUTS[arch]


def timm_d2_key(key: str, arch: str, layout: str) -> Tuple[Optional[str], str]:
    """timm key -> (full detectron2 key or None, reason when None). Raises KeyError for a key the table lacks."""
    t = get_timm_layout(arch)
    top, _, rest = key.partition(".")
    if top in t.dropped:
        return None, t.dropped[top]
    if top in t.stem:
        part = "backbone"
    elif top == "blocks" and rest.split(".", 1)[0].isdigit() and int(rest.split(".", 1)[0]) < t.num_blocks:
        part = "backbone" if int(rest.split(".", 1)[0]) < t.c4_split else "stage"
    elif top in t.after_blocks:
        part = "after"
    else:
        raise KeyError(key)
    if layout == "C4":
        return ("backbone.body." if part == "backbone" else "roi_heads.res5.") + key, ""
    if part == "after":
        return None, f"{top}: applied after the last feature level (res5); FPN uses the blocks' outputs"
    return "backbone.bottom_up.body." + key, ""


# ----------------------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class Conversion:
    """Converted weights (full detectron2 keys) and every input key left out, with the reason."""

    arch: str
    layout: str
    model: Dict[str, torch.Tensor]
    skipped: Dict[str, str] = field(default_factory=dict)
    format: str = ""
    source: str = ""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")


def _unmapped_error(keys, arch: str) -> KeyError:
    return KeyError(f"{len(keys)} key(s) of the {arch} checkpoint have no detectron2 name: {sorted(keys)}. The "
                    f"checkpoint is not a {arch} backbone in timm/torchvision key names; check --arch.")


def convert_resnet(state_dict: Dict[str, torch.Tensor], layout: str = "C4", arch: str = "resnet") -> Conversion:
    """torchvision/timm ResNet keys -> detectron2 (stem, res2-5; C4: res5 under ``roi_heads.res5.``)."""
    _check_layout(layout)
    out, skipped, unmapped = {}, {}, []
    for k, v in state_dict.items():
        if k in RESNET_DROPPED:
            skipped[k] = RESNET_DROPPED[k]
            continue
        name = resnet_d2_name(k)
        if name is None:
            unmapped.append(k)
        else:
            out[_place_resnet(name, layout)] = v
    if unmapped:
        raise _unmapped_error(unmapped, arch)
    return Conversion(arch, layout, out, skipped)


def convert_timm(state_dict: Dict[str, torch.Tensor], arch: str, layout: str = "C4") -> Conversion:
    """timm EfficientNet / MobileNetV3 keys -> ``transfer.d2.timm_backbone`` (``backbone.body.*`` and the C4 ROI
    stage ``roi_heads.res5.*``, or ``backbone.bottom_up.body.*`` with FPN). Names below those prefixes stay timm's."""
    _check_layout(layout)
    get_timm_layout(arch)
    out, skipped, unmapped = {}, {}, []
    for k, v in state_dict.items():
        try:
            new, why = timm_d2_key(k, arch, layout)
        except KeyError:
            unmapped.append(k)
            continue
        if new is None:
            skipped[k] = why
        else:
            out[new] = v
    if unmapped:
        raise _unmapped_error(unmapped, arch)
    return Conversion(arch, layout, out, skipped)


def convert_backbone(state_dict: Dict[str, torch.Tensor], arch: str, layout: str = "C4") -> Conversion:
    """Dispatch on the architecture family (``pretrain.backbones`` registry name)."""
    if arch in RESNET_ARCHS:
        return convert_resnet(state_dict, layout, arch)
    if arch in TIMM_LAYOUTS:
        return convert_timm(state_dict, arch, layout)
    why = ""
    if arch.startswith(("vit_", "xcit_")):  # DINO's teachers and the transformer students
        why = (f" {arch} is a vision transformer: this project's detectron2 configs (C4 / FPN Faster / Mask R-CNN) "
               f"take ResNet backbones (and the timm CNN students), whose stride-4..32 stages a plain transformer "
               f"does not have;")
    raise ValueError(f"no detectron2 conversion for architecture {arch!r};{why} supported: "
                     f"{', '.join(RESNET_ARCHS + tuple(TIMM_LAYOUTS))}")


def _check_arch(state_dict: Dict[str, torch.Tensor], arch: str, path: str) -> None:
    """The checkpoint must be exactly ``arch``'s backbone (keys and shapes), else name the differences."""
    missing, unexpected, shapes = key_mismatch(arch_signature(arch), state_dict)
    if missing or unexpected or shapes:
        raise ValueError(f"{path} is not a {arch} backbone: missing {len(missing)} {missing[:8]}, unexpected "
                         f"{len(unexpected)} {unexpected[:8]}, shape mismatches {len(shapes)} {shapes[:8]}. Pass the "
                         f"right --arch (or none, to infer it from the keys and shapes).")


def read_checkpoint(path: str, arch: Optional[str] = None):
    """``pretrain.formats.read_backbone`` plus the check that the backbone is exactly ``arch``'s."""
    ckpt = read_backbone(path, arch, what="checkpoint to convert")
    if arch is not None and ckpt.metadata.get("arch") not in (None, arch):
        raise ValueError(f"{path} says it is a {ckpt.metadata['arch']} but --arch is {arch}")
    _check_arch(ckpt.state_dict, ckpt.arch, path)
    return ckpt


def convert_read(ckpt, layout: str = "C4", path: str = "") -> Conversion:
    """Convert a :func:`read_checkpoint` result; ``skipped`` holds the reader's and the converter's dropped keys."""
    conv = convert_backbone(ckpt.state_dict, ckpt.arch, layout)
    conv.skipped = {**ckpt.skipped, **conv.skipped}
    conv.format, conv.source = ckpt.format, os.path.abspath(path) if path else ""
    return conv


def convert_checkpoint(path: str, arch: Optional[str] = None, layout: str = "C4") -> Conversion:
    """Read any known checkpoint format (our export, MoCo-v1/v2, DisCo-pytorch, SwAV / DeepCluster-v2 / SeLa-v2, a DINO
    ResNet-50, ...: :func:`pretrain.formats.read_backbone`) and convert it."""
    return convert_read(read_checkpoint(path, arch), layout, path)


def _to_numpy(v: torch.Tensor) -> np.ndarray:
    v = v.detach().cpu()
    if v.is_floating_point() and v.dtype not in (torch.float16, torch.float32, torch.float64):
        v = v.float()  # bfloat16 has no numpy dtype
    return v.numpy()


def d2_checkpoint(conv: Conversion) -> dict:
    """The ``.pkl`` payload detectron2's ``DetectionCheckpointer`` loads by exact key (no matching heuristics)."""
    return {"model": {k: _to_numpy(v) for k, v in conv.model.items()}, "__author__": AUTHOR,
            "matching_heuristics": False, "arch": conv.arch, "layout": conv.layout, "source": conv.source,
            "source_format": conv.format}


def save_d2_checkpoint(conv: Conversion, path: str) -> None:
    """Write :func:`d2_checkpoint` to ``path`` atomically (temp file in the same folder, then rename)."""
    save_atomic(d2_checkpoint(conv), path, dump=pickle.dump)
