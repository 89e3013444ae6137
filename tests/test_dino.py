"""The DINO testbed (pretrain/testbeds/dino.py) and its loss (pretrain/losses/dino.py): schedules, centre, loss
against its definition, the frozen last layer, the EMA teacher, and runs through the Trainer (export, bitwise
resume). CPU, 32-px synthetic data."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_bitwise_equal, tiny_cfg
from pretrain.checkpoint import Checkpointer
from pretrain.engine import train_step
from pretrain.losses import dino_center, dino_loss, dino_pairs, dino_teacher_probs
from pretrain.model import build_method
from pretrain.optim import build_optimizer
from pretrain.testbeds.dino import DINO, WeightNormLinear, teacher_momentum, teacher_temperature
from pretrain.trainer import Trainer


def _dino_opts(**overrides):
    """A DINO run at test size: 2 global crops of 32 px + 2 local crops of 16 px, DINO's head shape at small widths,
    K = 64, AdamW with DINO's solver keys, the temperature warm-up and the frozen last layer both over epoch 0."""
    opts = {
        "METHOD.TESTBED": "dino", "DATA.AUGMENTATION": "dino", "DATA.MULTI_CROP.NUM": "(2, 2)",
        "DATA.MULTI_CROP.SIZES": "(32, 16)", "DATA.MULTI_CROP.MIN_SCALE": "(0.4, 0.05)",
        "DATA.MULTI_CROP.MAX_SCALE": "(1.0, 0.4)", "DATA.COLOR_JITTER": "(0.4, 0.4, 0.2, 0.1)",
        "MODEL.STUDENT.ARCH": "convnet_tiny", "MODEL.STUDENT.HEAD.NUM_LAYERS": 3,
        "MODEL.STUDENT.HEAD.HIDDEN_DIM": 32, "MODEL.STUDENT.HEAD.OUT_DIM": 16, "MODEL.STUDENT.HEAD.ACT": "gelu",
        "MODEL.DINO.OUT_DIM": 64, "MODEL.DINO.WARMUP_TEACHER_TEMP_EPOCHS": 2, "MODEL.DINO.FREEZE_LAST_LAYER": 1,
        "SOLVER.OPTIMIZER": "adamw", "SOLVER.BASE_LR": 0.0005, "SOLVER.WEIGHT_DECAY": 0.04,
        "SOLVER.WEIGHT_DECAY_END": 0.4, "SOLVER.WEIGHT_DECAY_NORM_BIAS": False, "SOLVER.CLIP_GRAD": 3.0,
        "SOLVER.WARMUP_EPOCHS": 1, "SOLVER.COSINE_PER_ITER": True, "SOLVER.FINAL_LR_FACTOR": 0.01,
    }
    opts.update(overrides)
    return opts


def _views(n=4, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, *(2 * (32 if v < 2 else 16,)), generator=g) for v in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Pure parts


