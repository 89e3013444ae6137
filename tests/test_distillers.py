"""The comparison distillers (SEED, CompRess, attention transfer, RKD) as parts of a Method: what they read, what they
train, their queues, their stage pairing; and every one of them and their combinations with DisCo through
tools/pretrain.py (a few iterations, an export timm loads), resuming bitwise after kill -9."""
import json
import os
import random
import runpy
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import iters_logged, kill_9_at
from pretrain.checkpoint import Checkpointer
from pretrain.distillers.attention import AttentionTransfer, stage_pairs
from pretrain.distillers.compress import CompRess
from pretrain.distillers.queue import enqueue_columns
from pretrain.distillers.rkd import RKD
from pretrain.distillers.seed import SEED
from pretrain.encoder import build_encoder
from pretrain.engine import train_step
from pretrain.model import Method
from pretrain.testbeds.mocov2 import MoCoV2
from pretrain.testbeds.none import NoTestbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(student_arch="resnet18", hidden=32):
    torch.manual_seed(0)
    return build_encoder(student_arch, hidden, 16), build_encoder("resnet18", 32, 16)


def _views(n=8, size=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
def test_enqueue_columns_wraps_and_advances():
    queue, ptr = torch.zeros(2, 5), torch.zeros(1, dtype=torch.long)
    enqueue_columns(queue, ptr, torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert int(ptr) == 3 and queue[0].tolist() == [1, 2, 3, 0, 0]
    enqueue_columns(queue, ptr, torch.tensor([[4.0, 4.0], [5.0, 5.0], [6.0, 6.0]]))  # wraps: 4, 5 at the end, 6 first
    assert int(ptr) == 1 and queue[1].tolist() == [6, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="does not fit"):
        enqueue_columns(queue, ptr, torch.zeros(6, 2))


@pytest.mark.parametrize("name", ["seed", "compress2q", "compress1q", "attention", "rkd"])
def test_gradients_reach_only_the_student_and_the_teacher_is_frozen(name):
    student, teacher = _pair()
    if name == "seed":
        part, testbed = SEED(16, queue_size=16), NoTestbed()
    elif name.startswith("compress"):
        if name == "compress1q":  # CompRess-1q: one linear layer from the student's 512-d features to the teacher's
            student = build_encoder("resnet18", 0, 512, num_layers=1)
        q = int(name[-2])
        part = CompRess(student, 512, 512, queues=q, queue_size=20,
                        student_features="backbone" if q == 2 else "embedding")
        testbed = NoTestbed()
    elif name == "attention":
        part, testbed = AttentionTransfer([(p[1], p[2]) for p in stage_pairs("resnet18", "resnet18")]), NoTestbed()
    else:
        part, testbed = RKD(), NoTestbed()
    method = Method(student, testbed, {part.name: part}, teacher)
    before_teacher = _state(teacher)
    before_student = _state(student)
    views = _views()
    losses = method.losses(0, method(views[0], method.student_maps), method.targets(views))
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert all(p.grad is None for n, p in part.named_parameters())  # momentum encoders and queues get none
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=0.1)
    opt.step()
    after = _state(teacher)
    for k, v in before_teacher.items():  # eval-mode BN: not even the running statistics move
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_student.items())


def test_seed_queue_holds_teacher_embeddings_and_advances_by_the_batch():
    student, teacher = _pair()
    seed = SEED(16, queue_size=24)
    method = Method(student, NoTestbed(), {"seed": seed}, teacher)
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=0.1)
    views = _views(8)
    with torch.no_grad():
        t = teacher(views[0])  # the teacher's L2-normalised embedding of the query view
    out = train_step(method, views, opt)
    assert set(out) == {"loss", "loss_seed"}
    assert int(seed.queue_ptr) == 8
    assert torch.allclose(seed.queue[:, :8].t(), t, atol=1e-6)
    train_step(method, views, opt)
    assert int(seed.queue_ptr) == 16 and torch.allclose(seed.queue[:, 8:16].t(), t, atol=1e-6)


def test_seed_loss_is_the_formula_on_the_method_outputs():
    student, teacher = _pair()
    seed = SEED(16, queue_size=16, student_temperature=0.2, teacher_temperature=1e-4)
    method = Method(student, NoTestbed(), {"seed": seed}, teacher)
    views = _views()
    targets = method.targets(views)
    out = method(views[0])
    loss = method.losses(0, out, targets)["loss_seed"]
    s, t, q = out["embedding"], teacher(views[0]), seed.queue
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ q], 1) / 0.2
    target = F.softmax(torch.cat([(t * t).sum(1, keepdim=True), t @ q], 1) / 1e-4, 1)
    assert loss.item() == pytest.approx(-(target * F.log_softmax(logits, 1)).sum(1).mean().item(), rel=1e-5)


