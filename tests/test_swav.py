"""The SwAV testbed (Table 5): Sinkhorn-Knopp, the swapped prediction, SwAV + DisCo composed as the official script
composes it, the multi-crop data path, the prototype freeze, the queue, and runs through tools/pretrain.py that
resume bitwise after kill -9."""
import json
import math
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
from pretrain.config import setup_cfg
from pretrain.data import ImageFolder, MultiViewDataset, multi_crop_transforms, view_groups, view_sizes
from pretrain.distillers.disco import DisCo
from pretrain.encoder import build_encoder
from pretrain.engine import train_step
from pretrain.losses import sinkhorn, swapped_prediction
from pretrain.model import Method, size_batches, split_views
from pretrain.testbeds.swav import SwAV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
def test_sinkhorn_hand_checked_one_iteration():
    """Q = exp(scores / eps)^T = [[2, 1], [1, 1]] (prototypes x samples), eps 1, one iteration, by hand:
    / total 5 -> [[.4, .2], [.2, .2]]; rows / [.6, .4] / K -> [[1/3, 1/6], [1/4, 1/4]]; columns / [7/12, 5/12] / B
    -> [[2/7, 1/5], [3/14, 3/10]]; x B and transposed: sample 0 [4/7, 3/7], sample 1 [2/5, 3/5]."""
    q = sinkhorn(torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]])), epsilon=1.0, iterations=1)
    torch.testing.assert_close(q, torch.tensor([[4 / 7, 3 / 7], [2 / 5, 3 / 5]]), atol=1e-6, rtol=0)


def test_sinkhorn_symmetric_case_and_the_sums():
    # symmetric scores are already balanced: each sample's code is the softmax of its scores / eps
    q = sinkhorn(torch.tensor([[0.1, 0.0], [0.0, 0.1]]), epsilon=0.05, iterations=3)
    a = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(q, torch.tensor([[a, 1 - a], [1 - a, a]]), atol=1e-6, rtol=0)
    scores = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    q = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(6), atol=1e-6, rtol=0)  # each row is an assignment
    q = sinkhorn(scores, 0.5, 500)  # converged: every prototype gets B / K of the mass
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 6 / 4), atol=1e-4, rtol=0)


def _official_swav_disco(output, embedding, t_embedding, bs, n_crops, assign=(0, 1), T=0.1, eps=0.05, iters=3):
    """The loss of the official swav-master/main_swav_distill.py, re-derived from its text (no queue): for each
    assignment crop the Sinkhorn codes of its scores, the mean over the other crops of the cross-entropy, summed; plus
    the MEAN-reduced MSE of all crops' student embeddings against the teacher's; all divided by the number of
    assignment crops."""
    loss = 0
    for crop_id in assign:
        with torch.no_grad():
            Q = torch.exp(output[bs * crop_id: bs * (crop_id + 1)].detach() / eps).t()
            B, K = Q.shape[1], Q.shape[0]
            Q /= torch.sum(Q)
            for _ in range(iters):
                Q /= torch.sum(Q, dim=1, keepdim=True)
                Q /= K
                Q /= torch.sum(Q, dim=0, keepdim=True)
                Q /= B
            q = (Q * B).t()
        subloss = 0
        for v in [v for v in range(n_crops) if v != crop_id]:
            x = output[bs * v: bs * (v + 1)] / T
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    loss = loss + F.mse_loss(embedding, t_embedding)
    return loss / len(assign)


