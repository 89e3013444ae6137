import os

import pytest
import timm
import torch

from pretrain.backbones import build_backbone
from pretrain.checkpoint import Checkpointer, load_strict, save_atomic
from pretrain.export import export_encoder
from pretrain.formats import read_backbone
from pretrain.teacher import load_teacher
from pretrain.encoder import build_encoder


def _enc(arch="resnet18", hidden=64, out=16, layers=2, bn=False):
    torch.manual_seed(1)
    enc = build_encoder(arch, hidden, out, layers, bn).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrongly loaded buffer shows
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc


def _same_output(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_export_loads_strictly_in_timm(tmp_path):
    enc = _enc("efficientnet_b0")
    paths = export_encoder(enc, "efficientnet_b0", str(tmp_path), "efficientnet_b0", {"method": "disco"})
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0, checkpoint_path=paths["backbone"])
    _same_output(model, enc.backbone)
    meta = torch.load(paths["backbone"], weights_only=True)
    assert meta["arch"] == "efficientnet_b0" and meta["head"]["hidden_dim"] == 64
    head = torch.load(paths["head"], weights_only=True)["state_dict"]
    assert set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_teacher_from_our_export(tmp_path):
    enc = _enc()
    path = export_encoder(enc, "resnet18", str(tmp_path), "resnet18", {})["backbone"]
    teacher, info = load_teacher(path, "resnet18")
    assert info["format"] == "export"
    _same_output(teacher, enc)


def _moco_state(enc, v1=False):
    sd = {f"module.encoder_q.{k}": v for k, v in enc.backbone.state_dict().items()}
    for k, v in enc.head.state_dict().items():
        sd[f"module.encoder_q.fc.{k[2:]}" if v1 else f"module.encoder_q.fc.{k}"] = v
    sd.update({f"module.encoder_k.{k}": v + 1 for k, v in sd.items()})
    sd["module.queue"] = torch.ones(16, 32)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}


@pytest.mark.parametrize("v1", [False, True])
def test_teacher_from_moco_checkpoint(tmp_path, v1):
    enc = _enc(layers=1 if v1 else 2)
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(_moco_state(enc, v1), path)
    teacher, info = load_teacher(str(path), "resnet18")
    assert info["format"] == "moco" and "module.queue" in info["ignored_keys"]
    assert info["head"]["num_layers"] == (1 if v1 else 2)
    _same_output(teacher, enc)


def test_teacher_from_swav_state_dict(tmp_path):
    enc = _enc(bn=True)
    sd = {f"module.{k}": v for k, v in enc.backbone.state_dict().items()}
    sd.update({f"module.projection_head.{k}": v for k, v in enc.head.state_dict().items()})
    sd["module.prototypes.weight"] = torch.randn(3000, 16)
    torch.save(sd, tmp_path / "swav.pth")
    teacher, info = load_teacher(str(tmp_path / "swav.pth"), "resnet18")
    assert info["format"] == "swav" and info["head"]["bn"] and info["ignored_keys"] == ["module.prototypes.weight"]
    _same_output(teacher, enc)


def test_teacher_missing_and_unexpected_keys_listed(tmp_path):
    state = _moco_state(_enc())
    del state["state_dict"]["module.encoder_q.layer4.1.bn2.weight"]
    state["state_dict"]["module.encoder_q.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth.tar")
    with pytest.raises(KeyError, match=r"missing keys \(1\).*layer4\.1\.bn2\.weight.*unexpected keys \(1\).*extra"):
        load_teacher(str(tmp_path / "bad.pth.tar"), "resnet18")
    with pytest.raises(KeyError, match="MODEL.TEACHER.ARCH"):  # wrong architecture: every key named
        load_teacher(str(tmp_path / "bad.pth.tar"), "resnet34")


def test_unknown_format_and_missing_file(tmp_path):
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        load_teacher(str(tmp_path / "x.pth"), "resnet18")
    with pytest.raises(FileNotFoundError, match="MODEL.TEACHER.WEIGHTS"):
        load_teacher(str(tmp_path / "nope.pth"), "resnet18")


def test_checkpointer_keeps_newest_and_skips_truncated(tmp_path, caplog):
    ck = Checkpointer(str(tmp_path), max_to_keep=2)
    for it in (10, 20, 30):
        ck.save({"iter": it}, it)
    assert [os.path.basename(p) for p in ck.list()] == ["model_0000030.pth", "model_0000020.pth"]
    newest = ck.list()[0]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    state, path = ck.load_latest()
    assert state["iter"] == 20 and path.endswith("model_0000020.pth")
    assert "unreadable" in caplog.text


def test_save_atomic_leaves_no_partial_file(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    save_atomic({"a": 1}, str(tmp_path / "x.pth"))
    with pytest.raises(RuntimeError):
        save_atomic({"a": Boom()}, str(tmp_path / "x.pth"))
    assert torch.load(tmp_path / "x.pth")["a"] == 1  # the old file is intact
    assert os.listdir(tmp_path) == ["x.pth"]


def test_read_backbone_every_format_infers_arch_and_reports_skipped(tmp_path):
    enc = _enc()
    torch.save(_moco_state(enc), tmp_path / "moco.pth.tar")
    ck = read_backbone(str(tmp_path / "moco.pth.tar"))  # arch from the checkpoint's "arch"
    assert ck.arch == "resnet18" and ck.format == "moco"
    assert "module.queue" in ck.skipped and any(k.startswith("module.encoder_k.") for k in ck.skipped)
    assert "projection head" in ck.skipped["module.encoder_q.fc.0.weight"]
    load_strict(build_backbone("resnet18"), ck.state_dict, "moco backbone")

    # DisCo-pytorch: MoCo layout plus teacher copies, no "arch": inferred from keys and shapes
    state = _moco_state(enc)
    state["state_dict"].update({f"module.teacher.{k}": v for k, v in enc.backbone.state_dict().items()})
    del state["arch"]
    torch.save(state, tmp_path / "disco.pth.tar")
    ck = read_backbone(str(tmp_path / "disco.pth.tar"))
    assert ck.arch == "resnet18" and ck.format == "disco-pytorch"
    assert ck.skipped["module.teacher.conv1.weight"].startswith("the teacher")

    # a bare timm / torchvision state dict: the classifier is dropped
    sd = dict(enc.backbone.state_dict(), **{"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "tv.pth")
    ck = read_backbone(str(tmp_path / "tv.pth"))
    assert ck.format == "state_dict" and ck.arch == "resnet18" and set(ck.skipped) == {"fc.weight", "fc.bias"}
    assert torch.equal(ck.state_dict["layer4.1.bn2.running_var"], enc.backbone.layer4[1].bn2.running_var)

    # wrong shapes for every registered architecture: a clear error asking for the architecture
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="pass the architecture explicitly"):
        read_backbone(str(tmp_path / "odd.pth"))


def test_read_backbone_from_pretraining_checkpoint(tmp_path, imagefolder, teacher_export):
    from conftest import tiny_cfg
    from pretrain.trainer import Trainer

    cfg = tiny_cfg(tmp_path / "run", imagefolder, teacher_export, **{"TRAIN.STOP_AT_ITER": 1})
    Trainer(cfg).run()
    path = Checkpointer(str(tmp_path / "run")).list()[0]
    ck = read_backbone(path)
    assert ck.format == "pretrain-checkpoint" and ck.arch == "resnet18" and ck.metadata["method"] == "mocov2 + disco"
    assert set(ck.head) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    load_strict(build_backbone("resnet18"), ck.state_dict, "student")