def test_compress_2q_fills_each_queue_with_its_own_network_and_freezes_an_unused_head():
    student, teacher = _pair()
    part = CompRess(student, 512, 512, queues=2, queue_size=20, momentum=0.5)
    method = Method(student, NoTestbed(), {"compress": part}, teacher)
    assert not method.student_head and all(not p.requires_grad for p in student.head.parameters())
    assert not any(p is q for p in method.trainable_parameters() for q in student.head.parameters())
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=0.1)
    views = _views(8)
    with torch.no_grad():
        t = F.normalize(teacher.backbone(views[0]), dim=1)
    targets = method.targets(views)  # momentum update, then the key encoder's features of view 1
    with torch.no_grad():
        k = F.normalize(part.encoder_k.backbone(views[0]), dim=1)
    losses = method.losses(0, method(views[0]), targets)
    losses["loss"].backward()
    opt.step()
    method.after_step(targets)
    assert int(part.teacher_ptr) == 8 and int(part.student_ptr) == 8
    assert torch.allclose(part.teacher_queue[:, :8].t(), t, atol=1e-6)
    assert torch.allclose(part.student_queue[:, :8].t(), targets["distillers"]["compress"]["k"], atol=1e-6)
    assert torch.allclose(targets["distillers"]["compress"]["k"], k, atol=1e-5)
    for _ in range(2):  # 8 + 8 + 8 > 20: the queues wrap around
        train_step(method, views, opt)
    assert int(part.teacher_ptr) == 4


def test_compress_1q_needs_the_teachers_dimension(tmp_path, teacher_export):
    from conftest import tiny_cfg
    from pretrain.model import build_method

    cfg = tiny_cfg(tmp_path, tmp_path, teacher_export, **{"METHOD.TESTBED": "none",
                                                          "METHOD.DISTILLERS": "['compress']",
                                                          "LOSS.COMPRESS.QUEUES": 1,
                                                          "LOSS.COMPRESS.STUDENT_FEATURES": "embedding"})
    with pytest.raises(ValueError, match=r"HEAD.NUM_LAYERS 1, MODEL.STUDENT.HEAD.OUT_DIM 512"):
        build_method(cfg)


def test_attention_pairs_stages_by_stride():
    assert stage_pairs("resnet18", "resnet50") == [(4, 1, 1), (8, 2, 2), (16, 3, 3), (32, 4, 4)]
    pairs = stage_pairs("efficientnet_b0", "resnet50")
    assert [p[0] for p in pairs] == [4, 8, 16, 32] and [p[2] for p in pairs] == [1, 2, 3, 4]
    assert stage_pairs("vit_tiny_patch16_224", "resnet50") == [(16, 11, 3)]  # ViT: the last block, at stride 16
    assert stage_pairs("resnet18", "resnet50", [8, 32]) == [(8, 2, 2), (32, 4, 4)]
    with pytest.raises(ValueError, match=r"LOSS.ATTENTION.STRIDES \[64\].*strides \[2, 4, 8, 16, 32\]"):
        stage_pairs("resnet18", "resnet50", [64])


def test_attention_uses_the_paired_maps():
    student, teacher = _pair()
    part = AttentionTransfer([(2, 3)])  # student stride 8 against teacher stride 16: sizes differ, pooled
    method = Method(student, MoCoV2(student, queue_size=16), {"attention": part}, teacher)
    views = _views()
    targets = method.targets(views)
    out = method(views[0], maps=True)
    loss = method.losses(0, out, targets)["loss_attention"]
    s = out["maps"][2].pow(2).mean(1, keepdim=True)
    with torch.no_grad():
        t = F.normalize(teacher.embed(views[0], maps=True)["maps"][3].pow(2).mean(1).flatten(1), dim=1)
    s = F.normalize(F.adaptive_avg_pool2d(s, t.shape[1] ** 0.5 and (2, 2)).flatten(1), dim=1)
    assert loss.item() == pytest.approx((s - t).pow(2).mean().item(), rel=1e-5)


def test_rkd_weights_and_terms():
    student, teacher = _pair()
    method = Method(student, NoTestbed(), {"rkd": RKD(25.0, 0.0)}, teacher)
    views = _views()
    terms = method.losses(0, method(views[0]), method.targets(views))
    assert set(terms) == {"loss", "loss_rkd_distance"}


