"""One training step: L = the sum of every part's weighted terms, back-propagated one student view at a time."""
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel


def train_step(model: torch.nn.Module, views, optimizer: torch.optim.Optimizer, scaler=None, *,
               amp_dtype: Optional[torch.dtype] = None, finite_check: Optional[Callable] = None
               ) -> Dict[str, torch.Tensor]:
    """One optimizer step on a batch of views; ``model`` is a :class:`pretrain.model.Method` or its
    DistributedDataParallel.

    The targets (momentum update and keys, the teacher's outputs) come first, without gradients. Then each student
    view some part needs is forwarded and back-propagated on its own, so only one view's graph is alive at a time
    (gradients add up to those of L; with DDP only the last backward all-reduces). ``finite_check(losses)`` may
    raise before the step is taken; the parts' ``after_step`` (enqueue, ...) runs after it. Returns ``loss`` and
    every ``loss_*`` term, detached and summed over the views.
    """
    ddp = isinstance(model, DistributedDataParallel)
    method = model.module if ddp else model
    targets = method.targets(views, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    totals = {}
    for i, v in enumerate(method.student_views):
        last = i == len(method.student_views) - 1
        with model.no_sync() if ddp and not last else nullcontext():
            with torch.autocast(views[v].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(views[v], method.student_maps)
            losses = method.losses(v, out, targets)
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        for k, value in losses.items():
            totals[k] = totals.get(k, 0) + value.detach()
    if finite_check is not None:
        finite_check(totals)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    method.after_step(targets)
    return totals
