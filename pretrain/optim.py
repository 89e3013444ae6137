"""Optimizers and parameter groups of the pretrainer (SOLVER.OPTIMIZER, SOLVER.WEIGHT_DECAY_NORM_BIAS)."""
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn


class LARC(torch.optim.SGD):
    """SGD with LARC's layer-wise adaptive rate (You et al. 2017; NVIDIA apex's ``LARC`` with ``clip=False``, which
    SwAV uses): before the SGD step, each parameter's gradient (plus its weight decay) is scaled by

        trust * ||p|| / (||g|| + wd * ||p|| + eps)

    so the update is ``lr * trust * ||p||`` in size whatever the gradient's scale. A parameter whose norm or gradient
    norm is zero is left as plain SGD without weight decay for that step (as apex does). The state dict is SGD's."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001,
                 eps: float = 1e-8):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.trust, self.eps = trust, eps

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("LARC.step takes no closure")
        decays = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            decays.append(wd)
            group["weight_decay"] = 0.0  # applied below, inside the adaptive scaling
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                if p_norm != 0 and g_norm != 0:
                    rate = self.trust * p_norm / (g_norm + p_norm * wd + self.eps)
                    p.grad.add_(p, alpha=wd).mul_(rate)
        try:
            super().step()
        finally:
            for group, wd in zip(self.param_groups, decays):
                group["weight_decay"] = wd


def param_groups(named: Iterable[Tuple[str, nn.Parameter]], weight_decay: float, norm_bias: bool
                 ) -> List[Dict[str, object]]:
    """The optimizer's parameter groups: one (every parameter decayed) when ``norm_bias``, else two, the second
    (biases and every 1-d parameter: norm weights, ViT tokens are not 1-d) without weight decay, as DINO's
    ``get_params_groups`` splits them. The order of the parameters is kept within each group."""
    named = list(named)
    if norm_bias:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    decayed = [p for n, p in named if not (n.endswith(".bias") or p.ndim <= 1)]
    plain = [p for n, p in named if n.endswith(".bias") or p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(cfg, named: Iterable[Tuple[str, nn.Parameter]], lr: float) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER over ``named`` (the method's trainable parameters with their names) at peak ``lr``."""
    s = cfg.SOLVER
    groups = param_groups(named, s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM_BIAS)
    if s.OPTIMIZER == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    if s.OPTIMIZER == "larc":
        return LARC(groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY, trust=s.LARC_TRUST)
    return torch.optim.AdamW(groups, lr=lr, betas=(s.MOMENTUM, 0.999), weight_decay=s.WEIGHT_DECAY)