def test_teacher_temperature_warms_up_linearly_then_stays():
    # DINO's schedule array: np.linspace over the warm-up epochs, then the final value, indexed by the epoch
    epochs, warm = 100, 30
    schedule = np.concatenate((np.linspace(0.04, 0.07, warm), np.ones(epochs - warm) * 0.07))
    values = [teacher_temperature(e, 0.04, 0.07, warm) for e in range(epochs)]
    assert values == [float(x) for x in schedule]
    assert values[0] == 0.04 and values[29] == pytest.approx(0.07) and values[30] == values[99] == 0.07
    assert values[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert all(a < b for a, b in zip(values[:29], values[1:30]))
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07  # no warm-up
    assert teacher_temperature(5, 0.04, 0.07, 300) == pytest.approx(0.04 + 0.03 * 5 / 299)  # longer than the run


def test_teacher_momentum_follows_dinos_cosine_to_one():
    max_iter = 1000
    # DINO's cosine_scheduler(0.996, 1, epochs, iters_per_epoch)
    its = np.arange(max_iter)
    dino = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * its / len(its)))
    for it in (0, 1, 250, 500, 999):
        m = teacher_momentum(it, max_iter, 0.996)
        assert m == pytest.approx(dino[it], abs=1e-15)
        assert m == pytest.approx(1 - (1 - 0.996) * (math.cos(math.pi * it / max_iter) + 1) / 2, abs=1e-15)
    assert teacher_momentum(0, max_iter, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(500, max_iter, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(max_iter, max_iter, 0.996) == 1.0


def test_loss_equals_its_definition_and_views_add_up():
    torch.manual_seed(0)
    n_views, n, k, t_s, t_t = 6, 5, 32, 0.1, 0.04
    # cosine-sized logits, as the weight-normalised last layer gives (the loss is then ~ln K: float32 resolves 1e-6)
    student = [torch.randn(n, k) * 0.3 for _ in range(n_views)]
    teacher = torch.randn(2 * n, k) * 0.3
    center = torch.randn(1, k) * 0.03
    # DINO's DINOLoss.forward, written out: every teacher crop against every other view, mean over the pairs
    q = F.softmax((teacher - center) / t_t, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(n_views):
            if v != iq:
                total += torch.sum(-q[iq] * F.log_softmax(student[v] / t_s, dim=-1), dim=-1).mean()
                terms += 1
    expected = total / terms
    assert terms == 2 * n_views - 2
    pairs = dino_pairs(2, n_views)
    assert len(pairs) == terms and pairs[0] == (0, 1) and (0, 0) not in pairs and (1, 1) not in pairs
    probs = dino_teacher_probs(teacher, center, t_t).chunk(2)
    whole = dino_loss(dict(enumerate(student)), probs, pairs, t_s)
    torch.testing.assert_close(whole, expected, atol=1e-6, rtol=0)
    shares = [dino_loss({v: student[v]}, probs, pairs, t_s) for v in range(n_views)]
    torch.testing.assert_close(sum(shares), expected, atol=1e-6, rtol=0)
    # a uniform student: ln(K) whatever the teacher (the chance level)
    uniform = dino_loss({v: torch.zeros(n, k) for v in range(n_views)}, probs, pairs, t_s)
    assert uniform.item() == pytest.approx(math.log(k), rel=1e-6)


def test_gradient_steps_on_the_student_lower_the_loss():
    torch.manual_seed(0)
    probs = dino_teacher_probs(torch.randn(8, 16), torch.zeros(1, 16), 0.04).chunk(2)
    student = torch.zeros(4, 4, 16, requires_grad=True)  # 4 views x N 4 x K 16, uniform: ln K
    optimizer = torch.optim.SGD([student], lr=0.5)
    pairs = dino_pairs(2, 4)
    values = []
    for _ in range(20):
        loss = dino_loss(dict(enumerate(student)), probs, pairs, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[0] == pytest.approx(math.log(16)) and values[-1] < 0.8 * values[0]


def test_center_update_on_a_hand_made_case():
    c = torch.zeros(1, 3)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 2.0], [0.0, 0.0, 6.0]])  # mean 1.5 1.5 3
    c = dino_center(c, logits.mean(0, keepdim=True), 0.9)
    torch.testing.assert_close(c, torch.tensor([[0.15, 0.15, 0.3]]))
    c = dino_center(c, torch.ones(1, 3), 0.9)
    torch.testing.assert_close(c, torch.tensor([[0.9 * 0.15 + 0.1, 0.9 * 0.15 + 0.1, 0.9 * 0.3 + 0.1]]))
    # the testbed's update (one process: the mean over this process's teacher rows)
    from pretrain.encoder import build_encoder

    tb = DINO(build_encoder("convnet_tiny", 8, 4, 2), num_views=4, out_dim=3, center_momentum=0.9)
    tb.update_center(logits)
    torch.testing.assert_close(tb.center, torch.tensor([[0.15, 0.15, 0.3]]))
    tb.update_center(torch.ones(8, 3))
    torch.testing.assert_close(tb.center, torch.tensor([[0.235, 0.235, 0.37]]))


def test_weight_norm_last_layer_is_pytorchs_weight_norm():
    torch.manual_seed(1)
    layer = WeightNormLinear(16, 40)
    assert layer.weight_g.shape == (40, 1) and layer.weight_v.shape == (40, 16)
    assert not layer.weight_g.requires_grad and torch.equal(layer.weight_g, torch.ones(40, 1))
    assert set(layer.state_dict()) == {"weight_g", "weight_v"}
    torch.manual_seed(1)
    ref = torch.nn.Linear(16, 40, bias=False)  # the same default-init draws
    assert torch.equal(ref.weight, layer.weight_v)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ref.parametrizations.weight.original0.fill_(1)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(40))  # unit rows: logits are cosines
    assert WeightNormLinear(16, 40, norm=False).weight_g.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# The testbed in a Method


