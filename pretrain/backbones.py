"""Backbone registry: name -> a timm model with its classifier removed (``num_classes=0``), returning pooled features.

All models come from timm with ``pretrained=False``; weights are only ever loaded from local files. Key names are
timm's, so an exported student loads with ``timm.create_model(arch, num_classes=0, checkpoint_path=...)``: with plain
timm for timm's architectures, and for the demo's ``convnet_small`` / ``convnet_tiny`` (ours) once this module is
imported, which registers them in timm's model registry (bottom of this file). ``resnet50x2`` has no timm name.

Initialisation: every ResNet (resnet18/34/50/101/152, resnet50x2) is built with ``zero_init_last=False``, as the
official DisCo code builds its students from torchvision (``zero_init_residual=False``: the last BatchNorm scale of
each residual block starts at 1). timm's default (``zero_init_last=True``) would start it at 0. The rest of timm's
ResNet init already matches torchvision's: convs ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, BatchNorm
weight 1 / bias 0 (PyTorch's default, which torchvision sets explicitly); modules are built and initialised in the
same order, so timm's ``resnet18/50(num_classes=1000, zero_init_last=False)`` equals torchvision's under one seed,
bitwise. The one remaining difference: with ``num_classes=0`` there is no ``fc``, whose construction draws
(before the conv re-init) are skipped, so the same seed gives different, identically distributed conv weights from
a torchvision model with an ``fc``; the official code's own draws depend on its ``fc`` size anyway.

Feature maps: ``forward_with_maps(backbone, images)`` returns the pooled features (bitwise equal to
``backbone(images)``) and one NCHW map per stage, shallow to deep; ``stage_info(name)`` gives each map's channels
and stride (``reduction``). The stages are timm's ``feature_info`` levels:

* ResNets: the stem (after ``act1``, before the max-pool; stride 2) and ``layer1``..``layer4`` (strides 4..32).
* EfficientNet-B0/B1, MobileNetV3-Large: the last block of each stride (strides 2, 4, 8, 16, 32); the stride-32 map
  is the last block's output, before ``conv_head`` (MobileNetV3: the 960-channel 1x1 ConvBnAct block, before the
  pooled ``conv_head`` to 1280).
* ViT-Tiny / ViT-Small, XCiT-Tiny / XCiT-Small: every one of the 12 transformer blocks (stride 16), its patch tokens
  (the class token dropped) before the final norm, reshaped to NCHW. XCiT's two class-attention blocks are not
  stages.
* ``convnet_small`` / ``convnet_tiny``: the output of each conv block's 2x2 max-pool (strides 2, 4, 8).
"""
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Dict, List, Tuple

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

__all__ = ["BACKBONES", "BackboneSpec", "CONVNET_WIDTHS", "ConvNet", "build_backbone", "feature_dim",
           "forward_with_maps", "get_spec", "stage_info"]  # timm's register_model adds the two convnet entrypoints

_TORCHVISION_INIT = "zero_init_last=False: last BN of each block starts at 1, as torchvision (the official code)"


@dataclass(frozen=True)
class BackboneSpec:
    feature_dim: int  # pooled feature dim (the input dim of the projection head)
    build: Callable[[], nn.Module]
    timm_arch: str = ""  # timm.create_model name that loads an export; "" when timm has no such name (the convnets:
    # after ``import pretrain.backbones``, which registers them with timm)
    notes: str = ""


