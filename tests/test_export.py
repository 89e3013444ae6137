"""Exports load in timm (issue #11): timm's architectures with plain timm, the demo convnets once pretrain.backbones
is imported; and what an iteration checkpoint holds, in bytes per part (tools/export.py --describe), against what an
export writes."""
import copy
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from pretrain.checkpoint import Checkpointer
from pretrain.encoder import build_encoder
from pretrain.export import EXPORTED_PARTS, describe_checkpoint, export_encoder, format_description
from pretrain.safeload import load_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _student(arch):
    """A freshly built student with non-trivial BatchNorm statistics (a wrongly loaded buffer shows)."""
    torch.manual_seed(3)
    enc = build_encoder(arch, 32, 16).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc


def _assert_same_features(model, backbone):
    """Bitwise the same features: the same weights in the same memory layout (a trained backbone may be channels_last,
    MODEL.CHANNELS_LAST auto on a CPU, which rounds differently from the contiguous layout timm loads into)."""
    backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), backbone.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "convnet_tiny"])
def test_export_loads_with_timm_create_model_and_load_checkpoint(tmp_path, arch):
    enc = _student(arch)
    path = export_encoder(enc, arch, str(tmp_path), arch, {"method": "disco"})["backbone"]
    assert load_torch(path)["timm_arch"] == arch
    model = timm.create_model(arch, num_classes=0, checkpoint_path=path)  # timm's load_checkpoint, strict
    _assert_same_features(model, enc.backbone)
    other = timm.create_model(arch, num_classes=0)
    timm.models.load_checkpoint(other, path, strict=True)
    _assert_same_features(other, enc.backbone)