def _method(tmp_path, imagefolder, **overrides):
    cfg = tiny_cfg(tmp_path, imagefolder, **_dino_opts(**overrides))
    torch.manual_seed(cfg.SEED)
    return cfg, build_method(cfg)


def test_built_as_dino(tmp_path, imagefolder, one_thread):
    cfg, method = _method(tmp_path, imagefolder, **{"MODEL.STUDENT.ARCH": "vit_tiny_patch16_224",
                                                    "MODEL.STUDENT.DROP_PATH": 0.1})
    tb, student = method.testbed, method.student
    assert isinstance(tb, DINO) and tb.student_views == (0, 1, 2, 3) and len(tb.pairs) == 6
    # the student's head: DINO's init (trunc normal std 0.02, bias 0); the same seed gives the same weights
    linear = [m for m in student.head if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 3 and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linear)
    assert all(abs(m.weight.std().item() - 0.02) < 0.003 for m in linear)
    assert isinstance(student.head[1], torch.nn.GELU)
    _, again = _method(tmp_path, imagefolder, **{"MODEL.STUDENT.ARCH": "vit_tiny_patch16_224",
                                                 "MODEL.STUDENT.DROP_PATH": 0.1})
    for (k, a), b in zip(method.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # the EMA teacher: the student's weights and the last layer's, not trained, no stochastic depth
    for (k, a), b in zip(student.state_dict().items(), tb.teacher.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(tb.teacher_last_layer.weight_v, tb.last_layer.weight_v)
    assert not any(p.requires_grad for p in tb.teacher.parameters())
    assert not any(p.requires_grad for p in tb.teacher_last_layer.parameters())
    drop = [m.drop_prob for m in student.modules() if type(m).__name__ == "DropPath"]
    assert drop and max(drop) == pytest.approx(0.1)
    assert all(m.drop_prob == 0 for m in tb.teacher.modules() if type(m).__name__ == "DropPath")
    # what the optimizer trains: the student and the student's last layer (weight_v; weight_g is frozen)
    names = [n for n, _ in method.named_trainable_parameters()]
    assert "testbed.last_layer.weight_v" in names and "testbed.last_layer.weight_g" not in names
    assert not any(n.startswith(("testbed.teacher", "testbed.teacher_last_layer")) for n in names)
    assert {"testbed.last_layer.weight_g", "testbed.last_layer.weight_v", "testbed.center"} <= set(method.state_dict())
    assert method.exported() is tb.teacher
    assert method.testbed.chance_losses() == {"loss_dino": pytest.approx(math.log(64))}


def test_last_layer_frozen_in_the_first_epoch_and_the_teacher_is_the_ema(tmp_path, imagefolder, one_thread):
    cfg, method = _method(tmp_path, imagefolder)
    tb = method.testbed
    optimizer = build_optimizer(cfg, method.named_trainable_parameters(), 1e-3)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in [*tb.teacher.parameters(), *tb.teacher_last_layer.parameters()])
    iters_per_epoch, max_iter = 4, 8
    views = _views()

    # epoch 0: the last layer gets no gradient, so AdamW leaves it (and its weight decay) alone
    method.set_progress(1, iters_per_epoch, max_iter)
    before_v = tb.last_layer.weight_v.detach().clone()
    teacher_before = [p.detach().clone() for p in [*tb.teacher.parameters(), *tb.teacher_last_layer.parameters()]]
    center_before = tb.center.clone()
    with torch.no_grad():
        method.train()
        targets_logits = tb.teacher_last_layer(tb.teacher(torch.cat(views[:2])))
    losses = train_step(method, views, optimizer)
    assert set(losses) == {"loss", "loss_dino"} and losses["loss_dino"] > 0
    assert tb.last_layer.weight_v.grad is None and torch.equal(tb.last_layer.weight_v, before_v)
    # the teacher after one step: m * teacher + (1 - m) * student (after the optimizer step), m of iteration 1
    m = teacher_momentum(1, max_iter, cfg.MODEL.DINO.MOMENTUM)
    students = [*method.student.parameters(), *tb.last_layer.parameters()]
    teachers = [*tb.teacher.parameters(), *tb.teacher_last_layer.parameters()]
    assert len(students) == len(teachers) == len(teacher_before)
    changed = 0
    for s, t, t0 in zip(students, teachers, teacher_before):
        torch.testing.assert_close(t, t0 * m + s.detach() * (1 - m), rtol=0, atol=1e-7)
        changed += not torch.equal(t, t0)
    assert changed > 0
    # the centre: this step's teacher logits (before the EMA update)
    torch.testing.assert_close(tb.center, center_before * 0.9 + targets_logits.mean(0, keepdim=True) * 0.1)

    # epoch 1: the last layer trains
    method.set_progress(iters_per_epoch, iters_per_epoch, max_iter)
    train_step(method, views, optimizer)
    assert tb.last_layer.weight_v.grad is not None and not torch.equal(tb.last_layer.weight_v, before_v)
    assert tb.last_layer.weight_g.grad is None and torch.equal(tb.last_layer.weight_g, torch.ones(64, 1))


def test_teacher_temperature_of_the_epoch_is_used(tmp_path, imagefolder, one_thread):
    _, method = _method(tmp_path, imagefolder)
    tb = method.testbed
    views = _views()
    for epoch, temp in ((0, 0.04), (1, 0.07), (5, 0.07)):
        method.set_progress(epoch * 4, 4, 40)
        targets = tb.targets(method.student, views, None)
        assert targets["temperature"] == pytest.approx(temp)
        expected = F.softmax((targets["logits"] - tb.center) / temp, dim=-1).chunk(2)
        for q, e in zip(targets["probs"], expected):
            torch.testing.assert_close(q, e)


@pytest.mark.parametrize("overrides, match", [
    ({"DATA.MULTI_CROP.NUM": "(3, 2)"}, r"DATA.MULTI_CROP.NUM\[0\] to 2"),
    ({"LOSS.DINO.WEIGHT": 0.0}, "trains nothing"),
    ({"MODEL.DINO.TEACHER_TEMP": 0.0}, "MODEL.DINO.TEACHER_TEMP"),
])
def test_bad_configs_are_refused_naming_the_key(tmp_path, imagefolder, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(tmp_path, imagefolder, **_dino_opts(**overrides))


# ---------------------------------------------------------------------------------------------------------------
# Through the Trainer


def _vit_opts(**kw):
    return _dino_opts(**{"MODEL.STUDENT.ARCH": "vit_demo_patch8_32", "MODEL.STUDENT.DROP_PATH": 0.1,
                         "MODEL.STUDENT.HEAD.HIDDEN_DIM": 32, "TRAIN.CHECKPOINT_PERIOD": 100, **kw})


def test_trains_exports_the_teacher_and_resumes_bitwise(tmp_path, imagefolder, one_thread):
    """The demo ViT (timm's ViT, 4 blocks; drop-path 0.1) with 2 x 32 px + 2 x 16 px crops, 64 images / batch 8 = 8 iterations per epoch, 2
    epochs; an uninterrupted run against one stopped at iteration 11 (mid-epoch 1, after the last layer unfroze)
    and continued: every tensor of the method (student, last layer, EMA teacher, centre), the optimizer and the
    scheduler bitwise equal. The export is the EMA teacher and loads in the evaluators."""
    from pretrain.export import load_exported_backbone
    from transfer.common import load_backbone

    full = Trainer(tiny_cfg(tmp_path / "full", imagefolder, **_vit_opts()))
    exports = full.run()
    assert Trainer(tiny_cfg(tmp_path / "part", imagefolder, **_vit_opts(**{"TRAIN.STOP_AT_ITER": 11}))).run() is None
    resumed = Trainer(tiny_cfg(tmp_path / "part", imagefolder, **_vit_opts()), require_checkpoint=True)
    resumed.run()
    assert resumed.iter == full.iter == 16
    a = Checkpointer(str(tmp_path / "full")).load_latest()[0]
    b = Checkpointer(str(tmp_path / "part")).load_latest()[0]
    assert {"testbed.center", "testbed.last_layer.weight_v", "testbed.teacher_last_layer.weight_v"} <= set(a["model"])
    assert any(k.startswith("testbed.teacher.backbone.") for k in a["model"])
    for key in ("model", "optimizer", "scheduler", "iter"):
        assert_bitwise_equal(a[key], b[key], key)
    model = a["model"]
    assert model["testbed.center"].abs().sum() > 0
    assert not torch.equal(model["testbed.last_layer.weight_v"], model["testbed.teacher_last_layer.weight_v"])
    recs = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl") if '"loss_dino"' in x]
    assert [r["iter"] for r in recs] == list(range(1, 17)) and all(math.isfinite(r["loss_dino"]) for r in recs)

    # the export is the EMA teacher's backbone (not the student's), loadable by the evaluators
    teacher, student = full.model.testbed.teacher.backbone.eval(), full.model.student.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    checkpoint = Checkpointer(str(tmp_path / "full")).list()[0]  # read as the export: the teacher, not the student
    for backbone in (load_exported_backbone(exports["backbone"])[0], load_backbone(exports["backbone"])[0],
                     load_backbone(checkpoint)[0]):
        with torch.no_grad():
            torch.testing.assert_close(backbone.eval()(x), teacher(x))
            assert not torch.allclose(backbone(x), student(x))
    meta = torch.load(exports["backbone"], weights_only=True)
    assert meta["method"] == "dino" and meta["arch"] == "vit_demo_patch8_32" and meta["teacher"] is None
    assert meta["head"]["act"] == "gelu" and a["exported"] == "testbed.teacher"


# ---------------------------------------------------------------------------------------------------------------
# DINO + DisCo: both choices of the teacher's "final embedding"


def _dino_teacher_checkpoint(path, seed=0):
    """A DINO training checkpoint (main_dino.py's layout: student / teacher, backbone. / head.mlp. / head.last_layer.)
    of a vit_tiny_patch16_224 with a GELU head 192 -> 32 -> 32 -> 16."""
    import argparse

    from pretrain.backbones import build_backbone
    from pretrain.heads import build_head

    torch.manual_seed(seed)
    backbone, head = build_backbone("vit_tiny_patch16_224"), build_head(192, 32, 16, 3, act="gelu")
    net = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    net.update({f"head.mlp.{k}": v for k, v in head.state_dict().items()})
    net.update({"head.last_layer.weight_g": torch.ones(8, 1), "head.last_layer.weight_v": torch.randn(8, 16)})
    torch.save({"student": {f"module.{k}": v for k, v in net.items()}, "teacher": net, "epoch": 1,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16), "dino_loss": {"center": torch.zeros(1, 8)}},
               path)
    return backbone, head


@pytest.mark.parametrize("embedding", ["head", "backbone"])
def test_dino_plus_disco_distils_the_chosen_embedding(tmp_path, imagefolder, one_thread, embedding):
    """LOSS.DISCO.EMBEDDING head: the student's bottleneck (16-d) onto the DINO teacher head's normalised bottleneck;
    backbone: the student's pooled feature through a trained linear map onto the teacher's normalised CLS token
    (192-d; a backbone-only file would do). Both train through the Trainer and the DisCo term is the definition's."""
    import torch.nn.functional as F_

    teacher_path = tmp_path / "dino_teacher.pth"
    t_backbone, t_head = _dino_teacher_checkpoint(teacher_path)
    if embedding == "backbone":  # the backbone-only release: a bare state dict in timm's keys
        torch.save(t_backbone.state_dict(), tmp_path / "dino_backbone.pth")
        teacher_path = tmp_path / "dino_backbone.pth"
    opts = _dino_opts(**{"METHOD.DISTILLERS": "['disco']", "MODEL.TEACHER.ARCH": "vit_tiny_patch16_224",
                         "MODEL.TEACHER.WEIGHTS": str(teacher_path), "LOSS.DISCO.EMBEDDING": embedding,
                         "LOSS.DISCO.VIEWS": 2, "LOSS.DISCO.WEIGHT": 32.0, "MODEL.STUDENT.HEAD.OUT_DIM": 16,
                         "SOLVER.EPOCHS": 1, "TRAIN.STOP_AT_ITER": 2, "TEST.TEACHER_HEALTH.IMAGES": 0})
    trainer = Trainer(tiny_cfg(tmp_path / "run", imagefolder, **opts))
    trainer.run()
    method = trainer.model
    disco = method.distillers["disco"]
    assert disco.student_views == disco.teacher_views == (0, 1)
    assert (disco.projector is not None) == (embedding == "backbone")
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"loss_disco"' in x]
    assert len(recs) == 2 and all(r["loss_disco"] > 0 and r["loss_dino"] > 0 for r in recs)
    # the term against its definition on two views of fresh images
    method.eval()
    x = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        targets = method.targets(x)
        t_backbone.eval()
        reference = t_backbone.forward_head(t_backbone.forward_features(x[0]), pre_logits=True)
        target = F_.normalize(t_head(reference) if embedding == "head" else reference, dim=1)
        torch.testing.assert_close(targets["distillers"]["disco"]["t"][0], target, atol=1e-5, rtol=1e-5)
        out = method(x[0])
        mine = (F_.normalize(disco.projector(out["features"]), dim=1) if embedding == "backbone"
                else out["embedding"])
        expected = 32.0 * (mine - target).pow(2).sum(1).mean()
        got = method.losses(0, out, targets)["loss_disco"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dino_disco_through_the_cli_resumes_bitwise_after_kill_9(tmp_path, imagefolder, teacher_export):
    """tools/pretrain.py, DINO + DisCo (the demo-size student, a ResNet-18 export as the frozen teacher): killed at a
    random iteration and resumed, it ends with exactly the uninterrupted run's state -- the EMA teacher, the centre,
    the last layer, the student and AdamW's moments -- and exports the EMA teacher."""
    import os
    import random
    import subprocess
    import sys

    from conftest import iters_logged, kill_9_at

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    opts = {**_dino_opts(), "OUTPUT_DIR": None, "DATA.TRAIN_DIR": imagefolder / "train", "DATA.VAL_DIR": "",
            "DATA.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.EPOCHS": 3, "TRAIN.LOG_PERIOD": 1,
            "TRAIN.DETERMINISTIC": True, "TRAIN.CHECKPOINT_PERIOD": 3, "METHOD.DISTILLERS": "['disco']",
            "MODEL.TEACHER.ARCH": "resnet18", "MODEL.TEACHER.WEIGHTS": teacher_export, "LOSS.DISCO.VIEWS": 2,
            "MODEL.STUDENT.HEAD.OUT_DIM": 128, "TEST.TEACHER_HEALTH.IMAGES": 0}

    def cmd(out, *extra):
        return [sys.executable, os.path.join(root, "tools", "pretrain.py"), *extra,
                *[str(x) for k, v in {**opts, "OUTPUT_DIR": out}.items() for x in (k, v)]]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, out = tmp_path / "reference", tmp_path / "killed"
    proc = subprocess.run(cmd(ref), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_9_at(cmd(out), out, random.Random(2).randint(5, 10), env)  # 12 iterations, checkpoints every 3
    assert iters_logged(out) < 12
    proc = subprocess.run(cmd(out, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = Checkpointer(str(ref)).load_latest()[0], Checkpointer(str(out)).load_latest()[0]
    assert a["iter"] == b["iter"] == 12 and a["exported"] == "testbed.teacher"
    assert {"testbed.center", "testbed.teacher.head.0.weight", "testbed.last_layer.weight_v"} <= set(a["model"])
    for key in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(a[key], b[key], key)
    recs = [json.loads(x) for x in open(ref / "metrics.jsonl") if '"loss_disco"' in x]
    assert len(recs) == 12 and all(r["loss_disco"] > 0 and r["loss_dino"] > 0 for r in recs)
    assert (out / "export" / "convnet_tiny.pth").is_file()


def test_drop_path_only_where_the_backbone_has_it():
    from pretrain.encoder import build_encoder

    assert build_encoder("vit_demo_patch8_32", 8, 8, drop_path=0.1).backbone.blocks[-1].drop_path1.drop_prob == \
        pytest.approx(0.1)
    with pytest.raises(ValueError, match="convnet_tiny has no stochastic depth"):
        build_encoder("convnet_tiny", 8, 8, drop_path=0.1)
