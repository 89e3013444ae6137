"""Backbone registry: name -> a timm model with its classifier removed (``num_classes=0``), returning pooled features.

All models come from timm with ``pretrained=False``; weights are only ever loaded from local files. Key names are
timm's, so an exported student loads with ``timm.create_model(arch, num_classes=0, checkpoint_path=...)``.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict

import timm
from timm.models.resnet import Bottleneck, ResNet
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    feature_dim: int  # pooled feature dim (the input dim of the projection head)
    build: Callable[[], nn.Module]
    timm_arch: str = ""  # timm.create_model name that loads an export; "" when timm has no such name
    notes: str = ""


def _timm(arch: str, **kwargs) -> Callable[[], nn.Module]:
    return partial(timm.create_model, arch, pretrained=False, num_classes=0, **kwargs)


def _resnet50x2() -> nn.Module:
    """SwAV's ResNet-50x2: every width doubled, the 7x7 stem included (not torchvision's wide_resnet50_2, which widens
    only the bottleneck). timm's 7x7 stem is fixed at 64 channels, so the stem and the first block's inputs are
    rebuilt at 128. SwAV pads 1 then convolves with padding 2, which equals the padding 3 used here."""
    model = ResNet(Bottleneck, (3, 4, 6, 3), num_classes=0, channels=(128, 256, 512, 1024))
    model.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(128)
    first = model.layer1[0]
    first.conv1 = nn.Conv2d(128, first.conv1.out_channels, kernel_size=1, bias=False)
    first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, kernel_size=1, bias=False)
    model.feature_info[0]["num_chs"] = 128
    return model


def _convnet(widths) -> Callable[[], nn.Module]:
    """A plain VGG-style CNN for 32-px images: per width a 3x3 conv, BatchNorm, ReLU and 2x2 max-pool, then global
    average pooling. Demo / test scale only (not in the paper): on 32-px synthetic data and a few CPU minutes these
    learn self-supervised features that separate the classes, where ImageNet-layout ResNets are still at chance."""
    def build() -> nn.Module:
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return build


BACKBONES: Dict[str, BackboneSpec] = {
    # students (paper Table 1)
    "efficientnet_b0": BackboneSpec(1280, _timm("efficientnet_b0"), "efficientnet_b0"),
    "efficientnet_b1": BackboneSpec(1280, _timm("efficientnet_b1"), "efficientnet_b1"),
    "mobilenetv3_large_100": BackboneSpec(1280, _timm("mobilenetv3_large_100"), "mobilenetv3_large_100",
                                          notes="pooled 960 -> conv_head 1280"),
    "resnet18": BackboneSpec(512, _timm("resnet18"), "resnet18"),
    "resnet34": BackboneSpec(512, _timm("resnet34"), "resnet34"),
    "vit_tiny_patch16_224": BackboneSpec(192, _timm("vit_tiny_patch16_224", dynamic_img_size=True),
                                         "vit_tiny_patch16_224"),
    "xcit_tiny_12_p16_224": BackboneSpec(192, _timm("xcit_tiny_12_p16_224"), "xcit_tiny_12_p16_224"),
    # teachers
    "resnet50": BackboneSpec(2048, _timm("resnet50"), "resnet50"),
    "resnet101": BackboneSpec(2048, _timm("resnet101"), "resnet101"),
    "resnet152": BackboneSpec(2048, _timm("resnet152"), "resnet152"),
    "resnet50x2": BackboneSpec(4096, _resnet50x2, "", notes="SwAV's ResNet-50x2 (all widths x2)"),
    # 32-px models for the CPU demo and tests; not in the paper
    "convnet_small": BackboneSpec(256, _convnet((64, 128, 256)), "", notes="3 conv blocks, 0.37M params"),
    "convnet_tiny": BackboneSpec(64, _convnet((16, 32, 64)), "", notes="3 conv blocks, 0.02M params"),
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
