import pytest
import torch
import torch.nn.functional as F

from pretrain.backbones import BACKBONES, build_backbone
from pretrain.engine import train_step
from pretrain.model import DisCo, MoCoV2, build_encoder


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_documented_dim(name):
    model = build_backbone(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, BACKBONES[name].feature_dim)
    assert torch.isfinite(out).all()


def test_resnet50x2_is_swav_width():
    m = build_backbone("resnet50x2")
    assert m.conv1.out_channels == 128 and m.layer1[0].conv1.out_channels == 128  # stem and bottleneck doubled
    assert m.layer4[-1].conv3.out_channels == 4096


def _moco(queue_size=8, momentum=0.9):
    torch.manual_seed(0)
    return MoCoV2(build_encoder("resnet18", 32, 16), queue_size=queue_size, momentum=momentum)


def test_queue_enqueue_and_wrap():
    m = _moco(queue_size=8)
    keys = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    m.enqueue(keys[0])
    assert int(m.queue_ptr) == 4 and torch.equal(m.queue[:, :4], keys[0].t())
    m.enqueue(keys[1])
    assert int(m.queue_ptr) == 0 and torch.equal(m.queue[:, 4:], keys[1].t())
    m.enqueue(keys[2])  # wraps: overwrites the oldest
    assert int(m.queue_ptr) == 4 and torch.equal(m.queue[:, :4], keys[2].t())
    assert torch.equal(m.queue[:, 4:], keys[1].t())
    with pytest.raises(ValueError, match="multiple"):
        m.enqueue(torch.randn(3, 16))


def test_momentum_update():
    m = _moco(momentum=0.9)
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(1.0)
    before_q = [p.clone() for p in m.encoder_q.parameters()]
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    m.momentum_update()
    for pq, pk0, pk in zip(before_q, before_k, m.encoder_k.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    assert not any(p.requires_grad for p in m.encoder_k.parameters())


def _disco(bn_train=False):
    torch.manual_seed(0)
    teacher = build_encoder("resnet18", 64, 16)
    return DisCo(_moco(queue_size=8), teacher, teacher_bn_train=bn_train)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_teacher_frozen_gradients_reach_only_student():
    model = _disco()
    teacher_before = _snapshot(model.teacher)
    opt = torch.optim.SGD(model.student.encoder_q.parameters(), lr=0.5, momentum=0.9)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    q_before = _snapshot(model.student.encoder_q)
    for _ in range(2):
        losses = train_step(model, views, opt, None, dis_weight=32.0, co_weight=1.0, temperature=0.2)
        assert losses["loss_dis"] > 0 and losses["loss_co"] > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.student.encoder_k.parameters())
    assert all(p.grad is not None for p in model.student.encoder_q.parameters())
    assert not model.teacher.training  # eval-mode BN by default, even after model.train()
    for k, v in model.teacher.state_dict().items():  # parameters and buffers bitwise unchanged
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, q_before[k]) for k, v in model.student.encoder_q.state_dict().items())


def test_teacher_bn_train_switch_reproduces_official_behaviour():
    model = _disco(bn_train=True)
    before = _snapshot(model.teacher)
    out = model.targets(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert model.teacher.training
    changed = [k for k, v in model.teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("running" in k or "num_batches" in k for k in changed)  # stats move, weights do not
    assert set(out) == {"k", "queue", "t", "t2"}


def test_teacher_single_forward_equals_per_view_forward():
    model = _disco()
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model.targets(v1, v2)
    with torch.no_grad():
        torch.testing.assert_close(out["t"], model.teacher(v1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["t2"], model.teacher(v2), rtol=1e-5, atol=1e-5)


def test_per_view_backward_equals_joint_loss_gradient():
    """train_step back-propagates one view at a time; the gradient must equal that of the summed loss L."""
    from pretrain.engine import view_losses

    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    grads = []
    for per_view in (True, False):
        model = _disco()
        model.eval()  # eval-mode BN: the two orders of computation are then exactly comparable
        opt = torch.optim.SGD(model.student.encoder_q.parameters(), lr=0.0)
        if per_view:
            train_step(model, views, opt, None, dis_weight=32.0, co_weight=1.0, temperature=0.2)
        else:
            tg = model.targets(*views)
            total = sum(view_losses(i, model(v), tg, 32.0, 1.0, 0.2)["loss"] for i, v in enumerate(views))
            total.backward()
        grads.append([p.grad.clone() for p in model.student.encoder_q.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_moco_only_uses_one_student_view():
    model = DisCo(_moco(queue_size=8), None)
    out = model.targets(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert set(out) == {"k", "queue"}
    assert torch.allclose(out["k"].norm(dim=1), torch.ones(4))
    opt = torch.optim.SGD(model.student.encoder_q.parameters(), lr=0.1)
    losses = train_step(model, [torch.randn(4, 3, 32, 32)] * 2, opt, None, dis_weight=0.0, co_weight=1.0,
                        temperature=0.2)
    assert losses["loss_dis"] == 0 and losses["loss_co"] > 0 and int(model.student.queue_ptr) == 4
