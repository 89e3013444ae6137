"""The student / teacher encoder: backbone -> projection head -> L2 normalisation."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone, feature_dim, forward_with_maps
from .heads import build_head


class Encoder(nn.Module):
    """backbone -> projection head -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, embed: bool = False, maps: bool = False):
        """The embedding (NxC, L2-normalised); with ``embed``, :meth:`embed`'s dict. ``embed`` runs through here, so
        ``nn.Module.compile`` (TRAIN.COMPILE), which compiles ``__call__``, covers every use of the encoder."""
        if not embed:
            return F.normalize(self.head(self.backbone(images)), dim=1)  # NxC
        if maps:
            features, stage_maps = forward_with_maps(self.backbone, images)
        else:
            features, stage_maps = self.backbone(images), None
        out = {"embedding": F.normalize(self.head(features), dim=1), "features": features}
        if maps:
            out["maps"] = stage_maps
        return out

    @property
    def out_dim(self) -> int:
        """C, the embedding's dimension: the output size of the head's last linear layer."""
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1].out_features

    def embed(self, images: torch.Tensor, maps: bool = False) -> Dict[str, object]:
        """``embedding`` (NxC, L2-normalised; equal to ``forward``), ``features`` (NxD pooled backbone output) and,
        with ``maps``, ``maps``: the backbone's per-stage feature maps (``pretrain.backbones.stage_info``)."""
        return self(images, embed=True, maps=maps)


def build_encoder(arch: str, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = False) -> Encoder:
    return Encoder(build_backbone(arch), build_head(feature_dim(arch), hidden_dim, out_dim, num_layers, bn))


def build_student_encoder(cfg) -> Encoder:
    """The student of ``cfg`` (MODEL.STUDENT): a freshly initialised backbone and projection head."""
    s = cfg.MODEL.STUDENT
    return build_encoder(s.ARCH, s.HEAD.HIDDEN_DIM, s.HEAD.OUT_DIM, s.HEAD.NUM_LAYERS, s.HEAD.BN)
