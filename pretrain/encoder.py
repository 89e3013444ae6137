"""The student / teacher encoder: backbone -> projection head -> L2 normalisation."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone, feature_dim, forward_with_maps, get_spec
from .heads import build_head


class Encoder(nn.Module):
    """backbone -> projection head -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, head: nn.Module, normalize: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # False: the embedding is the head's raw output (MODEL.TEACHER.NORMALIZE False: the official SwAV + DisCo
        # teacher); every encoder this project trains normalises
        self.normalize = normalize

    def forward(self, images, embed: bool = False, maps: bool = False):
        """The embedding (NxC, L2-normalised); with ``embed``, :meth:`embed`'s dict. ``embed`` runs through here, so
        ``nn.Module.compile`` (TRAIN.COMPILE), which compiles ``__call__``, covers every use of the encoder.

        ``images`` may be a list of batches of different image sizes (multi-crop: the views of one size
        concatenated): the backbone runs on each, the head on all of their features at once, as SwAV's and DINO's
        multi-crop forward (so a BatchNorm in the head normalises over every crop)."""
        if isinstance(images, (list, tuple)):
            if maps:
                raise ValueError("per-stage feature maps of crops of several sizes cannot be batched; the parts "
                                 "of this method that read maps need views of one size")
            features = torch.cat([self.backbone(x) for x in images])
            embedding = self._normalize(self.head(features))
            return {"embedding": embedding, "features": features} if embed else embedding
        if not embed:
            return self._normalize(self.head(self.backbone(images)))  # NxC
        if maps:
            features, stage_maps = forward_with_maps(self.backbone, images)
        else:
            features, stage_maps = self.backbone(images), None
        out = {"embedding": self._normalize(self.head(features)), "features": features}
        if maps:
            out["maps"] = stage_maps
        return out

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) if self.normalize else x

    @property
    def backbone_dim(self) -> int:
        """D, the pooled backbone feature's dimension (timm's ``head_hidden_size`` where it differs from
        ``num_features``: MobileNetV3's 1280 after conv_head)."""
        return getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features

    @property
    def out_dim(self) -> int:
        """C, the embedding's dimension: the output size of the head's last linear layer; with no linear layer (a
        teacher loaded without a projection head, ``nn.Identity``) the backbone's pooled feature dimension."""
        linear = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        if linear:
            return linear[-1].out_features
        return self.backbone_dim

    def embed(self, images: torch.Tensor, maps: bool = False) -> Dict[str, object]:
        """``embedding`` (NxC, L2-normalised; equal to ``forward``), ``features`` (NxD pooled backbone output) and,
        with ``maps``, ``maps``: the backbone's per-stage feature maps (``pretrain.backbones.stage_info``)."""
        return self(images, embed=True, maps=maps)


def build_encoder(arch: str, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = False,
                  act: str = "relu", drop_path: float = 0.0) -> Encoder:
    """A freshly initialised ``arch`` backbone and projection head (``act``: ``"relu"`` or ``"gelu"``, as
    :func:`pretrain.heads.build_head`). ``drop_path`` > 0: stochastic depth (timm's ``drop_path_rate``) for
    architectures that have residual blocks (timm ResNets, EfficientNets, ViT, XCiT)."""
    if drop_path > 0:
        try:
            backbone = get_spec(arch).build(drop_path_rate=drop_path)
        except TypeError as e:  # a builder without the argument (the demo convnets, SwAV's ResNet-50x2)
            raise ValueError(f"MODEL.STUDENT.DROP_PATH {drop_path}: {arch} has no stochastic depth; set it to "
                             f"0") from e
    else:
        backbone = build_backbone(arch)
    return Encoder(backbone, build_head(feature_dim(arch), hidden_dim, out_dim, num_layers, bn, act))


def build_student_encoder(cfg) -> Encoder:
    """The student of ``cfg`` (MODEL.STUDENT): a freshly initialised backbone and projection head."""
    s = cfg.MODEL.STUDENT
    return build_encoder(s.ARCH, s.HEAD.HIDDEN_DIM, s.HEAD.OUT_DIM, s.HEAD.NUM_LAYERS, s.HEAD.BN, s.HEAD.ACT,
                         s.DROP_PATH)
