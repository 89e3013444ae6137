import torch
import torch.nn.functional as F

KD_REDUCTIONS = ("batchmean", "mean")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5,
            temperature: float = 2.0, reduction: str = "batchmean") -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015) mixed with the label's cross-entropy; DisCo's Table 2 "KD" rows
    use it when the student's linear classifier is trained on its frozen backbone.

        L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

    with KL(p || q) = sum_c p_c (log p_c - log q_c) for each sample.

    Args:
        student_logits: N x C logits of the student's classifier (s).
        teacher_logits: N x C logits of the teacher (backbone + its own linear classifier) on the same images (t);
            a constant (detached): no gradient reaches the teacher.
        labels: N class indices (y).
        alpha: weight of the distillation term; 0 = plain cross-entropy.
        temperature: T (> 0). The T^2 factor keeps the distillation gradients' scale independent of T (Hinton).
        reduction: how the KL term is averaged.
            ``"batchmean"`` (Hinton's KL): summed over the C classes, averaged over the N samples.
            ``"mean"``: the official DisCo-pytorch ``kd_ce_loss.py``, which uses ``nn.KLDivLoss()`` with PyTorch's
            default elementwise mean over all N x C entries, i.e. the KL term divided by C as well (1000 on
            ImageNet): "mean" = "batchmean" / C, so there the distillation term weighs ~1000x less than Hinton's.
            The cross-entropy is the batch mean in both.
    Returns:
        scalar float32 loss.
    """
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"kd_loss reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"kd_loss temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: both classifiers must have the same classes")
    s = student_logits.float()
    t = teacher_logits.detach().float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1), reduction="sum")
    # divided here, not by kl_div's reduction="mean" (deprecated: PyTorch announces it will become "batchmean")
    kl = kl / (s.shape[0] * s.shape[1] if reduction == "mean" else s.shape[0])
    ce = F.cross_entropy(s, labels)
    return kl * (alpha * temperature * temperature) + ce * (1.0 - alpha)
