import torch
import torch.nn.functional as F


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """NxN Euclidean distances as the RKD reference (and the official DisCo ``loss.py``) computes them.

        D[i, j] = sqrt( clamp(|e_i|^2 + |e_j|^2 - 2 e_i . e_j, min=eps) ),   D[i, i] = 0

    The clamp keeps the square root's gradient finite: two identical points i != j get D = sqrt(eps) (1e-6 by
    default) with zero gradient, not 0; only the diagonal is set to exactly 0.

    Args:
        e: NxC embeddings.
        eps: floor of the squared distance.
    Returns:
        NxN float32 distances.
    """
    e = e.float()
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss (Park et al., CVPR 2019; the official DisCo ``RkdDistance``).

        d   = pairwise_distances(e) / mean{ pairwise_distances(e) > 0 }      (each side by its own mean)
        L   = mean_{i, j} smooth_l1( d_s[i, j] - d_t[i, j] )                 (beta 1, over all N*N entries)

    Dividing by the mean distance makes the loss invariant to a uniform scaling of either side.

    Args:
        student: NxC student embeddings (gradients flow here).
        teacher: NxC' teacher embeddings; treated as constants.
    Returns:
        scalar loss.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    with torch.no_grad():
        d_t = _normalised_distances(teacher.detach())
    return F.smooth_l1_loss(_normalised_distances(student), d_t, reduction="mean", beta=1.0)


def _angles(e: torch.Tensor) -> torch.Tensor:
    e = e.float()
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = normalize(e_j - e_i); u[i, i] = 0
    return torch.bmm(u, u.transpose(1, 2)).reshape(-1)  # [i, j, k] = u_ij . u_ik


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss (Park et al., CVPR 2019; the official DisCo ``RKdAngle``).

        u_ij         = normalize(e_j - e_i)                  (F.normalize along C, so u_ii = 0)
        angle[i,j,k] = u_ij . u_ik                           (cos of the angle at e_i between e_j and e_k)
        L            = mean_{i,j,k} smooth_l1( angle_s[i,j,k] - angle_t[i,j,k] )   (beta 1, over all N^3)

    Degenerate triplets (j or k equal to i, or duplicated points) give angle 0, not NaN. Memory is O(N^2 C + N^3).

    Args:
        student: NxC student embeddings (gradients flow here).
        teacher: NxC' teacher embeddings; treated as constants.
    Returns:
        scalar loss.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    with torch.no_grad():
        a_t = _angles(teacher.detach())
    return F.smooth_l1_loss(_angles(student), a_t, reduction="mean", beta=1.0)
