"""SEED, CompRess, attention transfer and RKD: hand-computed values, independent re-derivations of the reference
formulas (written here in another shape: loops / row-major K x C memory banks), gradients, and properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.attention import attention_loss, attention_map
from pretrain.losses.compress import compress_loss, compress_queue_init
from pretrain.losses.infonce import infonce_loss
from pretrain.losses.rkd import pairwise_distances, rkd_angle_loss, rkd_distance_loss
from pretrain.losses.seed import seed_loss

DTYPES = [torch.float64, torch.float32]


def _unit(n, c, gen, dtype=torch.float64):
    return F.normalize(torch.randn(n, c, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ---------------------------------------------------------------------------------------------------------- SEED

def _seed_inputs():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # CxK: entries (0, 1) and (-1, 0)
    return s, t, queue


def test_seed_hand_computed_soft_targets():
    s, t, queue = _seed_inputs()
    T = 0.5
    # sample 0: student [s.t, s.q1, s.q2] = [0.6, 0, -1]; teacher [t.t, t.q1, t.q2] = [1, 0.8, -0.6]
    z0, p0 = [1.2, 0.0, -2.0], _softmax([2.0, 1.6, -1.2])
    # sample 1: student [1, 1, 0]; teacher [1, 1, 0]
    z1, p1 = [2.0, 2.0, 0.0], _softmax([2.0, 2.0, 0.0])
    loss0 = _lse(z0) - sum(p * z for p, z in zip(p0, z0))  # -sum p log_softmax(z)
    loss1 = _lse(z1) - sum(p * z for p, z in zip(p1, z1))
    expected = (loss0 + loss1) / 2
    assert seed_loss(s, t, queue, student_temperature=T, teacher_temperature=T).item() == pytest.approx(expected,
                                                                                                          rel=1e-6)


def test_seed_hand_computed_default_temperatures():
    s, t, queue = _seed_inputs()
    # T_t = 1e-4: sample 0's target is one-hot on the positive (1 > 0.8); sample 1 ties t.t = t.q1 = 1 -> (1/2, 1/2, 0)
    loss0 = math.log(math.exp(3.0) + math.exp(0.0) + math.exp(-5.0)) - 3.0  # z = [0.6, 0, -1] / 0.2
    loss1 = math.log(2 * math.exp(5.0) + 1.0) - 5.0  # z = [1, 1, 0] / 0.2, target mass split on the two 5s
    assert seed_loss(s, t, queue).item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_seed_swapping_temperatures_changes_value():
    s, t, queue = _seed_inputs()
    a = seed_loss(s, t, queue, student_temperature=0.2, teacher_temperature=1e-4).item()
    b = seed_loss(s, t, queue, student_temperature=1e-4, teacher_temperature=0.2).item()
    assert abs(a - b) > 1.0


def _seed_reference(s, t, queue_rows, t_s, t_t):
    """jacobswan1/SEED builder.py + tools/utils.py soft_cross_entropy, per sample with a K x C bank."""
    n = s.shape[0]
    logit_stu, logit_tea = [], []
    for i in range(n):
        logit_stu.append(torch.stack([(s[i] * t[i]).sum()] + [(s[i] * q).sum() for q in queue_rows]))
        logit_tea.append(torch.stack([(t[i] * t[i]).sum()] + [(t[i] * q).sum() for q in queue_rows]))
    logit_stu = torch.stack(logit_stu) / t_s
    target = torch.softmax(torch.stack(logit_tea) / t_t, dim=1)
    return -(target * torch.log_softmax(logit_stu, dim=1)).sum() / n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temps", [(0.2, 1e-4), (0.2, 0.05), (0.07, 0.5)])
def test_seed_matches_reference(dtype, temps):
    gen = torch.Generator().manual_seed(0)
    s, t = _unit(6, 8, gen), _unit(6, 8, gen)
    queue_rows = _unit(16, 8, gen)  # the bank as K x C rows; our layout is its transpose
    expected = _seed_reference(s, t, queue_rows, *temps).item()
    got = seed_loss(s.to(dtype), t.to(dtype), queue_rows.t().contiguous().to(dtype), *temps).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_seed_with_sharp_teacher_is_infonce_against_teacher_key():
    """T_t -> 0 makes the target one-hot on t.t (when no queue entry is as close): SEED is InfoNCE with key t."""
    gen = torch.Generator().manual_seed(1)
    s, t, queue = _unit(8, 16, gen, torch.float32), _unit(8, 16, gen, torch.float32), _unit(32, 16, gen).t().float()
    assert seed_loss(s, t, queue, 0.2, 1e-4).item() == pytest.approx(infonce_loss(s, t, queue, 0.2).item(), rel=1e-5)


def test_seed_gradient_only_to_student():
    gen = torch.Generator().manual_seed(2)
    s = _unit(4, 8, gen, torch.float32).requires_grad_()
    t = _unit(4, 8, gen, torch.float32).requires_grad_()
    queue = _unit(8, 8, gen, torch.float32).t().contiguous().requires_grad_()
    seed_loss(s, t, queue, 0.2, 0.1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and queue.grad is None


# ------------------------------------------------------------------------------------------------------ CompRess

def test_compress_hand_computed():
    T = 0.5
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s_queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # C=2 x K=2: entries (1,0), (0,1)
    t = torch.tensor([[0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    t_queue = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # C'=3 x K=2: entries (0,1,0), (0,0,1)
    # sample 0: sim_s = [1, 0] / T, sim_t = [0.6, 0.8] / T
    p_t, p_s = _softmax([1.2, 1.6]), _softmax([2.0, 0.0])
    kl0 = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    # sample 1: sim_s = [0, 1] / T = sim_t -> KL 0
    expected = (kl0 + 0.0) / 2  # batchmean: summed over K, averaged over N
    assert compress_loss(s, s_queue, t, t_queue, temperature=T).item() == pytest.approx(expected, rel=1e-6)


def _compress_reference(s, s_bank, t, t_bank, T):
    """UMBCvision/CompRess nn/compress_loss.py: K x C memory banks, out = (bank @ q.T).T / T, KLD batchmean."""
    sim_s = torch.mm(s_bank, s.t()).t() / T
    sim_t = torch.mm(t_bank, t.t()).t() / T
    return F.kl_div(F.log_softmax(sim_s, dim=1), F.softmax(sim_t, dim=1), reduction="batchmean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0.04, 0.2])
def test_compress_matches_reference_two_queues(dtype, T):
    gen = torch.Generator().manual_seed(3)
    s, t = _unit(6, 8, gen), _unit(6, 12, gen)
    s_bank, t_bank = _unit(20, 8, gen), _unit(20, 12, gen)  # K x C rows
    expected = _compress_reference(s, s_bank, t, t_bank, T).item()
    got = compress_loss(s.to(dtype), s_bank.t().to(dtype), t.to(dtype), t_bank.t().to(dtype), temperature=T).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_matches_reference_one_queue_and_init_bank(dtype):
    gen = torch.Generator().manual_seed(4)
    s, t = _unit(5, 8, gen), _unit(5, 8, gen)
    queue = compress_queue_init(8, 10, generator=gen).double()  # CompRess-1q: one (unnormalised, fresh) bank
    expected = _compress_reference(s, queue.t(), t, queue.t(), 0.04).item()
    got = compress_loss(s.to(dtype), queue.to(dtype), t.to(dtype), queue.to(dtype)).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_compress_zero_iff_distributions_match():
    gen = torch.Generator().manual_seed(5)
    e, queue = _unit(4, 8, gen, torch.float32), _unit(16, 8, gen, torch.float32).t()
    assert compress_loss(e, queue, e.clone(), queue.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = _unit(4, 8, gen, torch.float32)
    assert compress_loss(other, queue, e, queue).item() > 1e-3


def test_compress_gradient_only_to_student():
    gen = torch.Generator().manual_seed(6)
    s = _unit(4, 8, gen, torch.float32).requires_grad_()
    t = _unit(4, 6, gen, torch.float32).requires_grad_()
    s_queue = _unit(10, 8, gen, torch.float32).t().contiguous().requires_grad_()
    t_queue = _unit(10, 6, gen, torch.float32).t().contiguous().requires_grad_()
    compress_loss(s, s_queue, t, t_queue, temperature=0.2).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and s_queue.grad is None and t_queue.grad is None


def test_compress_rejects_mismatched_shapes():
    s, t = torch.zeros(2, 8), torch.zeros(2, 6)
    with pytest.raises(ValueError, match="student queue"):
        compress_loss(s, torch.zeros(10, 8), t, torch.zeros(6, 10))  # student queue given as K x C
    with pytest.raises(ValueError, match="teacher queue"):
        compress_loss(s, torch.zeros(8, 10), t, torch.zeros(10, 6))
    with pytest.raises(ValueError, match="same K"):
        compress_loss(s, torch.zeros(8, 10), t, torch.zeros(6, 12))
    with pytest.raises(ValueError, match="batch"):  # a batch of 1 would otherwise broadcast silently
        compress_loss(torch.zeros(1, 8), torch.zeros(8, 10), t, torch.zeros(6, 10))


def test_compress_queue_init_matches_reference_distribution():
    dim, size = 128, 4096
    q = compress_queue_init(dim, size, generator=torch.Generator().manual_seed(0))
    stdv = 1.0 / math.sqrt(dim / 3)
    assert q.shape == (dim, size) and q.dtype == torch.float32
    assert q.min().item() >= -stdv and q.max().item() <= stdv
    assert q.min().item() < -0.95 * stdv and q.max().item() > 0.95 * stdv  # fills the whole interval
    assert q.mean().item() == pytest.approx(0.0, abs=0.01)
    norms = q.norm(dim=0)  # per entry: E|q|^2 = dim * stdv^2 / 3 = 1, but entries are NOT normalised
    assert norms.pow(2).mean().item() == pytest.approx(1.0, rel=0.02)
    assert (norms - 1).abs().max().item() > 0.05
    again = compress_queue_init(dim, size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q, again)


# --------------------------------------------------------------------------------------------- attention transfer

def test_attention_map_hand_computed():
    fmap = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]]]])  # 1x2x2x2
    # mean_c F^2 = [[4.5, 8], [0, 0]]; L2 norm = sqrt(20.25 + 64) = sqrt(84.25)
    expected = torch.tensor([[4.5, 8.0, 0.0, 0.0]]) / math.sqrt(84.25)
    assert torch.allclose(attention_map(fmap), expected, atol=1e-7)


def test_attention_loss_hand_computed_with_channel_mismatch():
    s = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])  # 1x1x2x2: energy [4, 0, 0, 0] -> (1, 0, 0, 0)
    t = torch.ones(1, 3, 2, 2)  # 1x3x2x2: energy all 1 -> (1/2, 1/2, 1/2, 1/2)
    expected = ((1 - 0.5) ** 2 + 3 * 0.5 ** 2) / 4
    assert attention_loss([s], [t]).item() == pytest.approx(expected, rel=1e-6)
    assert attention_loss([s, s], [t, t]).item() == pytest.approx(2 * expected, rel=1e-6)  # summed over stages


def _four_by_four_teacher():
    f = torch.zeros(1, 1, 4, 4)
    f[0, 0, 0, 0] = 2.0  # top-left block F^2 = [4, 0, 0, 0] -> mean 1
    f[0, 0, 0:2, 2:4] = 1.0  # top-right block all 1 -> mean 1
    f[0, 0, 2, 2:4] = 2.0  # bottom-right block [4, 4, 0, 0] -> mean 2; bottom-left block 0
    return f


def test_attention_pools_the_larger_energy_map_before_normalising():
    t = _four_by_four_teacher()
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]).repeat(1, 3, 1, 1)  # 3 channels, energy (1, 0, 0, 0)
    # teacher energy pooled to 2x2 = (1, 1, 0, 2), then normalised by sqrt(6)
    r = 1 / math.sqrt(6)
    expected = ((1 - r) ** 2 + r ** 2 + 0.0 + (2 * r) ** 2) / 4
    assert attention_loss([s], [t]).item() == pytest.approx(expected, rel=1e-6)
    # the same when the STUDENT is the larger map (it is pooled, and its gradient flows through the pooling)
    s_big = t.clone().requires_grad_()
    t_small = s.clone()
    loss = attention_loss([s_big], [t_small])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s_big.grad is not None and s_big.grad.abs().sum() > 0
    # not the same as pooling the feature map itself (block means of F: 0.5, 1, 0, 1 -> energies 0.25, 1, 0, 1)
    pooled_f = F.normalize(torch.tensor([[0.25, 1.0, 0.0, 1.0]]), dim=1)
    wrong = (F.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), dim=1) - pooled_f).pow(2).mean().item()
    assert abs(wrong - expected) > 1e-2


def _at_reference(students, teachers):
    """Official DisCo loss.py AttentionTransfer, per sample and per position: F.normalize(x.pow(2).mean(1).view(N,
    -1)), (s - t).pow(2).mean(), summed over stages."""
    total = 0.0
    for s, t in zip(students, teachers):
        n, _, h, w = s.shape
        sq_err = 0.0
        for i in range(n):
            a_s = [float((s[i, :, y, x] ** 2).sum() / s.shape[1]) for y in range(h) for x in range(w)]
            a_t = [float((t[i, :, y, x] ** 2).sum() / t.shape[1]) for y in range(h) for x in range(w)]
            ns, nt = math.sqrt(sum(v * v for v in a_s)), math.sqrt(sum(v * v for v in a_t))
            sq_err += sum((u / ns - v / nt) ** 2 for u, v in zip(a_s, a_t))
        total += sq_err / (n * h * w)
    return total


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_reference(dtype):
    gen = torch.Generator().manual_seed(7)
    students = [torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64),
                torch.randn(3, 6, 3, 3, generator=gen, dtype=torch.float64)]
    teachers = [torch.randn(3, 8, 5, 5, generator=gen, dtype=torch.float64),
                torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)]
    expected = _at_reference(students, teachers)
    got = attention_loss([x.to(dtype) for x in students], [x.to(dtype) for x in teachers]).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_attention_invariant_to_feature_scale_and_gradient_only_to_student():
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(2, 4, 6, 6, generator=gen).requires_grad_()
    t = torch.randn(2, 8, 3, 3, generator=gen).requires_grad_()
    loss = attention_loss([s], [t])
    assert attention_loss([5 * s.detach()], [t.detach()]).item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_attention_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 student feature maps but 1 teacher"):
        attention_loss([torch.ones(2, 1, 2, 2)] * 2, [torch.ones(2, 1, 2, 2)])
    with pytest.raises(ValueError, match="batch"):
        attention_loss([torch.ones(2, 1, 2, 2)], [torch.ones(3, 1, 2, 2)])


# ------------------------------------------------------------------------------------------------------------ RKD

def test_pairwise_distances_diagonal_duplicates_and_values():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    d = pairwise_distances(e)
    assert torch.equal(torch.diagonal(d), torch.zeros(3))
    assert d[0, 1].item() == pytest.approx(5.0) and d[1, 2].item() == pytest.approx(5.0)
    assert d[0, 2].item() == pytest.approx(1e-6, rel=1e-3)  # duplicates: sqrt(clamped 1e-12), not 0
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(pairwise_distances(x).double(), torch.cdist(x, x), atol=1e-5)


def test_rkd_distance_hand_computed():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5 -> mean 4
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # distances 1, 1, sqrt2 -> mean (2 + sqrt2) / 3
    m_t = (2 + math.sqrt(2)) / 3
    pairs = [(3 / 4, 1 / m_t), (4 / 4, 1 / m_t), (5 / 4, math.sqrt(2) / m_t)]  # (0,1), (0,2), (1,2)
    expected = 2 * sum(_smooth_l1(a - b) for a, b in pairs) / 9  # both orders, diagonal 0, mean over 3*3
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_rkd_distance_hand_computed_duplicates_linear_branch():
    """Three coinciding student points and one at distance 2; the teacher clusters the other three."""
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]]).requires_grad_()
    t = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    delta = 1e-6  # duplicates are sqrt(1e-12) apart and count among the positive entries of the mean
    m = (6 * delta + 6 * 2.0) / 12  # same for both sides
    # pairs (a,b), (a,c), (b,d), (c,d) differ by (2 - delta) / m > 1 (linear branch); (a,d), (b,c) match
    expected = 8 * _smooth_l1((2 - delta) / m) / 16
    loss = rkd_distance_loss(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_rkd_angle_hand_computed():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # collinear
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right angle at 0
    r = 1 / math.sqrt(2)
    # angle[i][j][k] = u_ij . u_ik, u_ij = (e_j - e_i) / |e_j - e_i|, u_ii = 0
    # student: u01 = u02 = u12 = (1, 0); u10 = u20 = u21 = (-1, 0)
    a_s = [[[0, 0, 0], [0, 1, 1], [0, 1, 1]],
           [[1, 0, -1], [0, 0, 0], [-1, 0, 1]],
           [[1, 1, 0], [1, 1, 0], [0, 0, 0]]]
    # teacher: u01 = (1, 0), u02 = (0, 1), u10 = (-1, 0), u12 = (-1, 1) r, u20 = (0, -1), u21 = (1, -1) r
    a_t = [[[0, 0, 0], [0, 1, 0], [0, 0, 1]],
           [[1, 0, r], [0, 0, 0], [r, 0, 1]],
           [[1, r, 0], [r, 1, 0], [0, 0, 0]]]
    diffs = [a_s[i][j][k] - a_t[i][j][k] for i in range(3) for j in range(3) for k in range(3)]
    assert any(abs(x) > 1 for x in diffs) and any(0 < abs(x) < 1 for x in diffs)  # both smooth-L1 branches
    expected = sum(_smooth_l1(x) for x in diffs) / 27
    assert rkd_angle_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def _rkd_reference(s, t):
    """Official DisCo loss.py RkdDistance / RKdAngle with pdist, written as loops in float64."""
    n = s.shape[0]

    def dist(e):
        d = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                if i != j:
                    sq = float(e[i] @ e[i] + e[j] @ e[j] - 2 * e[i] @ e[j])
                    d[i][j] = math.sqrt(max(sq, 1e-12))
        pos = [v for row in d for v in row if v > 0]
        mean = sum(pos) / len(pos)
        return [v / mean for row in d for v in row]

    def unit(v):
        nv = float(v.norm())
        return v / max(nv, 1e-12)

    def angles(e):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    out.append(float(unit(e[j] - e[i]) @ unit(e[k] - e[i])))
        return out

    d_loss = sum(_smooth_l1(a - b) for a, b in zip(dist(s), dist(t))) / (n * n)
    a_loss = sum(_smooth_l1(a - b) for a, b in zip(angles(s), angles(t))) / (n ** 3)
    return d_loss, a_loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_matches_reference(dtype):
    gen = torch.Generator().manual_seed(10)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    t = 3 * torch.randn(6, 9, generator=gen, dtype=torch.float64)  # other dim and scale for the teacher
    d_ref, a_ref = _rkd_reference(s, t)
    assert rkd_distance_loss(s.to(dtype), t.to(dtype)).item() == pytest.approx(d_ref, rel=1e-6, abs=1e-6)
    assert rkd_angle_loss(s.to(dtype), t.to(dtype)).item() == pytest.approx(a_ref, rel=1e-6, abs=1e-6)


def test_rkd_duplicated_points_give_no_nan():
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(4, 6, generator=gen)
    s = torch.cat([base, base[:2]]).requires_grad_()  # rows 4, 5 duplicate rows 0, 1
    t = torch.cat([torch.randn(4, 6, generator=gen), torch.zeros(2, 6)])
    t[5] = t[4]
    for fn in (rkd_distance_loss, rkd_angle_loss):
        s.grad = None
        loss = fn(s, t)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_invariant_to_uniform_scaling_of_the_student():
    gen = torch.Generator().manual_seed(12)
    s, t = torch.randn(8, 16, generator=gen), torch.randn(8, 32, generator=gen)
    for fn in (rkd_distance_loss, rkd_angle_loss):
        base = fn(s, t).item()
        assert base > 1e-3
        for scale in (0.01, 7.5):
            assert fn(scale * s, t).item() == pytest.approx(base, rel=1e-4)
    # distances are NOT normalised per row: a non-uniform change does move the loss
    warped = s.clone()
    warped[0] *= 10
    assert abs(rkd_distance_loss(warped, t).item() - rkd_distance_loss(s, t).item()) > 1e-3


def test_rkd_zero_for_identical_embeddings_and_gradient_only_to_student():
    gen = torch.Generator().manual_seed(13)
    e = torch.randn(5, 8, generator=gen)
    assert rkd_distance_loss(e, 2 * e).item() == pytest.approx(0.0, abs=1e-10)
    assert rkd_angle_loss(e, e + 1.0).item() == pytest.approx(0.0, abs=1e-10)  # angles: translation invariant
    s = torch.randn(5, 8, generator=gen).requires_grad_()
    t = torch.randn(5, 4, generator=gen).requires_grad_()
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
