"""The solver keys the SwAV and DINO recipes need: LARC, parameter groups without weight decay on biases and norms,
the weight-decay and final-lr schedules, per-parameter gradient clipping."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from pretrain.engine import clip_each_parameter
from pretrain.optim import LARC, build_optimizer, param_groups
from pretrain.trainer import Trainer


def test_larc_step_is_the_adaptive_rate_rule():
    """apex LARC(clip=False) around SGD: g <- (g + wd p) * trust ||p|| / (||g|| + wd ||p|| + eps), then plain SGD (its
    own weight decay off for the step); a parameter with a zero gradient is left alone."""
    torch.manual_seed(0)
    p, still = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(2))
    p.grad, still.grad = torch.randn(4, 3), torch.zeros(2)
    p0, g0, s0 = p.detach().clone(), p.grad.clone(), still.detach().clone()
    opt = LARC([p, still], lr=0.5, momentum=0.9, weight_decay=1e-3, trust=0.01)
    opt.step()
    rate = 0.01 * p0.norm() / (g0.norm() + 1e-3 * p0.norm() + 1e-8)
    torch.testing.assert_close(p.detach(), p0 - 0.5 * (g0 + 1e-3 * p0) * rate)
    assert torch.equal(still.detach(), s0) and opt.param_groups[0]["weight_decay"] == 1e-3  # restored
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_param_groups_spare_biases_and_one_d_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    named = list(model.named_parameters())
    one = param_groups(named, 0.04, norm_bias=True)
    assert len(one) == 1 and len(one[0]["params"]) == 5
    decayed, plain = param_groups(named, 0.04, norm_bias=False)
    assert [p.shape for p in decayed["params"]] == [(4, 3), (2, 4)] and decayed["weight_decay"] == 0.04
    assert [p.shape for p in plain["params"]] == [(4,), (4,), (4,)] and plain["weight_decay"] == 0.0


def test_clipping_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    clip_each_parameter(torch.optim.SGD([a, b], lr=1.0), 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the threshold: untouched


def test_lr_and_weight_decay_schedules(tmp_path, imagefolder):
    """FINAL_LR_FACTOR: the cosine ends at that fraction of the peak; WEIGHT_DECAY_END: a per-iteration cosine from
    WEIGHT_DECAY, applied to the decayed group only (DINO's schedule)."""
    cfg = tiny_cfg(tmp_path, imagefolder, **{"SOLVER.FINAL_LR_FACTOR": 0.001, "SOLVER.COSINE_PER_ITER": True,
                                             "SOLVER.OPTIMIZER": "adamw", "SOLVER.WEIGHT_DECAY": 0.04,
                                             "SOLVER.WEIGHT_DECAY_END": 0.4, "SOLVER.WEIGHT_DECAY_NORM_BIAS": False,
                                             "MODEL.STUDENT.ARCH": "convnet_tiny"})
    t = Trainer(cfg)
    t.setup()
    try:
        assert t.lr_factor(0) == 1.0 and t.lr_factor(t.max_iter) == pytest.approx(0.001)
        assert t.lr_factor(t.max_iter // 2) == pytest.approx(0.001 + 0.999 * 0.5)
        assert t.weight_decay(0) == pytest.approx(0.04) and t.weight_decay(t.max_iter) == pytest.approx(0.4)
        t.iter = t.max_iter // 2
        t._before_step()
        decayed, plain = t.optimizer.param_groups
        assert decayed["weight_decay"] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 2)))
        assert plain["weight_decay"] == 0.0
        assert all(part.progress.iteration == t.iter for part in t.model.parts())
    finally:
        t.lock.release()


def test_larc_through_the_config(tmp_path, imagefolder):
    cfg = tiny_cfg(tmp_path, imagefolder,
                   **{"SOLVER.OPTIMIZER": "larc", "SOLVER.LARC_TRUST": 0.002, "SOLVER.WEIGHT_DECAY": 1e-6})
    opt = build_optimizer(cfg, nn.Linear(2, 2).named_parameters(), 0.6)
    assert isinstance(opt, LARC) and opt.trust == 0.002 and opt.param_groups[0]["lr"] == 0.6
