"""One training step: L = w_dis * L_dis + lambda * L_co, back-propagated one view at a time."""
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .distributed import concat_all_gather
from .losses import disco_loss, infonce_loss


def view_losses(view: int, embedding: torch.Tensor, targets: Dict[str, torch.Tensor], dis_weight: float,
                co_weight: float, temperature: float) -> Dict[str, torch.Tensor]:
    """The loss terms of one student view: ``view`` 0 is E_s (InfoNCE against k and the queue, plus its L_dis
    term), ``view`` 1 is E'_s (its L_dis term). Their sum over views is L."""
    zero = embedding.new_zeros((), dtype=torch.float32)
    loss_co = zero
    if view == 0 and co_weight > 0:
        loss_co = infonce_loss(embedding, targets["k"], targets["queue"], temperature)
    loss_dis = disco_loss([embedding], [targets["t" if view == 0 else "t2"]], dis_weight) if "t" in targets else zero
    return {"loss": loss_dis + co_weight * loss_co, "loss_dis": loss_dis, "loss_co": loss_co}


def train_step(model: torch.nn.Module, views, optimizer: torch.optim.Optimizer, scaler=None, *, dis_weight: float,
               co_weight: float, temperature: float, amp_dtype: Optional[torch.dtype] = None,
               finite_check: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """One optimizer step on a batch of two views; ``model`` is a ``DisCo`` or its DistributedDataParallel.

    The teacher and key targets come first, without gradients. Then each student view is forwarded and
    back-propagated on its own, so only one view's graph is alive at a time (gradients add up to those of L; with
    DDP only the last backward all-reduces). ``finite_check(losses)`` may raise before the step is taken.
    Returns the detached loss terms summed over the views.
    """
    ddp = isinstance(model, DistributedDataParallel)
    disco = model.module if ddp else model
    targets = disco.targets(views[0], views[1], amp_dtype)
    student_views = views if disco.teacher is not None else views[:1]  # plain MoCo-v2 needs only E_s
    optimizer.zero_grad(set_to_none=True)
    totals = {}
    for i, view in enumerate(student_views):
        last = i == len(student_views) - 1
        with model.no_sync() if ddp and not last else nullcontext():
            with torch.autocast(view.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                embedding = model(view)
            losses = view_losses(i, embedding, targets, dis_weight, co_weight, temperature)
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0) + v.detach()
    if finite_check is not None:
        finite_check(totals)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    disco.student.enqueue(concat_all_gather(targets["k"]))
    return totals
