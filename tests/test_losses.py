import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import disco_loss, infonce_loss


def test_disco_loss_hand_computed():
    s1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # sample 0: ||(1,-1)||^2 = 2, sample 1: 0 -> mean 1
    s2 = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t2 = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # sample 0: 0.04 + 0.04 = 0.08, sample 1: 0 -> mean 0.04
    assert disco_loss([s1, s2], [t1, t2], weight=1.0).item() == pytest.approx(1.04)
    assert disco_loss([s1, s2], [t1, t2], weight=32.0).item() == pytest.approx(33.28)


def test_disco_loss_zero_for_identical_embeddings():
    e = F.normalize(torch.randn(5, 128), dim=1)
    assert disco_loss([e, e], [e.clone(), e.clone()], weight=32.0).item() == 0.0


def test_weight_mapping_reproduces_official_sum_reduction_independent_of_batch():
    """Official: MSELoss(reduction='sum') per GPU on a batch of 32, gradients averaged over GPUs by DDP.
    Ours, weight 32: the same loss on any per-process batch."""
    torch.manual_seed(0)
    s = [F.normalize(torch.randn(64, 128), dim=1) for _ in range(2)]
    t = [F.normalize(torch.randn(64, 128), dim=1) for _ in range(2)]
    mse_sum = torch.nn.MSELoss(reduction="sum")
    # one GPU with a batch of 32
    official_32 = mse_sum(s[0][:32], t[0][:32]) + mse_sum(s[1][:32], t[1][:32])
    ours_32 = disco_loss([x[:32] for x in s], [x[:32] for x in t], weight=32.0)
    assert ours_32.item() == pytest.approx(official_32.item(), rel=1e-5)
    # 2 GPUs x 32 (DDP averages): our single process with the whole batch of 64 gives the same objective
    official_2x32 = sum(mse_sum(s[0][i:i + 32], t[0][i:i + 32]) + mse_sum(s[1][i:i + 32], t[1][i:i + 32])
                        for i in (0, 32)) / 2
    assert disco_loss(s, t, weight=32.0).item() == pytest.approx(official_2x32.item(), rel=1e-5)


def test_disco_loss_gradient_only_to_student():
    s = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    t = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    disco_loss([s], [t], weight=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_disco_loss_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="OUT_DIM"):
        disco_loss([torch.zeros(2, 128)], [torch.zeros(2, 64)], 1.0)


def test_infonce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # CxK: negatives (0,1) and (-1,0)
    T = 0.5
    logits = torch.tensor([1.0, 0.0, -1.0]) / T
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    assert infonce_loss(q, k, queue, T).item() == pytest.approx(expected.item(), rel=1e-6)


def test_infonce_falls_with_gradient_steps():
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    k = F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(16, 32), dim=0)
    opt = torch.optim.SGD([q], lr=1.0)
    first = None
    for _ in range(20):
        loss = infonce_loss(F.normalize(q, dim=1), k, queue, 0.2)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
