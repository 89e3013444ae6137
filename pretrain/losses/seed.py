import torch
import torch.nn.functional as F


def seed_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temperature: float = 0.2,
              teacher_temperature: float = 1e-4) -> torch.Tensor:
    """SEED (Fang et al., ICLR 2021): the student matches the teacher's similarity distribution over the teacher's
    own embedding of the image and a queue of past teacher embeddings.

        z_s[i] = [s_i . t_i, s_i . queue] / T_s                  (N x (1+K) student logits)
        p_t[i] = softmax([t_i . t_i, t_i . queue] / T_t)         (N x (1+K) teacher targets)
        L      = mean_i ( - sum_j p_t[i, j] * log_softmax(z_s[i])_j )

    The student's positive logit is s_i . t_i (the student against the TEACHER's embedding), the teacher's is
    t_i . t_i (= 1 for normalised t). With the reference's T_t = 1e-4 the target is all but one-hot on the positive
    unless a queue entry is as close to t_i as t_i itself.

    Args:
        student: NxC L2-normalised student embeddings (gradients flow here).
        teacher: NxC L2-normalised teacher embeddings of the same images; treated as constants.
        queue: CxK past teacher embeddings (MoCo's layout, columns are entries; a snapshot taken before this batch
            is enqueued); treated as constants.
        student_temperature: T_s (0.2, the reference's ``--temp``).
        teacher_temperature: T_t (1e-4, the reference's ``--distill-t``).
    Returns:
        scalar soft cross-entropy, mean over the N samples.
    """
    s, t, queue = student.float(), teacher.float().detach(), queue.float().detach()
    s_logits = torch.cat([torch.einsum("nc,nc->n", s, t).unsqueeze(1), s @ queue], dim=1) / student_temperature
    with torch.no_grad():
        t_logits = torch.cat([torch.einsum("nc,nc->n", t, t).unsqueeze(1), t @ queue], dim=1) / teacher_temperature
        target = F.softmax(t_logits, dim=1)
    return -(target * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()
