"""TRAIN.COMPILE: the student, the frozen teacher and the momentum key encoder run through torch.compile (in place,
``nn.Module.compile``); the losses equal the eager ones, state-dict keys, checkpoints and resumes are unchanged.

CPU, convnet_tiny student and teacher at 32 px with MoCo-v2 + attention transfer + DisCo, so the compiled graphs cover
the embedding, the projection head and the feature maps of both networks. Compilation dominates the time (inductor:
C++ kernels; about a minute with an empty inductor cache, mostly its one-off precompiled headers, seconds when
cached): one compiled setup (the ``runs`` fixture) is shared, and the Trainer test runs the same shapes, so its
graphs come from the cache.
"""
import json

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_cfg
from pretrain.checkpoint import Checkpointer
from pretrain.engine import train_step
from pretrain.model import build_method
from pretrain.trainer import Trainer

STEPS = 3
# fp32 everywhere. Inductor fuses BatchNorm / ReLU / pooling / normalisation and reorders their reductions (BatchNorm's
# variance included), so the values differ from eager at the level of float32 rounding, amplified by 3 SGD steps at
# lr 0.3. Measured here: losses at most 4.4e-6 relative (the attention term; the others 1e-7 or equal), weights 1e-5
# absolute, BatchNorm running statistics 2.4e-5 relative (2e-4 absolute on a running mean of 4.5). The tolerances
# leave a 20x margin or more for other CPUs' kernels, yet any real difference in what is computed (a term missing,
# BatchNorm in the other mode, a stale momentum encoder, wrong feature maps) moves the losses by far more than 1e-4.
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)
STATE_TOL = dict(rtol=1e-3, atol=1e-3)
COMPILED = ["student", "testbed.encoder_k", "teacher"]


@pytest.fixture(scope="module")
def convnet_teacher(tmp_path_factory):
    """A convnet_tiny 'teacher' in our export format (random weights, head 64 -> 64 -> 128)."""
    from pretrain.encoder import build_encoder
    from pretrain.export import export_encoder

    torch.manual_seed(123)
    out = tmp_path_factory.mktemp("convnet_teacher")
    return export_encoder(build_encoder("convnet_tiny", 64, 128), "convnet_tiny", str(out), "convnet_tiny",
                          {"method": "moco"})["backbone"]


def _cfg(output_dir, imagefolder, teacher, **overrides):
    # explicit precision (not auto): the same fp32 channels_last run on every CPU
    return tiny_cfg(output_dir, imagefolder, teacher, **{
        "MODEL.STUDENT.ARCH": "convnet_tiny", "MODEL.TEACHER.ARCH": "convnet_tiny",
        "METHOD.DISTILLERS": "['attention', 'disco']", "SOLVER.EPOCHS": 1, "MODEL.CHANNELS_LAST": True,
        "TRAIN.AMP.ENABLED": False, "TRAIN.AMP.TEACHER": False, **overrides})


def _steps(method, compile_it):
    """STEPS train_steps from the seed-0 initial weights on fixed batches, as the Trainer runs them."""
    method = method.to(memory_format=torch.channels_last)
    names = method.compile_encoders() if compile_it else []
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randn(8, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
                for _ in range(2)] for _ in range(STEPS)]
    torch.manual_seed(2)  # shuffle-BN's permutations
    losses, graphs, grad_fns = [], [], set()
    # what the student's forwards in train_step return: with compile, the autograd node of the compiled function
    hook = method.register_forward_hook(lambda m, args, out: grad_fns.add(
        (type(out["embedding"].grad_fn).__name__, len(out["maps"]))))
    for views in batches:
        losses.append({k: v.item() for k, v in train_step(method, views, opt).items()})
        graphs.append(counters["stats"]["unique_graphs"])
    hook.remove()
    return {"method": method, "names": names, "losses": losses, "graphs": graphs, "grad_fns": grad_fns}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, imagefolder, convnet_teacher):
    """The same STEPS steps eager and compiled (deterministic algorithms on, as the Trainer test's runs)."""
    cfg = _cfg(tmp_path_factory.mktemp("compile"), imagefolder, convnet_teacher)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        eager = _steps(build_method(cfg), False)
        torch.manual_seed(0)
        compiled_method = build_method(cfg)
        torch._dynamo.reset()  # graphs compiled earlier in this process for other modules must not be reused
        before = counters["stats"]["unique_graphs"]
        compiled = _steps(compiled_method, True)
        compiled["new_graphs"] = [g - before for g in compiled["graphs"]]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return eager, compiled