# ---------------------------------------------------------------------------------------------------------------
# Through the command line
METHODS = {
    "seed": ["METHOD.TESTBED", "none", "METHOD.DISTILLERS", "['seed']", "LOSS.SEED.QUEUE_SIZE", 32],
    "compress_2q": ["METHOD.TESTBED", "none", "METHOD.DISTILLERS", "['compress']", "LOSS.COMPRESS.QUEUE_SIZE", 40],
    "compress_1q": ["METHOD.TESTBED", "none", "METHOD.DISTILLERS", "['compress']", "LOSS.COMPRESS.QUEUE_SIZE", 40,
                    "LOSS.COMPRESS.QUEUES", 1, "LOSS.COMPRESS.STUDENT_FEATURES", "embedding",
                    "MODEL.STUDENT.HEAD.NUM_LAYERS", 1, "MODEL.STUDENT.HEAD.OUT_DIM", 512],
    "attention": ["METHOD.DISTILLERS", "['attention']"],
    "rkd": ["METHOD.DISTILLERS", "['rkd']"],
    "attention_disco": ["METHOD.DISTILLERS", "['attention', 'disco']"],
    "rkd_disco": ["METHOD.DISTILLERS", "['rkd', 'disco']"],
}


def _opts(out, data, teacher, epochs):
    return ["OUTPUT_DIR", out, "DATA.TRAIN_DIR", data / "train", "DATA.VAL_DIR", "", "DATA.IMAGE_SIZE", 32,
            "DATA.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 16, "SOLVER.EPOCHS", epochs, "MODEL.MOCO.QUEUE_SIZE", 32,
            "MODEL.STUDENT.ARCH", "resnet18", "MODEL.STUDENT.HEAD.HIDDEN_DIM", 64, "MODEL.TEACHER.ARCH", "resnet18",
            "MODEL.TEACHER.WEIGHTS", teacher, "TRAIN.LOG_PERIOD", 1, "TRAIN.DETERMINISTIC", True,
            "SOLVER.BASE_LR", 0.3]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_distiller_trains_through_the_cli_and_exports_for_timm(method, tmp_path, imagefolder, teacher_export,
                                                               monkeypatch, one_thread):
    out = tmp_path / method
    argv = ["tools/pretrain.py", *map(str, _opts(out, imagefolder, teacher_export, 1) + METHODS[method])]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "tools", "pretrain.py"), run_name="__main__")
    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4]
    names = {"seed": ["loss_seed"], "compress_2q": ["loss_compress"], "compress_1q": ["loss_compress"],
             "attention": ["loss_mocov2", "loss_attention"], "rkd": ["loss_mocov2", "loss_rkd_distance",
                                                                   "loss_rkd_angle"],
             "attention_disco": ["loss_mocov2", "loss_attention", "loss_disco"],
             "rkd_disco": ["loss_mocov2", "loss_rkd_distance", "loss_rkd_angle", "loss_disco"]}[method]
    for r in recs:
        assert r["loss"] == pytest.approx(sum(r[k] for k in names), rel=1e-5)
    export = out / "export" / "resnet18.pth"
    model = timm.create_model("resnet18", num_classes=0, checkpoint_path=str(export))  # strict load, plain timm
    ours = torch.load(export, weights_only=True)
    assert torch.equal(model.state_dict()["conv1.weight"], ours["state_dict"]["conv1.weight"])
    assert ours["method"] == {"seed": "seed", "compress_2q": "compress", "compress_1q": "compress",
                              "attention": "mocov2 + attention", "rkd": "mocov2 + rkd",
                              "attention_disco": "mocov2 + attention + disco", "rkd_disco": "mocov2 + rkd + disco"}[method]


ITERS = 12  # 64 images / batch 16 x 3 epochs
ALL = ["METHOD.DISTILLERS", "['seed', 'compress', 'attention', 'rkd', 'disco']", "LOSS.SEED.QUEUE_SIZE", 32,
       "LOSS.COMPRESS.QUEUE_SIZE", 40, "TRAIN.CHECKPOINT_PERIOD", 5]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cmd(out, data, teacher, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), *extra,
            *map(str, _opts(out, data, teacher, 3) + ALL)]


def test_every_distiller_at_once_resumes_bitwise_after_kill_9(tmp_path, imagefolder, teacher_export):
    """SEED's queue, both CompRess queues and its key encoder, the MoCo-v2 queue and key encoder: all in the
    checkpoint, so a run killed at a random iteration and resumed ends with exactly the uninterrupted run's state."""
    ref = tmp_path / "reference"
    proc = subprocess.run(_cmd(ref, imagefolder, teacher_export), capture_output=True, text=True, timeout=600,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    target = random.Random(1).randint(6, ITERS - 2)  # after the first checkpoint (iteration 5)
    kill_9_at(_cmd(out, imagefolder, teacher_export), out, target, ENV)
    assert iters_logged(out) < ITERS
    proc = subprocess.run(_cmd(out, imagefolder, teacher_export, "--resume"), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = Checkpointer(str(ref)).load_latest()
    b, _ = Checkpointer(str(out)).load_latest()
    assert a["iter"] == b["iter"] == ITERS
    keys = set(a["model"])
    assert {"distillers.seed.queue", "distillers.compress.student_queue", "distillers.compress.teacher_queue",
            "distillers.compress.encoder_k.backbone.conv1.weight", "testbed.queue"} <= keys
    for k in keys:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
