"""One training step: L = the sum of every part's weighted terms, back-propagated one forward group at a time."""
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .model import size_batches, split_views


def train_step(model: torch.nn.Module, views, optimizer: torch.optim.Optimizer, scaler=None, *,
               amp_dtype: Optional[torch.dtype] = None, finite_check: Optional[Callable] = None,
               clip_grad: float = 0.0) -> Dict[str, torch.Tensor]:
    """One optimizer step on a batch of views; ``model`` is a :class:`pretrain.model.Method` or its
    DistributedDataParallel.

    The targets (momentum update and keys, the teacher's outputs) come first, without gradients. Then each student
    forward group (``Method.student_groups``: each MoCo-v2 view alone, or all multi-crop views in one forward, the
    views of one size batched together) is forwarded and back-propagated on its own, so only one group's graph is
    alive at a time (gradients add up to those of L; with DDP only the last backward all-reduces). Then the
    gradients are unscaled (float16), each parameter's clipped to ``clip_grad`` (L2 norm, when > 0: DINO's
    per-parameter clipping) and adjusted by the parts (frozen prototypes, ...). ``finite_check(losses)`` may raise
    before the step is taken; the parts' ``after_step`` (enqueue, EMA, ...) runs after it. Returns ``loss`` and every
    ``loss_*`` term, detached and summed over the groups.
    """
    ddp = isinstance(model, DistributedDataParallel)
    method = model.module if ddp else model
    targets = method.targets(views, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    totals = {}
    for i, group in enumerate(method.student_groups):
        last = i == len(method.student_groups) - 1
        with model.no_sync() if ddp and not last else nullcontext():
            images = size_batches(views, group)
            with torch.autocast(views[0].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(images[0] if len(images) == 1 else images, method.student_maps)
            losses = method.group_losses(group, split_views(out, len(group)), targets)
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        for k, value in losses.items():
            totals[k] = totals.get(k, 0) + value.detach()
    if finite_check is not None:
        finite_check(totals)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the parts see true gradients; scaler.step skips a second unscale
    if clip_grad > 0:
        clip_each_parameter(optimizer, clip_grad)
    method.adjust_gradients()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    method.after_step(targets)
    return totals


@torch.no_grad()
def clip_each_parameter(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale each parameter's gradient down to L2 norm ``max_norm`` when it is larger (per parameter, not the
    global norm: DINO's ``clip_gradients``; factor max_norm / (norm + 1e-6))."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                factor = max_norm / (p.grad.norm(2) + 1e-6)
                p.grad.mul_(torch.clamp(factor, max=1.0))
