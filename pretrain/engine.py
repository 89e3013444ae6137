"""One training step: forward the two views, compute L = w_dis * L_dis + lambda * L_co, step the optimizer."""
from contextlib import nullcontext
from typing import Dict

import torch

from .losses import disco_loss, infonce_loss


def compute_losses(out: Dict[str, torch.Tensor], dis_weight: float, co_weight: float,
                   temperature: float) -> Dict[str, torch.Tensor]:
    """Losses from the model's embeddings (see ``DisCo.forward``); ``loss`` is the one to back-propagate."""
    zero = out["q"].new_zeros((), dtype=torch.float32)
    loss_co = infonce_loss(out["q"], out["k"], out["queue"], temperature) if co_weight > 0 else zero
    loss_dis = disco_loss([out["q"], out["q2"]], [out["t"], out["t2"]], dis_weight) if "t" in out else zero
    return {"loss": loss_dis + co_weight * loss_co, "loss_dis": loss_dis, "loss_co": loss_co}


def train_step(model: torch.nn.Module, views, optimizer: torch.optim.Optimizer, scaler, *, dis_weight: float,
               co_weight: float, temperature: float, amp_dtype=None, finite_check=None) -> Dict[str, torch.Tensor]:
    """One SGD step on a batch of two views. ``amp_dtype`` None = fp32. ``finite_check(losses)`` may raise before
    the step is taken (the trainer makes it collective across processes). Returns detached losses."""
    device_type = views[0].device.type
    autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        out = model(views[0], views[1])
    losses = compute_losses(out, dis_weight, co_weight, temperature)
    if finite_check is not None:
        finite_check(losses)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses["loss"].backward()
        optimizer.step()
    return {k: v.detach() for k, v in losses.items()}
