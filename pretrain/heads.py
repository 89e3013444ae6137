"""Projection MLPs, laid out as ``nn.Sequential`` so the published checkpoints' keys map onto them directly:
MoCo-v2 ``fc.0`` / ``fc.2`` (Linear, ReLU, Linear), MoCo-v1 ``fc`` (one Linear), SwAV ``projection_head.0/1/3``
(Linear, BatchNorm1d, ReLU, Linear), DINO ``head.mlp.0/2/4`` (Linear, GELU, Linear, GELU, Linear; with
``use_bn_in_head`` a BatchNorm1d after each hidden Linear: ``0/1/3/4/6``)."""
from typing import Dict

import torch
from torch import nn

#: ``build_head``'s ``act`` -> the activation module between its linear layers. ReLU: MoCo, SwAV and our students;
#: GELU (PyTorch's exact erf form, ``nn.GELU()``, as DINO's ``DINOHead``): DINO.
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def build_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = False,
               act: str = "relu") -> nn.Sequential:
    """``num_layers`` linear layers in_dim -> hidden_dim -> ... -> out_dim with ``act`` (``"relu"`` or ``"gelu"``; see
    :data:`ACTIVATIONS`) and optional BN between. The activation has no weights, so a checkpoint cannot tell it:
    the caller names it (DINO's heads are GELU)."""
    if num_layers < 1:
        raise ValueError(f"a projection head needs at least one layer, got NUM_LAYERS={num_layers}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown projection head activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    layers = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim))
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(ACTIVATIONS[act]())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def infer_head_spec(state_dict: Dict[str, torch.Tensor], act: str = "relu") -> dict:
    """The ``build_head`` arguments that reproduce a head from its state dict (keys ``0.weight``, ``2.weight``, ...).
    ``act``: the activation, which no state dict records (the checkpoint's format tells it; ReLU unless DINO).

    Used for teachers: a teacher keeps the head it was pretrained with, whatever its shape.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown projection head activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    linear = sorted(int(k.split(".")[0]) for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2)
    if not linear:
        raise ValueError(f"no linear layer in head state dict (keys: {sorted(state_dict)})")
    bn = any(k.endswith("running_mean") for k in state_dict)
    first, last = state_dict[f"{linear[0]}.weight"], state_dict[f"{linear[-1]}.weight"]
    return dict(in_dim=first.shape[1], hidden_dim=first.shape[0] if len(linear) > 1 else 0,
                out_dim=last.shape[0], num_layers=len(linear), bn=bn, act=act)


def head_activation(head: nn.Module) -> str:
    """The ``act`` name of a :func:`build_head` head (what an export records: a state dict cannot tell it)."""
    return "gelu" if any(isinstance(m, nn.GELU) for m in head.modules()) else "relu"
