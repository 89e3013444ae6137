"""Projection MLPs, laid out as ``nn.Sequential`` so the published checkpoints' keys map onto them directly:
MoCo-v2 ``fc.0`` / ``fc.2`` (Linear, ReLU, Linear), MoCo-v1 ``fc`` (one Linear), SwAV ``projection_head.0/1/3``
(Linear, BatchNorm1d, ReLU, Linear)."""
from typing import Dict

import torch
from torch import nn


def build_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = False) -> nn.Sequential:
    """``num_layers`` linear layers in_dim -> hidden_dim -> ... -> out_dim with ReLU (and optional BN) between."""
    if num_layers < 1:
        raise ValueError(f"a projection head needs at least one layer, got NUM_LAYERS={num_layers}")
    layers = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim))
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def infer_head_spec(state_dict: Dict[str, torch.Tensor]) -> dict:
    """The ``build_head`` arguments that reproduce a head from its state dict (keys ``0.weight``, ``2.weight``, ...).

    Used for teachers: a teacher keeps the head it was pretrained with, whatever its shape.
    """
    linear = sorted(int(k.split(".")[0]) for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2)
    if not linear:
        raise ValueError(f"no linear layer in head state dict (keys: {sorted(state_dict)})")
    bn = any(k.endswith("running_mean") for k in state_dict)
    first, last = state_dict[f"{linear[0]}.weight"], state_dict[f"{linear[-1]}.weight"]
    return dict(in_dim=first.shape[1], hidden_dim=first.shape[0] if len(linear) > 1 else 0,
                out_dim=last.shape[0], num_layers=len(linear), bn=bn)
