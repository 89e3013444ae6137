import math
from typing import Optional

import torch
import torch.nn.functional as F


def compress_loss(student: torch.Tensor, student_queue: torch.Tensor, teacher: torch.Tensor,
                  teacher_queue: torch.Tensor, temperature: float = 0.04) -> torch.Tensor:
    """CompRess (Koohpayegani et al., NeurIPS 2020): the student mimics the teacher's similarities to an anchor queue.

        sim_s = student @ student_queue / T                     (N x K)
        sim_t = teacher @ teacher_queue / T                     (N x K)
        L     = mean_i KL( softmax(sim_t[i]) || softmax(sim_s[i]) )
              = mean_i sum_k p_t[i, k] * (log p_t[i, k] - log p_s[i, k])

    The batch itself is not among the K columns. CompRess-2q passes each network's own queue (filled with its own
    past embeddings); CompRess-1q passes the teacher's queue as both (then C == C').

    Args:
        student: NxC L2-normalised student embeddings (gradients flow here).
        student_queue: CxK anchors for the student (MoCo's layout, columns are entries); treated as constants.
        teacher: NxC' L2-normalised teacher embeddings; treated as constants.
        teacher_queue: C'xK anchors for the teacher; treated as constants.
        temperature: T, the same for both sides (0.04 in the reference).
    Returns:
        scalar KL divergence summed over the K entries, mean over the N samples ("batchmean").
    Raises:
        ValueError: if an embedding's dim does not match its queue's rows, the two queues hold different K, or
            the batch sizes differ.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    if student.shape[1] != student_queue.shape[0]:
        raise ValueError(f"student embeddings have dim {student.shape[1]} but the student queue is "
                         f"{tuple(student_queue.shape)}: it must be C x K with C = {student.shape[1]}")
    if teacher.shape[1] != teacher_queue.shape[0]:
        raise ValueError(f"teacher embeddings have dim {teacher.shape[1]} but the teacher queue is "
                         f"{tuple(teacher_queue.shape)}: it must be C' x K with C' = {teacher.shape[1]}")
    if student_queue.shape[1] != teacher_queue.shape[1]:
        raise ValueError(f"the student queue holds {student_queue.shape[1]} entries but the teacher queue "
                         f"{teacher_queue.shape[1]}: both must hold the same K")
    s = student.float()
    sim_s = s @ student_queue.float().detach() / temperature
    with torch.no_grad():
        sim_t = teacher.float() @ teacher_queue.float() / temperature
        log_p_t = F.log_softmax(sim_t, dim=1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(sim_s, dim=1))).sum(dim=1).mean()


def compress_queue_init(dim: int, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh CompRess memory bank, initialised as the reference code does.

    Entries are drawn uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3) and are NOT L2-normalised. This is the
    reference code's init (each coordinate then has variance 1/dim, so an entry's expected squared norm is 1, but
    individual entries are not unit vectors); real embeddings replace it as the queue fills.

    Args:
        dim: C, the embedding dim.
        size: K, the number of entries.
        generator: optional RNG for reproducibility.
    Returns:
        a C x K float32 tensor (MoCo's layout, columns are entries).
    """
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(dim, size, generator=generator).mul_(2 * stdv).sub_(stdv)
