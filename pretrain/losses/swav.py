"""SwAV's losses (Caron et al. 2020): Sinkhorn-Knopp codes and the swapped prediction."""
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes Q (BxK) of ``scores`` (BxK prototype scores, B this process's samples) by the Sinkhorn-Knopp
    algorithm (SwAV eq. 3-4): Q = exp(scores / epsilon), rescaled ``iterations`` times so that every prototype gets
    1/K of the total mass and every sample 1/B, B counted over all processes (the sums are all-reduced). Returns Q
    with each row summing to 1 (an assignment per sample); in float32."""
    q = torch.exp(scores.float() / epsilon).t()  # K x B
    k, b = q.shape[0], q.shape[1] * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's total mass ...
        q /= k  # ... is 1/K
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass ...
        q /= b  # ... is 1/B
    return (q * b).t()


def swapped_prediction(scores: torch.Tensor, codes: Dict[int, torch.Tensor], view: int, num_views: int,
                       num_assign: int, temperature: float = 0.1) -> torch.Tensor:
    """View ``view``'s share of the SwAV loss: its prototype ``scores`` (BxK, gradients flow) predict the codes of
    every assignment crop other than itself (``codes``: crop index -> BxK, constants),

        sum over assignment crops i != view of  -mean_b sum_k q_i[b, k] log softmax(scores / T)[b, k]
                                                 / (num_views - 1) / num_assign

    Summed over all views this is SwAV's loss: for each assignment crop the mean over the other views of the
    cross-entropy, averaged over the assignment crops."""
    log_p = F.log_softmax(scores.float() / temperature, dim=1)
    total = log_p.new_zeros(())
    for crop, q in codes.items():
        if crop != view:
            total = total - (q * log_p).sum(dim=1).mean()
    return total / ((num_views - 1) * num_assign)
