import pytest
import torch
import torch.nn.functional as F

from pretrain.distillers.disco import DisCo
from pretrain.encoder import build_encoder
from pretrain.engine import train_step
from pretrain.model import Method
from pretrain.testbeds.mocov2 import MoCoV2
from pretrain.testbeds.none import NoTestbed


def _student():
    torch.manual_seed(0)
    return build_encoder("resnet18", 32, 16)


def _moco(student=None, queue_size=8, momentum=0.9):
    return MoCoV2(student if student is not None else _student(), queue_size=queue_size, momentum=momentum)


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
    student = _student()
    m = _moco(student, momentum=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before_q = [p.clone() for p in student.parameters()]
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    m.momentum_update(student)
    for pq, pk0, pk in zip(before_q, before_k, m.encoder_k.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    assert not any(p.requires_grad for p in m.encoder_k.parameters())


def _disco(bn_train=False, testbed=True):
    student = _student()
    torch.manual_seed(1)
    teacher = build_encoder("resnet18", 64, 16)
    bed = _moco(student) if testbed else NoTestbed()
    return Method(student, bed, {"disco": DisCo(32.0)}, teacher, teacher_bn_train=bn_train)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_teacher_frozen_gradients_reach_only_student():
    model = _disco()
    teacher_before = _snapshot(model.teacher)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5, momentum=0.9)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    q_before = _snapshot(model.student)
    for _ in range(2):
        losses = train_step(model, views, opt, None)
        assert set(losses) == {"loss", "loss_disco", "loss_mocov2"}
        assert losses["loss_disco"] > 0 and losses["loss_mocov2"] > 0
        torch.testing.assert_close(losses["loss"], losses["loss_disco"] + losses["loss_mocov2"])
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.testbed.encoder_k.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert not model.teacher.training  # eval-mode BN by default, even after model.train()
    for k, v in model.teacher.state_dict().items():  # parameters and buffers bitwise unchanged
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, q_before[k]) for k, v in model.student.state_dict().items())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.student.parameters()}


def test_teacher_bn_train_switch_reproduces_official_behaviour():
    model = _disco(bn_train=True)
    before = _snapshot(model.teacher)
    out = model.targets([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    assert model.teacher.training
    changed = [k for k, v in model.teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("running" in k or "num_batches" in k for k in changed)  # stats move, weights do not
    assert set(out["testbed"]) == {"k", "queue"} and set(out["distillers"]["disco"]) == {"t"}


def test_teacher_single_forward_equals_per_view_forward():
    model = _disco()
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    t = model.targets([v1, v2])["distillers"]["disco"]["t"]
    with torch.no_grad():
        torch.testing.assert_close(t[0], model.teacher(v1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t[1], model.teacher(v2), rtol=1e-5, atol=1e-5)


def test_per_view_backward_equals_joint_loss_gradient():
    """train_step back-propagates one view at a time; the gradient must equal that of the summed loss L."""
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    grads = []
    for per_view in (True, False):
        model = _disco()
        model.eval()  # eval-mode BN: the two orders of computation are then exactly comparable
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.0)
        if per_view:
            train_step(model, views, opt, None)
        else:
            tg = model.targets(views)
            total = sum(model.losses(i, model(v), tg)["loss"] for i, v in enumerate(views))
            total.backward()
        grads.append([p.grad.clone() for p in model.student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_moco_only_uses_one_student_view():
    student = _student()
    model = Method(student, _moco(student), {})
    assert model.student_views == (0,) and model.teacher is None
    out = model.targets([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    assert torch.allclose(out["testbed"]["k"].norm(dim=1), torch.ones(4))
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    calls = []
    real = model.student.embed
    model.student.embed = lambda x, maps=False: calls.append(x) or real(x, maps)
    losses = train_step(model, [torch.randn(4, 3, 32, 32)] * 2, opt, None)
    assert len(calls) == 1 and set(losses) == {"loss", "loss_mocov2"} and int(model.testbed.queue_ptr) == 4


def test_pure_distillation_has_no_momentum_encoder():
    model = _disco(testbed=False)
    assert model.student_views == (0, 1) and model.description == "disco"
    assert not any(k.startswith("testbed.") for k in model.state_dict())
    losses = train_step(model, [torch.randn(4, 3, 32, 32)] * 2, torch.optim.SGD(model.trainable_parameters(), lr=0.1))
    assert set(losses) == {"loss", "loss_disco"}


def test_student_embed_with_maps_matches_forward():
    student = _student().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = student.embed(x, maps=True)
        assert torch.equal(out["embedding"], student(x))
    assert [m.shape[1] for m in out["maps"]] == [64, 64, 128, 256, 512][-len(out["maps"]):]