def _timm(arch: str, **kwargs) -> Callable[[], nn.Module]:
    return partial(timm.create_model, arch, pretrained=False, num_classes=0, **kwargs)


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The init timm's ``ResNet.init_weights`` (and torchvision's ResNet) gives every conv."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet50x2() -> nn.Module:
    """SwAV's ResNet-50x2: every width doubled, the 7x7 stem included (not torchvision's wide_resnet50_2, which widens
    only the bottleneck). timm's 7x7 stem is fixed at 64 channels, so the stem and the first block's inputs are
    rebuilt at 128. SwAV pads 1 then convolves with padding 2, which equals the padding 3 used here.

    ``zero_init_last=False`` as the other ResNets; the rebuild replaces only the stem conv/BN and the first block's
    ``conv1`` / ``downsample[0]``, none of them a block's last BN, so every ``bn3`` keeps its weight 1. The three
    rebuilt convs are created after timm's ``init_weights`` ran, so they get its kaiming-normal (fan_out) init
    here instead of PyTorch's default Conv2d init; the rebuilt BN is PyTorch's default (weight 1, bias 0)."""
    model = ResNet(Bottleneck, (3, 4, 6, 3), num_classes=0, channels=(128, 256, 512, 1024), zero_init_last=False)
    model.conv1 = _kaiming_conv(nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False))
    model.bn1 = nn.BatchNorm2d(128)
    first = model.layer1[0]
    first.conv1 = _kaiming_conv(nn.Conv2d(128, first.conv1.out_channels, kernel_size=1, bias=False))
    first.downsample[0] = _kaiming_conv(nn.Conv2d(128, first.downsample[0].out_channels, kernel_size=1, bias=False))
    model.feature_info[0]["num_chs"] = 128
    return model


class ConvNet(nn.Sequential):
    """``nn.Sequential`` of conv blocks (Conv2d, BatchNorm2d, ReLU, MaxPool2d) then AdaptiveAvgPool2d(1), Flatten,
    with timm's feature-map interface. A plain subclass: the state-dict keys (``0.weight``, ``1.weight``, ...), the
    construction and ``forward`` are ``nn.Sequential``'s. The stages are the max-pool outputs.

    ``num_classes`` (timm's meaning): 0, the default and what the registry builds, has no classifier (``forward``
    returns the pooled features); n > 0 appends a Linear classifier ``fc`` (keys ``fc.weight`` / ``fc.bias``) on the
    pooled features, run last by ``forward``. ``reset_classifier(n)`` replaces it (0 removes it)."""

    def __init__(self, *args, num_classes: int = 0):
        super().__init__(*args)
        # the conv blocks are the modules before the head (AdaptiveAvgPool2d, Flatten)
        self.num_blocks = next((i for i, m in enumerate(self) if isinstance(m, nn.AdaptiveAvgPool2d)), len(self))
        self.feature_info: List[dict] = []
        channels, reduction = 0, 1
        for i, m in enumerate(self):
            if isinstance(m, nn.Conv2d):
                channels, reduction = m.out_channels, reduction * m.stride[0]
            elif isinstance(m, nn.MaxPool2d):
                reduction *= m.stride if isinstance(m.stride, int) else m.stride[0]
                self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=str(i)))
        self.num_features = channels
        self.num_classes = 0
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self._modules["fc"] if "fc" in self._modules else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        """A new Linear classifier ``fc`` with ``num_classes`` outputs (randomly initialised), or none for 0.
        ``global_pool``: timm's signature; the pooling is always global average pooling."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"ConvNet pools by global average only (global_pool={global_pool!r})")
        self._modules.pop("fc", None)
        self.num_classes = int(num_classes)
        if self.num_classes:
            self.fc = nn.Linear(self.num_features, self.num_classes)  # a child module: nn.Sequential runs it last

    def forward_intermediates(self, x: Tensor, indices=None, intermediates_only: bool = False):
        """timm's convention: ``(final, maps)``, or only ``maps`` with ``intermediates_only``; ``indices``: the last n
        stages if int, all if None, else the stage indices given."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        intermediates, stage = [], 0
        for m in list(self)[:self.num_blocks]:  # the conv blocks
            x = m(x)
            if isinstance(m, nn.MaxPool2d):
                if stage in take_indices:
                    intermediates.append(x)
                stage += 1
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """AdaptiveAvgPool2d(1), Flatten, then the classifier ``fc`` if there is one and not ``pre_logits``."""
        x = self[self.num_blocks + 1](self[self.num_blocks](x))
        return x if pre_logits or "fc" not in self._modules else self.fc(x)