def test_swav_plus_disco_equals_the_official_composition():
    """Our terms loss_swav + loss_disco (LOSS.DISCO.WEIGHT 1 / (2 assignment crops x 4 crops x 16 dims), the teacher's
    raw embedding as MODEL.TEACHER.NORMALIZE False) equal the official script's loss to 1e-6, and so do the
    gradients of every student parameter and of the prototypes."""
    torch.manual_seed(0)
    student = build_encoder("convnet_tiny", 32, 16, bn=True)
    teacher = build_encoder("convnet_tiny", 24, 16)
    teacher.normalize = False
    swav = SwAV(student, num_views=4, num_prototypes=10, freeze_prototypes_iters=0)
    disco = DisCo(weight=1 / (2 * 4 * 16), num_views=4)
    method = Method(student, swav, {"disco": disco}, teacher, view_groups=[(0, 1, 2, 3)])
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(5, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(5, 3, 16, 16, generator=g) for _ in range(2)]
    targets = method.targets(views)
    out = method(size_batches(views, range(4)))
    ours = method.group_losses((0, 1, 2, 3), split_views(out, 4), targets)
    assert set(ours) == {"loss", "loss_swav", "loss_disco"}
    with torch.no_grad():
        teacher.eval()
        t_embedding = torch.cat([teacher(torch.cat(views[:2])), teacher(torch.cat(views[2:]))])
    output = out["embedding"] @ swav.prototypes.weight.t()  # the official model's prototype scores
    official = _official_swav_disco(output, out["embedding"], t_embedding, 5, 4)
    assert abs(ours["loss"].item() - official.item()) < 1e-6
    params = [p for p in method.parameters() if p.requires_grad]
    mine = torch.autograd.grad(ours["loss"], params, retain_graph=True)
    theirs = torch.autograd.grad(official, params)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_each_views_share_sums_to_the_swav_loss():
    g = torch.Generator().manual_seed(2)
    scores = [torch.randn(4, 6, generator=g) for _ in range(5)]
    codes = {0: sinkhorn(scores[0]), 1: sinkhorn(scores[1])}
    total = sum(swapped_prediction(scores[v], codes, v, 5, 2) for v in range(5))
    expected = sum(-(codes[i] * F.log_softmax(scores[v] / 0.1, dim=1)).sum(1).mean() / 4
                   for i in (0, 1) for v in range(5) if v != i) / 2
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
def test_multi_crop_views_sizes_and_groups(imagefolder):
    cfg = setup_cfg("", ["METHOD.DISTILLERS", "[]", "DATA.AUGMENTATION", "swav", "DATA.MULTI_CROP.NUM", "(2, 3)",
                         "DATA.MULTI_CROP.SIZES", "(32, 16)"])
    assert view_sizes(cfg) == [32, 32, 16, 16, 16] and view_groups(cfg) == [(0, 1, 2, 3, 4)]
    m = cfg.DATA.MULTI_CROP
    for recipe in ("swav", "dino"):
        transforms = multi_crop_transforms(recipe, m.NUM, m.SIZES, m.MIN_SCALE, m.MAX_SCALE)
        data = MultiViewDataset(ImageFolder(str(imagefolder / "train")), transforms, seed=0)
        views, _, _ = data[(0, 3)]
        assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        again, _, _ = data[(0, 3)]  # a pure function of (seed, epoch, index)
        assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert "Solarize" in repr(multi_crop_transforms("dino", m.NUM, m.SIZES, m.MIN_SCALE, m.MAX_SCALE)[1])
    with pytest.raises(ValueError, match="DATA.MULTI_CROP"):
        setup_cfg("", ["METHOD.DISTILLERS", "[]", "DATA.AUGMENTATION", "swav", "DATA.MULTI_CROP.NUM", "(2, 3, 1)"])
    with pytest.raises(ValueError, match="DATA.AUGMENTATION swav"):
        setup_cfg("", ["METHOD.TESTBED", "swav", "METHOD.DISTILLERS", "[]"])
    with pytest.raises(ValueError, match="CROPS_FOR_ASSIGN"):
        setup_cfg("", ["METHOD.TESTBED", "swav", "METHOD.DISTILLERS", "[]", "DATA.AUGMENTATION", "swav",
                       "MODEL.SWAV.CROPS_FOR_ASSIGN", "(0, 2)"])


def test_prototypes_frozen_then_trained_and_normalised_each_step():
    torch.manual_seed(0)
    student = build_encoder("convnet_tiny", 16, 8, bn=True)
    swav = SwAV(student, num_views=3, num_prototypes=6, freeze_prototypes_iters=1)
    method = Method(student, swav, {}, view_groups=[(0, 1, 2)])
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=0.5)
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 16, generator=g)]
    method.set_progress(0, 10, 20)
    train_step(method, views, opt)
    before = swav.prototypes.weight.detach().clone()
    torch.testing.assert_close(before.norm(dim=1), torch.ones(6))  # normalised at the step's start, then frozen
    method.set_progress(1, 10, 20)
    train_step(method, views, opt)
    assert not torch.allclose(swav.prototypes.weight, before)  # trained from iteration 1 on
    assert swav.prototypes.weight.grad is not None


