"""Student checkpoints -> detectron2: the converted weights reproduce the student's own features in the detector."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling import build_model  # noqa: E402

import transfer.d2  # noqa: E402,F401  (registers the ROI heads and backbones)
from pretrain.export import export_encoder  # noqa: E402
from pretrain.encoder import build_encoder  # noqa: E402
from transfer.convert import (RESNET_ARCHS, TIMM_LAYOUTS, convert_checkpoint, convert_resnet,  # noqa: E402
                              convert_timm, read_checkpoint, save_d2_checkpoint)
from transfer.d2.config import get_cfg  # noqa: E402
from transfer.d2.weights import (DEFAULT_CONFIGS, TEACHER_CONFIG_OPTS, LoadError,  # noqa: E402
                                 UnsupportedArchError, check_pretrained_load, convert_to_d2, default_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "efficientnet_b0": "effb0",
       "mobilenetv3_large_100": "mobv3l"}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights AND random BatchNorm running statistics / affine parameters, so an unloaded or misplaced
    BatchNorm cannot go unnoticed (fresh BN is the identity in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _export(tmp_path, arch: str, seed: int = 0):
    """A student export (our format) with randomised BN; -> (path, the student backbone in eval mode)."""
    torch.manual_seed(seed)
    enc = build_encoder(arch, 64, 32)
    with torch.no_grad():
        _randomise(enc.backbone, seed)
    path = export_encoder(enc, arch, str(tmp_path / arch), arch, {"method": "disco"})["backbone"]
    return path, enc.backbone


def _d2_model(config: str, pkl: str, layout: str, **opts):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs/detection", config))
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    report = check_pretrained_load(model, pkl, layout)  # loads with DetectionCheckpointer
    assert report.ok, report.errors
    return model.eval(), report


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_c4_reproduces_student(tmp_path, arch):
    path, student = _export(tmp_path, arch)
    conv = convert_checkpoint(path, layout="C4")
    pkl = str(tmp_path / "d2.pkl")
    save_d2_checkpoint(conv, pkl)
    with open(pkl, "rb") as f:
        saved = pickle.load(f)
    assert saved["__author__"] == "disco-transfer" and saved["matching_heuristics"] is False
    model, report = _d2_model(f"voc/{VOC[arch]}_C4_24k.yaml", pkl, "C4")
    # every student weight is in the detector: all backbone keys loaded, res5 included
    assert len(report.loaded) == len(student.state_dict())
    assert any(k.startswith("roi_heads.res5.") for k in report.loaded)
    assert set(report.new) >= {"roi_heads.res5.norm.weight", "roi_heads.box_predictor.cls_score.weight"}

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        res4 = model.backbone(x)["res4"]
        s = student
        ref = s.layer3(s.layer2(s.layer1(s.maxpool(s.act1(s.bn1(s.conv1(x)))))))
        _close(res4, ref)
        res5 = model.roi_heads.res5[:-1]  # without MoCo's extra norm
        assert type(model.roi_heads.res5[-1]).__name__.endswith("BatchNorm")
        _close(res5(res4), s.layer4(ref))


def _effnet_features(s, x):
    """The student's stride 4 / 8 / 16 / 32 features (after blocks 1, 2, 4, 6) and forward_features."""
    x = s.bn1(s.conv_stem(x))
    feats = {}
    for i, b in enumerate(s.blocks):
        x = b(x)
        feats.update({{1: "res2", 2: "res3", 4: "res4", 6: "res5"}[i]: x} if i in (1, 2, 4, 6) else {})
    return feats


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_c4_reproduces_student(tmp_path, arch):
    path, student = _export(tmp_path, arch)
    conv = convert_checkpoint(path, layout="C4")
    pkl = str(tmp_path / "d2.pkl")
    save_d2_checkpoint(conv, pkl)
    model, report = _d2_model(f"voc/{VOC[arch]}_C4_24k.yaml", pkl, "C4")
    dropped = {k for k in student.state_dict() if k.startswith("conv_head")} if "mobilenet" in arch else set()
    assert set(conv.skipped) >= dropped and len(report.loaded) == len(student.state_dict()) - len(dropped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        res4 = model.backbone(x)["res4"]
        _close(res4, _effnet_features(student, x)["res4"])
        # the ROI stage continues the same network: blocks 5-6 (+ conv_head / bn2 for EfficientNet)
        _close(model.roi_heads.res5(res4), student.forward_features(x))


def test_timm_fpn_bottom_up_reproduces_student(tmp_path):
    path, student = _export(tmp_path, "efficientnet_b0")
    conv = convert_checkpoint(path, layout="FPN")
    assert {k for k in conv.skipped if k.startswith(("conv_head", "bn2"))} == {
        k for k in student.state_dict() if k.startswith(("conv_head", "bn2"))}  # after res5: unused by FPN
    pkl = str(tmp_path / "d2.pkl")
    save_d2_checkpoint(conv, pkl)
    model, report = _d2_model("coco/effb0_mask_FPN_1x.yaml", pkl, "FPN")
    assert any(k.startswith("backbone.fpn_lateral") for k in report.new)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = model.backbone.bottom_up(x)
        want = _effnet_features(student, x)
        assert set(got) == set(want)
        for name in want:
            _close(got[name], want[name])


def test_resnet_fpn_keys(tmp_path):
    path, student = _export(tmp_path, "resnet18")
    conv = convert_checkpoint(path, layout="FPN")
    assert all(k.startswith("backbone.bottom_up.") for k in conv.model)
    pkl = str(tmp_path / "d2.pkl")
    save_d2_checkpoint(conv, pkl)
    _, report = _d2_model("coco/r18_mask_FPN_1x.yaml", pkl, "FPN")
    assert len(report.loaded) == len(student.state_dict())


def test_wrong_config_is_an_error_naming_keys(tmp_path):
    """An R-50 checkpoint checked against the R-18 config: every mismatch is named, nothing is written."""
    path, _ = _export(tmp_path, "resnet50")
    out = str(tmp_path / "out.pkl")
    with pytest.raises(LoadError) as e:
        convert_to_d2(path, out, config_file=os.path.join(ROOT, "configs/detection/voc/r18_C4_24k.yaml"))
    msg = str(e.value)
    assert "backbone.res2.0.conv3.weight" in msg and "unexpected" in msg and "shape mismatch" in msg
    assert "--config-file" in msg and "resnet50" in msg and "ResNet-18" in msg
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["resnet50"]


def test_unmapped_and_wrong_arch_keys_raise(tmp_path):
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.se.fc.weight": torch.zeros(4, 4),
          "fc.weight": torch.zeros(10, 512)}
    with pytest.raises(KeyError, match="layer1.0.se.fc.weight"):
        convert_resnet(sd)
    with pytest.raises(KeyError, match="conv1.weight"):
        convert_timm(sd, "efficientnet_b0")
    path, _ = _export(tmp_path, "resnet18")
    with pytest.raises(ValueError, match="resnet34"):
        read_checkpoint(path, "resnet34")