def test_compiled_steps_equal_eager_steps(runs):
    eager, compiled = runs
    method = compiled["method"]
    assert compiled["names"] == COMPILED
    for name in COMPILED:
        assert method.get_submodule(name)._compiled_call_impl is not None, name
    # the first step compiled the three encoders (student with its feature maps and backward, teacher, key
    # encoder), the later ones reused them (no recompilation per step)
    assert compiled["new_graphs"] == [3] * STEPS

    assert [set(x) for x in compiled["losses"]] == [{"loss", "loss_mocov2", "loss_attention", "loss_disco"}] * STEPS
    for step, (e, c) in enumerate(zip(eager["losses"], compiled["losses"])):
        for k in e:
            torch.testing.assert_close(c[k], e[k], **LOSS_TOL, msg=lambda m: f"step {step} {k}: {m}")
    assert eager["losses"][0] != eager["losses"][-1]  # the steps did train
    e_state, c_state = eager["method"].state_dict(), method.state_dict()
    for k, v in e_state.items():  # student, key encoder, BN statistics, queue, pointer (and the teacher, unchanged)
        torch.testing.assert_close(c_state[k], v, **STATE_TOL, msg=lambda m: f"{k}: {m}")
    # the student's forwards (both views, with the 3 stages' feature maps) ran compiled code
    assert compiled["grad_fns"] == {("CompiledFunctionBackward", 3)}
    assert eager["grad_fns"] == {("DivBackward0", 3)}  # F.normalize's last op, eager


def test_compiled_state_dict_keys_are_unchanged(runs):
    eager, compiled = runs
    e_state, c_state = eager["method"].state_dict(), compiled["method"].state_dict()
    assert list(c_state) == list(e_state) and not any("_orig_mod" in k for k in c_state)
    # and each loads into the other strictly (a compiled run's checkpoint resumes eager and vice versa)
    eager["method"].load_state_dict(c_state, strict=True)
    compiled["method"].load_state_dict(e_state, strict=True)
    backbone = compiled["method"].exported().backbone  # what the export writes
    assert list(backbone.state_dict()) == list(eager["method"].exported().backbone.state_dict())


def _losses(output_dir):
    return {r["iter"]: r for r in map(json.loads, open(output_dir / "metrics.jsonl")) if "loss" in r}


def test_trainer_compiled_run_resumes_uncompiled_and_back(tmp_path, imagefolder, convnet_teacher):
    """Iterations 1-2 compiled, 3 eager, 4 compiled again, against 4 eager iterations from the same start."""
    out, ref = tmp_path / "mixed", tmp_path / "eager"
    torch._dynamo.reset()
    before = counters["frames"]["ok"]
    first = Trainer(_cfg(out, imagefolder, convnet_teacher, **{"TRAIN.COMPILE": True, "TRAIN.STOP_AT_ITER": 2}))
    assert first.run() is None and first.iter == 2
    assert counters["frames"]["ok"] - before == 3  # dynamo compiled the three encoders
    assert all(first.model.get_submodule(n)._compiled_call_impl is not None for n in COMPILED)
    assert "TRAIN.COMPILE: torch.compile of student, testbed.encoder_k, teacher" in (out / "log.txt").read_text()
    keys = list(Checkpointer(str(out)).load_latest()[0]["model"])

    second = Trainer(_cfg(out, imagefolder, convnet_teacher, **{"TRAIN.STOP_AT_ITER": 3}))
    assert second.run() is None and second.iter == 3
    assert all(second.model.get_submodule(n)._compiled_call_impl is None for n in COMPILED)
    third = Trainer(_cfg(out, imagefolder, convnet_teacher, **{"TRAIN.COMPILE": True, "TRAIN.STOP_AT_ITER": 4}))
    assert third.run() is None and third.iter == 4
    changes = [json.loads(x)["changes"] for x in open(out / "config_changes.jsonl")]
    assert [c["TRAIN.COMPILE"] for c in changes] == [["True", "False"], ["False", "True"]]

    eager = Trainer(_cfg(ref, imagefolder, convnet_teacher, **{"TRAIN.STOP_AT_ITER": 4}))
    eager.run()
    mixed_losses, eager_losses = _losses(out), _losses(ref)
    assert sorted(mixed_losses) == sorted(eager_losses) == [1, 2, 3, 4]
    for it, e in eager_losses.items():
        for k in ("loss", "loss_mocov2", "loss_attention", "loss_disco"):
            torch.testing.assert_close(mixed_losses[it][k], e[k], **LOSS_TOL, msg=lambda m: f"iter {it} {k}: {m}")
    mixed, plain = Checkpointer(str(out)).load_latest()[0], Checkpointer(str(ref)).load_latest()[0]
    assert list(mixed["model"]) == list(plain["model"]) == keys
    for k, v in plain["model"].items():
        torch.testing.assert_close(mixed["model"][k], v, **STATE_TOL, msg=lambda m: f"{k}: {m}")