def test_queue_fills_from_its_epoch_and_is_used_once_full(monkeypatch):
    torch.manual_seed(0)
    student = build_encoder("convnet_tiny", 16, 8, bn=True)
    swav = SwAV(student, num_views=2, num_prototypes=6, queue_length=8, queue_start_epoch=1,
                freeze_prototypes_iters=0)
    method = Method(student, swav, {}, view_groups=[(0, 1)])
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=0.1)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    method.set_progress(0, 2, 10)  # epoch 0: no queue
    train_step(method, views, opt)
    assert not swav.queue.any()
    seen = []
    import pretrain.testbeds.swav as module
    monkeypatch.setattr(module, "sinkhorn", lambda scores, *a: seen.append(scores.shape[0]) or sinkhorn(scores, *a))
    for it in (2, 3, 4):  # epoch 1: two batches of 4 fill the 8 slots, the third uses them
        method.set_progress(it, 2, 10)
        train_step(method, views, opt)
    assert seen == [4, 4, 4, 4, 12, 12]  # per assignment crop: the batch alone, then queue (8) + batch
    assert swav.queue.shape == (2, 1, 8, 8) and swav.queue[:, 0, -1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
def _opts(out, data, teacher=None, epochs=2):
    opts = ["OUTPUT_DIR", out, "DATA.TRAIN_DIR", data / "train", "DATA.VAL_DIR", "", "DATA.NUM_WORKERS", 0,
            "DATA.AUGMENTATION", "swav", "DATA.MULTI_CROP.NUM", "(2, 2)", "DATA.MULTI_CROP.SIZES", "(32, 16)",
            "METHOD.TESTBED", "swav", "METHOD.DISTILLERS", "[]", "MODEL.STUDENT.ARCH", "convnet_tiny",
            "MODEL.STUDENT.HEAD.HIDDEN_DIM", 32, "MODEL.STUDENT.HEAD.BN", True, "MODEL.SWAV.NUM_PROTOTYPES", 12,
            "MODEL.SWAV.QUEUE_LENGTH", 32, "MODEL.SWAV.QUEUE_START_EPOCH", 1, "MODEL.SWAV.FREEZE_PROTOTYPES_ITERS", 3,
            "SOLVER.IMS_PER_BATCH", 16, "SOLVER.EPOCHS", epochs, "SOLVER.OPTIMIZER", "larc", "SOLVER.BASE_LR", 0.6,
            "SOLVER.FINAL_LR_FACTOR", 0.001, "SOLVER.COSINE_PER_ITER", True, "SOLVER.WEIGHT_DECAY", 1e-6,
            "TRAIN.LOG_PERIOD", 1, "TRAIN.DETERMINISTIC", True, "TRAIN.CHECKPOINT_PERIOD", 3]
    if teacher:
        opts += ["METHOD.DISTILLERS", "['disco']", "MODEL.TEACHER.ARCH", "resnet18", "MODEL.TEACHER.WEIGHTS", teacher,
                 "MODEL.TEACHER.NORMALIZE", False, "LOSS.DISCO.WEIGHT", 1 / (2 * 4 * 128)]
    return [str(x) for x in opts]


def test_swav_trains_through_the_cli_and_exports_for_timm(tmp_path, imagefolder, monkeypatch, one_thread):
    out = tmp_path / "swav"
    monkeypatch.setattr(sys, "argv", ["tools/pretrain.py", *_opts(out, imagefolder, epochs=1)])
    runpy.run_path(os.path.join(ROOT, "tools", "pretrain.py"), run_name="__main__")
    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert [r["iter"] for r in recs] == [1, 2, 3, 4] and all(r["loss_swav"] > 0 for r in recs)
    assert recs[0]["lr"] == pytest.approx(0.6 * 16 / 256)
    export = out / "export" / "convnet_tiny.pth"
    model = timm.create_model("convnet_tiny", num_classes=0, checkpoint_path=str(export))
    ours = torch.load(export, weights_only=True)
    assert torch.equal(model.state_dict()["0.weight"], ours["state_dict"]["0.weight"]) and ours["method"] == "swav"


def _cmd(out, data, teacher, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), *extra, *_opts(out, data, teacher, 3)]


def test_swav_disco_resumes_bitwise_after_kill_9(tmp_path, imagefolder, teacher_export):
    """Prototypes, the queue (filled from epoch 1) and the optimizer: in the checkpoint, so a run killed at a random
    iteration and resumed ends with exactly the uninterrupted run's state."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = tmp_path / "reference"
    proc = subprocess.run(_cmd(ref, imagefolder, teacher_export), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    target = random.Random(1).randint(5, 10)  # after the first checkpoint (iteration 3), before the end (12)
    kill_9_at(_cmd(out, imagefolder, teacher_export), out, target, env)
    assert iters_logged(out) < 12
    proc = subprocess.run(_cmd(out, imagefolder, teacher_export, "--resume"), capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = Checkpointer(str(ref)).load_latest()
    b, _ = Checkpointer(str(out)).load_latest()
    assert a["iter"] == b["iter"] == 12
    assert {"testbed.prototypes.weight", "testbed.queue"} <= set(a["model"])
    assert a["model"]["testbed.queue"].abs().sum() > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    recs = [json.loads(x) for x in open(ref / "metrics.jsonl") if '"loss"' in x]
    assert all(r["loss_disco"] > 0 for r in recs)