def test_moco_disco_pytorch_and_swav_formats_convert(tmp_path):
    torch.manual_seed(0)
    backbone = _randomise(build_encoder("resnet18", 64, 32).backbone, 1)
    sd = backbone.state_dict()
    moco = {"epoch": 200, "arch": "resnet18", "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in sd.items()},
        "module.encoder_q.fc.0.weight": torch.zeros(64, 512), "module.encoder_q.fc.0.bias": torch.zeros(64),
        "module.encoder_q.fc.2.weight": torch.zeros(32, 64), "module.encoder_q.fc.2.bias": torch.zeros(32),
        **{f"module.encoder_k.{k}": v for k, v in sd.items()},
        "module.queue": torch.zeros(32, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
    swav = {**{f"module.{k}": v for k, v in sd.items()},
            "module.projection_head.0.weight": torch.zeros(64, 512), "module.projection_head.0.bias": torch.zeros(64),
            "module.prototypes.weight": torch.zeros(10, 64)}
    # the official DisCo-pytorch checkpoints: MoCo's layout plus the frozen teacher's copy
    disco = {"state_dict": {**moco["state_dict"], "module.teacher.conv1.weight": torch.zeros(64, 3, 7, 7)}}
    torch.save(moco, tmp_path / "moco.pth.tar")
    torch.save(disco, tmp_path / "disco.pth.tar")
    torch.save(swav, tmp_path / "swav.pth")
    for name, fmt in (("moco.pth.tar", "moco"), ("disco.pth.tar", "disco-pytorch"), ("swav.pth", "swav")):
        conv = convert_checkpoint(str(tmp_path / name), layout="C4")
        assert conv.format == fmt and conv.arch == "resnet18"
        assert torch.equal(conv.model["roi_heads.res5.1.conv2.norm.running_var"], sd["layer4.1.bn2.running_var"])
        assert torch.equal(conv.model["backbone.stem.conv1.norm.weight"], sd["bn1.weight"])
        assert len(conv.model) == len(sd)
        dropped = {"moco": ("module.encoder_k.conv1.weight", "module.queue", "module.encoder_q.fc.0.weight"),
                   "disco-pytorch": ("module.teacher.conv1.weight", "module.encoder_k.conv1.weight"),
                   "swav": ("module.projection_head.0.weight", "module.prototypes.weight")}[fmt]
        assert all(conv.skipped.get(k) for k in dropped), conv.skipped


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_to_d2.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tmp_path):
    path, _ = _export(tmp_path, "resnet18")
    out = str(tmp_path / "r18.pkl")
    ok = _cli(path, out)
    assert ok.returncode == 0, ok.stderr
    assert "loaded      roi_heads.res5.1.conv2.norm.running_var" in ok.stdout
    assert "new         roi_heads.res5.norm.weight" in ok.stdout and ", 0 errors" in ok.stdout
    assert os.path.isfile(out)
    with pytest.raises(FileExistsError, match="--force"):
        convert_to_d2(path, out)
    bad = _cli(path, str(tmp_path / "bad.pkl"), "--config-file", "configs/detection/voc/r50_C4_24k.yaml")
    assert bad.returncode != 0 and "shape mismatch" in bad.stderr and "--config-file" in bad.stderr
    assert not os.path.exists(tmp_path / "bad.pkl")


@pytest.mark.parametrize("arch", ["convnet_tiny", "convnet_small"])
def test_arch_without_detectron2_backbone_is_refused_naming_the_supported_ones(tmp_path, arch):
    """The demo's convnets have no detectron2 backbone: a clear error naming the arch and the detection students, not
    the suggestion of an (unrelated) R-50 config; with --config-file as well, and nothing is written."""
    path, _ = _export(tmp_path, arch)
    out = str(tmp_path / "out.pkl")
    for config_file in (None, os.path.join(ROOT, "configs/detection/voc/r18_C4_24k.yaml")):
        with pytest.raises(UnsupportedArchError) as e:
            convert_to_d2(path, out, config_file=config_file)
        msg = str(e.value)
        assert f"architecture {arch!r} has no detectron2 backbone" in msg
        for student, short in (("resnet18", "r18"), ("resnet34", "r34"), ("resnet50", "r50"),
                               ("efficientnet_b0", "effb0"), ("efficientnet_b1", "effb1"),
                               ("mobilenetv3_large_100", "mobv3l")):
            assert f"{student} ({short})" in msg
        assert "r50_C4_24k" not in msg and "MODEL.RESNETS.DEPTH" not in msg
        assert not os.path.exists(out)
    with pytest.raises(UnsupportedArchError, match=arch):
        default_config(arch)


def test_every_convertible_arch_has_a_detection_config():
    """The architectures transfer.convert maps to detectron2 are exactly the students with a config and the
    teachers whose R-50 overrides the errors name."""
    assert set(RESNET_ARCHS) | set(TIMM_LAYOUTS) == set(DEFAULT_CONFIGS) | set(TEACHER_CONFIG_OPTS)
    assert not set(DEFAULT_CONFIGS) & set(TEACHER_CONFIG_OPTS)
    assert os.path.isfile(os.path.join(ROOT, default_config("resnet18")))
    with pytest.raises(ValueError, match="--config-file configs/detection/voc/r50_C4_24k.yaml "
                                         "MODEL.RESNETS.DEPTH 101") as e:
        default_config("resnet101")
    assert not isinstance(e.value, UnsupportedArchError)