def _convnet(widths) -> Callable[..., nn.Module]:
    """A plain VGG-style CNN for 32-px images: per width a 3x3 conv, BatchNorm, ReLU and 2x2 max-pool, then global
    average pooling. Demo / test scale only (not in the paper): on 32-px synthetic data and a few CPU minutes these
    learn self-supervised features that separate the classes, where ImageNet-layout ResNets are still at chance.
    ``build(num_classes=0)``: see :class:`ConvNet`."""
    def build(num_classes: int = 0) -> nn.Module:
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        return ConvNet(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), num_classes=num_classes)
    return build


CONVNET_WIDTHS = {"convnet_small": (64, 128, 256), "convnet_tiny": (16, 32, 64)}


BACKBONES: Dict[str, BackboneSpec] = {
    # students (paper Table 1)
    "efficientnet_b0": BackboneSpec(1280, _timm("efficientnet_b0"), "efficientnet_b0"),
    "efficientnet_b1": BackboneSpec(1280, _timm("efficientnet_b1"), "efficientnet_b1"),
    "mobilenetv3_large_100": BackboneSpec(1280, _timm("mobilenetv3_large_100"), "mobilenetv3_large_100",
                                          notes="pooled 960 -> conv_head 1280"),
    "resnet18": BackboneSpec(512, _timm("resnet18", zero_init_last=False), "resnet18", notes=_TORCHVISION_INIT),
    "resnet34": BackboneSpec(512, _timm("resnet34", zero_init_last=False), "resnet34", notes=_TORCHVISION_INIT),
    "vit_tiny_patch16_224": BackboneSpec(192, _timm("vit_tiny_patch16_224", dynamic_img_size=True),
                                         "vit_tiny_patch16_224", notes="stages: all 12 blocks (stride 16)"),
    "xcit_tiny_12_p16_224": BackboneSpec(192, _timm("xcit_tiny_12_p16_224"), "xcit_tiny_12_p16_224",
                                         notes="stages: all 12 XCA blocks (stride 16)"),
    # the CPU demo's ViT (DINO testbed at 32 px; not in the paper): timm's ViT at 4 blocks of width 96, 8-px patches
    # (16 tokens per 32-px crop). No timm name: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
    # embed_dim=96, depth=4, num_heads=3, num_classes=0, checkpoint_path=EXPORT) loads an export
    "vit_demo_patch8_32": BackboneSpec(96, _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96,
                                                 depth=4, num_heads=3, dynamic_img_size=True), "",
                                       notes="demo ViT: 4 blocks, width 96, 0.46M params"),
    # teachers
    "resnet50": BackboneSpec(2048, _timm("resnet50", zero_init_last=False), "resnet50", notes=_TORCHVISION_INIT),
    "resnet101": BackboneSpec(2048, _timm("resnet101", zero_init_last=False), "resnet101", notes=_TORCHVISION_INIT),
    "resnet152": BackboneSpec(2048, _timm("resnet152", zero_init_last=False), "resnet152", notes=_TORCHVISION_INIT),
    "resnet50x2": BackboneSpec(4096, _resnet50x2, "", notes="SwAV's ResNet-50x2 (all widths x2); " + _TORCHVISION_INIT),
    # DINO's transformer teachers (paper Table 6): dino_deitsmall16_pretrain.pth has timm's ViT-S/16 key names;
    # dino_xcit_small_12_p16_pretrain.pth has the xcit repo's, which pretrain.formats maps to timm's
    "vit_small_patch16_224": BackboneSpec(384, _timm("vit_small_patch16_224", dynamic_img_size=True),
                                          "vit_small_patch16_224", notes="stages: all 12 blocks (stride 16)"),
    "xcit_small_12_p16_224": BackboneSpec(384, _timm("xcit_small_12_p16_224"), "xcit_small_12_p16_224",
                                          notes="stages: all 12 XCA blocks (stride 16)"),
    # 32-px models for the CPU demo and tests; not in the paper
    # (timm names once this module is imported: see _register_convnets)
    "convnet_small": BackboneSpec(256, _convnet(CONVNET_WIDTHS["convnet_small"]), "convnet_small",
                                  notes="3 conv blocks, 0.37M params"),
    "convnet_tiny": BackboneSpec(64, _convnet(CONVNET_WIDTHS["convnet_tiny"]), "convnet_tiny",
                                 notes="3 conv blocks, 0.02M params"),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone; ``forward(images)`` returns ``N x feature_dim(name)`` pooled features."""
    return get_spec(name).build()


def feature_dim(name: str) -> int:
    return get_spec(name).feature_dim


def forward_with_maps(backbone: nn.Module, images: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """``(pooled, maps)``: ``pooled`` is bitwise ``backbone(images)`` (same ops in the same order: timm's
    ``forward_intermediates`` then ``forward_head(pre_logits=True)``; with ``num_classes=0`` the head is an Identity);
    ``maps`` the NCHW feature map of every stage, shallow to deep, as ``stage_info`` lists them (module docstring).
    Works on any registry backbone, in train or eval mode; gradients flow through both outputs."""
    final, maps = backbone.forward_intermediates(images, indices=None, intermediates_only=False)
    return backbone.forward_head(final, pre_logits=True), maps


@lru_cache(maxsize=None)
def _stage_info(name: str) -> Tuple[Tuple[Tuple[str, object], ...], ...]:
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no init cost, global RNG untouched
        model = spec.build()
    return tuple(tuple((k, f[k]) for k in ("num_chs", "reduction", "module")) for f in model.feature_info)


def stage_info(name: str) -> List[dict]:
    """Per stage of ``forward_with_maps``, shallow to deep: ``num_chs`` (channels), ``reduction`` (stride w.r.t. the
    input) and ``module`` (the module whose output it is). From timm's ``feature_info`` (``ConvNet.feature_info`` for
    the convnets). Stages of a student and a teacher pair up by ``reduction``."""
    return [dict(f) for f in _stage_info(name)]


# ---------------------------------------------------------------------------------------------------------------
# The demo convnets in timm's model registry: once this module is imported, ``timm.create_model("convnet_small",
# num_classes=0, checkpoint_path=EXPORT)`` builds the model and loads an export strictly, as for timm's own
# architectures. Their pretrained configs (what ``timm.data.resolve_model_data_config`` reads) say 32-px inputs, the
# ImageNet mean / std of DATA.MEAN / DATA.STD's defaults and the kNN monitor's 0.875 centre crop; they name no weights:
# nothing is ever downloaded. ``register_model`` reads ``default_cfgs`` of this module when it registers a name.
default_cfgs = generate_default_cfgs({
    name: dict(num_classes=0, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=0.875, interpolation="bicubic",
               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="0", classifier="fc",
               description=f"DisCo transfer suite demo CNN ({BACKBONES[name].notes}); weights: this project's exports")
    for name in CONVNET_WIDTHS})


def _create_convnet(name: str, pretrained: bool = False, num_classes: int = 0, pretrained_cfg=None,
                    pretrained_cfg_overlay=None, cache_dir=None) -> ConvNet:
    """timm entrypoint body. ``timm.create_model`` always passes ``pretrained``, ``pretrained_cfg``,
    ``pretrained_cfg_overlay`` and ``cache_dir`` (the latter only matters for downloads, of which there are none);
    ``num_classes`` as :class:`ConvNet` (default 0: pooled features). It loads ``checkpoint_path`` itself, after this
    returns. Any other model argument is a TypeError naming it."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights to download: it is the DisCo transfer suite's demo CNN. "
                         f"Load an export: timm.create_model({name!r}, num_classes=0, checkpoint_path=...)")
    model = _convnet(CONVNET_WIDTHS[name])(num_classes=num_classes)
    model.pretrained_cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    model.default_cfg = model.pretrained_cfg  # timm's alias
    return model


@register_model
def convnet_small(pretrained: bool = False, **kwargs) -> ConvNet:
    """The demo's 32-px CNN, widths 64-128-256 (``BACKBONES["convnet_small"]``)."""
    return _create_convnet("convnet_small", pretrained, **kwargs)


@register_model
def convnet_tiny(pretrained: bool = False, **kwargs) -> ConvNet:
    """The tests' 32-px CNN, widths 16-32-64 (``BACKBONES["convnet_tiny"]``)."""
    return _create_convnet("convnet_tiny", pretrained, **kwargs)
