from typing import Sequence

import torch


def disco_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """DisCo's L_dis (paper eq. 1): pull each student embedding onto the frozen teacher's embedding of the same view.

        L_dis = weight * sum_views mean_i ||E_s[i] - E_t[i]||^2

    Args:
        student: per view, NxC L2-normalised student embeddings (E_s, E'_s).
        teacher: per view, NxC L2-normalised teacher embeddings (E_t, E'_t); treated as constants.
        weight: w_dis. The squared distance is summed over the C dims and averaged over the batch, so the loss does
            not depend on the per-process batch size. The official code's ``MSELoss(reduction='sum')`` over a per-GPU
            batch of B equals ``weight = B`` here (32 in the paper's 8x32 setting).
    Returns:
        scalar loss.
    """
    if len(student) != len(teacher):
        raise ValueError(f"got {len(student)} student views but {len(teacher)} teacher views")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student embedding {tuple(s.shape)} and teacher embedding {tuple(t.shape)} differ: the "
                             f"student head's OUT_DIM must equal the teacher head's output dim")
        total = total + (s.float() - t.float().detach()).pow(2).sum(dim=1).mean()
    return weight * total
