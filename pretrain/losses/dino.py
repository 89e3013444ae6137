"""DINO's self-distillation loss (Caron et al. 2021, "Emerging properties in self-supervised vision transformers",
eq. 3 and Algorithm 1): the student's softmax over K output dimensions on every view is pulled towards the centred,
sharpened softmax of the EMA teacher on each global crop, except the view the teacher saw itself."""
from typing import List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F


def dino_pairs(num_teacher_crops: int, num_views: int) -> List[Tuple[int, int]]:
    """The (teacher crop iq, student view v) pairs of DINO's loss: every view against every teacher crop but its
    own (teacher crop iq is view iq). 2 global crops and V views in all: 2V - 2 pairs (DINO's ``n_loss_terms``),
    in DINO's order (teacher crop first)."""
    return [(iq, v) for iq in range(num_teacher_crops) for v in range(num_views) if v != iq]


def dino_teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's targets: softmax((t - c) / tau_t) over the K dims (centring, then sharpening).

    Args:
        teacher_logits: NxK teacher outputs (the last layer of the EMA teacher).
        center: 1xK running mean of the teacher outputs (:func:`dino_center`).
        temperature: tau_t (0.04 warming up to 0.07 in DINO's ViT recipes).
    Returns:
        NxK probabilities, float32, no gradient.
    """
    return F.softmax((teacher_logits.float() - center.float()) / temperature, dim=-1).detach()


def dino_loss(student_logits: Mapping[int, torch.Tensor], teacher_probs: Sequence[torch.Tensor],
              pairs: Sequence[Tuple[int, int]], student_temperature: float = 0.1) -> torch.Tensor:
    """DINO's cross-entropy H(P_t, P_s), averaged over the pairs (DINO's ``DINOLoss.forward``):

        L = 1 / |pairs| * sum over (iq, v) in pairs of mean_n sum_k -q_iq[n, k] * log softmax(s_v[n] / tau_s)[k]

    ``student_logits`` may hold only some of the views (one view, as the engine back-propagates them): the sum then
    runs over the pairs of those views, still divided by the number of ALL pairs, so the terms of all views add up
    to the whole loss.

    Args:
        student_logits: view v -> NxK student outputs (the student's last layer; gradients flow).
        teacher_probs: per teacher crop iq (view iq), NxK teacher probabilities (:func:`dino_teacher_probs`).
        pairs: every (iq, v) pair of the loss (:func:`dino_pairs`); its length is the normaliser.
        student_temperature: tau_s (0.1).
    Returns:
        scalar loss (float32).
    """
    if not pairs:
        raise ValueError("DINO's loss needs at least one (teacher crop, student view) pair")
    total = None
    for v, logits in student_logits.items():
        log_p = F.log_softmax(logits.float() / student_temperature, dim=-1)  # NxK
        for iq, pv in pairs:
            if pv != v:
                continue
            q = teacher_probs[iq].float().detach()
            if q.shape != log_p.shape:
                raise ValueError(f"teacher probabilities {tuple(q.shape)} and student logits {tuple(log_p.shape)} "
                                 f"of view {v} differ")
            term = torch.sum(-q * log_p, dim=-1).mean()
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no pair in {list(pairs)} has a student view among {sorted(student_logits)}")
    return total / len(pairs)


@torch.no_grad()
def dino_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float) -> torch.Tensor:
    """The centre's EMA update: c <- m * c + (1 - m) * mean of the teacher outputs over the global batch.

    Args:
        center: 1xK current centre.
        batch_center: 1xK mean of this step's teacher logits over every teacher crop of every process.
        momentum: m (DINO: 0.9).
    Returns:
        the new 1xK centre (same dtype as ``center``).
    """
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)