def test_convnet_export_loads_in_a_fresh_process_after_importing_backbones(tmp_path):
    """What the README says: plain timm does not know the demo's convnets; after `import pretrain.backbones` it does."""
    enc = _student("convnet_tiny")
    path = export_encoder(enc, "convnet_tiny", str(tmp_path), "convnet_tiny", {})["backbone"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(enc.backbone(x), tmp_path / "y.pt")
    script = f"""
import timm, torch
try:
    timm.create_model("convnet_tiny", num_classes=0)
except RuntimeError as e:
    print("plain timm:", e)
import pretrain.backbones
model = timm.create_model("convnet_tiny", num_classes=0, checkpoint_path={path!r}).eval()
with torch.no_grad():
    y = model(torch.load({str(tmp_path / 'x.pt')!r}))
print("same features:", torch.equal(y, torch.load({str(tmp_path / 'y.pt')!r})))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plain timm: Unknown model (convnet_tiny)" in proc.stdout and "same features: True" in proc.stdout


# --- what a checkpoint holds ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def disco_checkpoint(tmp_path_factory, imagefolder, teacher_export):
    """One iteration of MoCo-v2 + DisCo (convnet_tiny student, resnet18 teacher, queue 32): (checkpoint, trainer)."""
    from conftest import tiny_cfg
    from pretrain.trainer import Trainer

    out = tmp_path_factory.mktemp("describe") / "run"
    trainer = Trainer(tiny_cfg(out, imagefolder, teacher_export, **{"MODEL.STUDENT.ARCH": "convnet_tiny",
                                                                    "TRAIN.STOP_AT_ITER": 1}))
    trainer.run()
    return Checkpointer(str(out)).list()[0], trainer


def _storage_bytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_describe_checkpoint_accounts_for_every_byte(disco_checkpoint, tmp_path):
    path, trainer = disco_checkpoint
    parts, info = describe_checkpoint(path)
    by_name = {p.name: p for p in parts}
    assert [p.name for p in parts] == ["student backbone", "student projection head", "testbed.queue",
                                       "testbed.queue_ptr", "testbed.encoder_k", "distillers.disco", "teacher buffers",
                                       "optimizer state", "other", "file overhead"]
    assert sum(p.nbytes for p in parts) == info["size"] == os.path.getsize(path)
    assert info == {"size": info["size"], "iteration": 1, "epoch": 0, "method": "mocov2 + disco",
                    "arch": "convnet_tiny"}
    model = load_torch(path)["model"]
    student = trainer.model.student
    backbone = _storage_bytes(student.backbone.state_dict().values())
    head = _storage_bytes(student.head.state_dict().values())
    keys = sum(len(k) for k in model if k.startswith("student.backbone."))  # the pickled key names
    assert backbone + keys < by_name["student backbone"].nbytes < backbone + 2 * keys
    assert head < by_name["student projection head"].nbytes < head + 200
    # the momentum encoder is a copy of the student; the queue is dim x QUEUE_SIZE floats
    assert backbone + head < by_name["testbed.encoder_k"].nbytes < backbone + head + 3 * keys
    assert by_name["testbed.queue"].detail == "128 x 32 float32" and by_name["testbed.queue"].nbytes > 128 * 32 * 4
    assert by_name["distillers.disco"].nbytes == 0 and "no state" in by_name["distillers.disco"].detail
    # SGD keeps one momentum buffer per trained parameter: the student's parameters, once more
    params = list(student.parameters())
    assert _storage_bytes(params) < by_name["optimizer state"].nbytes < _storage_bytes(params) + 5000
    assert by_name["optimizer state"].detail == f"momentum_buffer of {len(params)} parameter tensors"
    assert {"rng", "cfg", "scheduler"} <= set(by_name["other"].detail.split(", "))
    assert 0 < by_name["file overhead"].nbytes < 0.2 * info["size"]

    table = format_description(path, parts, info)
    assert f"{path}: {info['size'] / 1e6:.2f} MB, iteration 1 (epoch 0), method mocov2 + disco" in table
    kept = sum(by_name[n].nbytes for n in EXPORTED_PARTS)
    assert f"keeps the student backbone and projection head: {kept / 1e6:.2f} MB of {info['size'] / 1e6:.2f}" in table
    for p in parts:
        assert f"{p.name:<28} {p.nbytes / 1e6:>9.2f} {100 * p.nbytes / info['size']:>6.1f}%  {p.detail}" in table

    # a checkpoint of an earlier version (MoCo's "student": encoder_q / encoder_k / queue) reads under today's names
    state = load_torch(path)
    old = {("encoder_q." + k[len("student."):]) if k.startswith("student.") else k[len("testbed."):]: v
           for k, v in state.pop("model").items()}
    torch.save(dict(state, student=old), tmp_path / "model_0000001.pth")
    old_parts, old_info = describe_checkpoint(str(tmp_path / "model_0000001.pth"))
    assert [(p.name, p.detail) for p in old_parts[:5]] == [(p.name, p.detail) for p in parts[:5]]
    assert old_info["method"] == "mocov2 + disco"

    export = export_encoder(trainer.model.exported(), "convnet_tiny", str(tmp_path / "exp"), "x", {})["backbone"]
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        describe_checkpoint(export)


def test_export_cli_describes_and_reports_what_it_wrote(disco_checkpoint, tmp_path):
    path, trainer = disco_checkpoint
    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), path, str(out), "--describe"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert format_description(path, *describe_checkpoint(path)) in proc.stdout
    backbone, head = out / "convnet_tiny.pth", out / "convnet_tiny_head.pth"
    sizes = {f: os.path.getsize(f) for f in (backbone, head)}
    assert f"backbone: {backbone} ({sizes[backbone] / 1e6:.2f} MB)" in proc.stdout
    assert f"head: {head} ({sizes[head] / 1e6:.2f} MB)" in proc.stdout
    total, written = os.path.getsize(path), sum(sizes.values())
    assert (f"wrote {written / 1e6:.2f} MB from the {total / 1e6:.2f} MB checkpoint ({100 * written / total:.1f}%): "
            f"the student only") in proc.stdout
    _assert_same_features(timm.create_model("convnet_tiny", num_classes=0, checkpoint_path=str(backbone)),
                          trainer.model.student.backbone)

    # a wrong command line is told before torch is imported
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "tools", "export.py"), path],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give OUT_DIR (to export) and/or --describe" in proc.stderr
    assert "import time:" in proc.stderr and not re.search(r"\|\s+torch(\.|$)", proc.stderr, re.M)
