from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def _energy(fmap: torch.Tensor) -> torch.Tensor:
    """NCHW -> Nx1xHxW: mean over channels of fmap**2, in float32."""
    if fmap.dim() != 4:
        raise ValueError(f"attention maps need NCHW feature maps, got shape {tuple(fmap.shape)}")
    return fmap.float().pow(2).mean(dim=1, keepdim=True)


def _flatten_normalise(energy: torch.Tensor) -> torch.Tensor:
    return F.normalize(energy.reshape(energy.shape[0], -1), dim=1)


def attention_map(fmap: torch.Tensor) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017), as in the official DisCo ``AttentionTransfer``.

        A(F)[n] = normalize( vec( mean_c F[n, c]**2 ) )         (L2 over the H*W positions)

    Args:
        fmap: NxCxHxW feature map.
    Returns:
        Nx(H*W) float32 attention maps, each of unit L2 norm (F.normalize, default eps: an all-zero map stays 0).
    """
    return _flatten_normalise(_energy(fmap))


def _matched_maps(s: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    es, et = _energy(s), _energy(t)
    hs, ws = es.shape[-2:]
    ht, wt = et.shape[-2:]
    if (hs, ws) != (ht, wt):
        if hs * ws >= ht * wt:
            es = F.adaptive_avg_pool2d(es, (ht, wt))
        else:
            et = F.adaptive_avg_pool2d(et, (hs, ws))
    return _flatten_normalise(es), _flatten_normalise(et)


def attention_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention transfer: match the student's spatial attention maps to the teacher's, stage by stage.

        L = sum_stages mean_{n, hw} ( A(F_s)[n, hw] - A(F_t)[n, hw] )**2

    with A as in :func:`attention_map` (the official DisCo ``AttentionTransfer``: ``(s - t).pow(2).mean()`` per
    stage). Channel counts may differ, the map averages over channels. When a pair's spatial sizes differ, the
    energy map mean_c(F**2) (Nx1xHxW) of the LARGER one is reduced with ``F.adaptive_avg_pool2d`` to the smaller
    size BEFORE it is flattened and L2-normalised (the official code assumes equal sizes).

    Args:
        student_maps: per stage, NxCxHxW student feature maps (gradients flow here).
        teacher_maps: per stage, NxC'xH'xW' teacher feature maps of the same images; treated as constants.
    Returns:
        scalar loss, summed over stages.
    Raises:
        ValueError: if the sequences have different lengths or a pair's batch sizes differ.
    """
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"got {len(student_maps)} student feature maps but {len(teacher_maps)} teacher feature maps")
    if len(student_maps) == 0:
        raise ValueError("attention_loss needs at least one pair of feature maps")
    total = student_maps[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"stage {i}: student batch {s.shape[0]} and teacher batch {t.shape[0]} differ")
        a_s, a_t = _matched_maps(s, t.detach())
        total = total + (a_s - a_t.detach()).pow(2).mean()
    return total
