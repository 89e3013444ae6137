import torch
import torch.nn.functional as F


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: each query must pick its own key among the key and the queue's negatives.

    Args:
        q: NxC L2-normalised queries (gradients flow here).
        k: NxC L2-normalised keys of the other view from the momentum encoder (no gradient).
        queue: CxK L2-normalised negatives (MoCo's layout; a snapshot taken before this batch is enqueued).
        temperature: T of MoCo-v2 (0.2).
    Returns:
        scalar cross-entropy, mean over the N queries.
    """
    q, k, queue = q.float(), k.float().detach(), queue.float().detach()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives are column 0
    return F.cross_entropy(logits, labels)
