"""The backbone registry: every name builds, its feature maps (``forward_with_maps`` / ``stage_info``), the
torchvision-style ResNet init (last BN of each block at 1), the demo convnets' unchanged seeded weights and their
registration as timm models."""
import math
from functools import lru_cache

import pytest
import timm
import torch
from torch import nn

from pretrain.backbones import BACKBONES, CONVNET_WIDTHS, ConvNet, build_backbone, forward_with_maps, stage_info

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 OpenMP threads run small models far slower here

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50x2")
SIZE = 64  # every backbone takes 64 px (ViT: dynamic_img_size; XCiT: conv patch embed + Fourier pos. encoding)
BIG = ("resnet101", "resnet152", "resnet50x2")  # batch 1 for these (CPU time); BN train mode still has 2x2 px at /32


@lru_cache(maxsize=None)
def _built(name):
    """One seeded build per name for the tests that only read weights or run forwards (R-152 takes ~1.5 s)."""
    torch.manual_seed(0)
    return build_backbone(name)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_documented_dim(name):
    model = _built(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, BACKBONES[name].feature_dim)
    assert torch.isfinite(out).all()


def test_resnet50x2_is_swav_width():
    m = _built("resnet50x2")
    assert m.conv1.out_channels == 128 and m.layer1[0].conv1.out_channels == 128  # stem and bottleneck doubled
    assert m.layer4[-1].conv3.out_channels == 4096


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_with_maps_matches_forward_and_stage_info(name):
    model = _built(name)
    torch.manual_seed(1)
    n = 1 if name in BIG else 2
    x = torch.randn(n, 3, SIZE, SIZE)
    info = stage_info(name)
    with torch.no_grad():
        for train in (False, True):  # eval (a frozen teacher) and train (a student: BN on batch statistics)
            model.train(train)
            out = model(x)
            pooled, maps = forward_with_maps(model, x)
            assert out.shape == (n, BACKBONES[name].feature_dim) and torch.isfinite(out).all()
            assert torch.equal(pooled, out), f"{name} train={train}: forward_with_maps pooled != forward"
            assert [tuple(m.shape) for m in maps] == [
                (n, s["num_chs"], SIZE // s["reduction"], SIZE // s["reduction"]) for s in info]
            assert all(torch.isfinite(m).all() for m in maps)
    reductions = [s["reduction"] for s in info]
    assert reductions == sorted(reductions)  # shallow to deep


def test_stage_info_is_a_copy_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    info = stage_info("resnet152")
    info[0]["num_chs"] = -1
    assert torch.equal(torch.rand(3), expected)
    assert stage_info("resnet152")[0]["num_chs"] == 64
    assert [s["reduction"] for s in stage_info("resnet18")] == [2, 4, 8, 16, 32]
    assert [s["reduction"] for s in stage_info("convnet_tiny")] == [2, 4, 8]
    assert [s["num_chs"] for s in stage_info("mobilenetv3_large_100")] == [16, 24, 40, 112, 960]


def _last_bns(model):
    return [b.bn3 if hasattr(b, "bn3") else b.bn2
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_last_bn_of_each_block_starts_at_one_as_torchvision(name):
    bns = _last_bns(_built(name))
    assert len(bns) == {"resnet18": 8, "resnet34": 16, "resnet101": 33, "resnet152": 50}.get(name, 16)
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
    assert all(torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in bns)


def test_timm_default_zeroes_the_last_bn():
    """Why the registry passes zero_init_last=False: timm's default would start every block as the identity."""
    bns = _last_bns(timm.create_model("resnet18", pretrained=False, num_classes=0))
    assert all(torch.equal(bn.weight, torch.zeros_like(bn.weight)) for bn in bns)


def test_timm_resnet_init_is_torchvision_init():
    """The module docstring's claim: with zero_init_last=False (and an fc, whose draws come first) timm's ResNet init
    is torchvision's, draw for draw."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().state_dict()
    torch.manual_seed(0)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=1000, zero_init_last=False).state_dict()
    assert list(tv) == list(tm) and all(torch.equal(tv[k], tm[k]) for k in tv)


def test_resnet50x2_rebuilt_convs_get_resnet_init():
    """The stem and the first block's convs are rebuilt after timm's init_weights; they get its kaiming-normal
    (fan_out, relu) init too, std sqrt(2 / fan_out), not PyTorch's default Conv2d init (std 1/sqrt(3 fan_in))."""
    m = _built("resnet50x2")
    for conv in (m.conv1, m.layer1[0].conv1, m.layer1[0].downsample[0], m.layer1[0].conv2):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        assert conv.weight.mean().abs().item() < 0.1 * math.sqrt(2 / fan_out)


def _old_convnet(widths):
    """The convnets exactly as they were built before ``ConvNet``: a plain nn.Sequential."""
    layers, c_in = [], 3
    for c in widths:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("name,widths", [("convnet_tiny", (16, 32, 64)), ("convnet_small", (64, 128, 256))])
def test_convnet_weights_and_forward_unchanged(name, widths):
    torch.manual_seed(0)
    new = build_backbone(name)
    torch.manual_seed(0)
    old = _old_convnet(widths)
    assert isinstance(new, nn.Sequential) and isinstance(new, ConvNet)
    new_sd, old_sd = new.state_dict(), old.state_dict()
    assert list(new_sd) == list(old_sd)
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in old_sd)
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):
        new.train(train), old.train(train)
        assert torch.equal(new(x), old(x))
    maps = forward_with_maps(new, x)[1]
    assert [tuple(m.shape[1:]) for m in maps] == [(c, 32 >> (i + 1), 32 >> (i + 1)) for i, c in enumerate(widths)]


def test_maps_carry_gradients():
    model = build_backbone("convnet_tiny")
    pooled, maps = forward_with_maps(model, torch.randn(2, 3, 32, 32))
    (pooled.sum() + sum(m.pow(2).mean() for m in maps)).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


# --- the demo convnets in timm's model registry (issue #11): importing pretrain.backbones registers them -----------

@pytest.mark.parametrize("name", sorted(CONVNET_WIDTHS))
def test_convnets_are_timm_models(name):
    """timm.create_model builds the registry's model (same seeded weights, same features) with a 32-px data config;
    nothing to download."""
    assert timm.is_model(name) and name in timm.list_models("convnet*") and name not in timm.list_pretrained()
    torch.manual_seed(0)
    ours = build_backbone(name).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()  # num_classes defaults to 0: pooled features
    assert isinstance(model, ConvNet) and model.num_classes == 0 and model.num_features == BACKBONES[name].feature_dim
    sd, ref = model.state_dict(), ours.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == (0.485, 0.456, 0.406) and data["crop_pct"] == 0.875
    assert BACKBONES[name].timm_arch == name  # written into exports as the timm name that loads them
    with pytest.raises(ValueError, match="no pretrained weights to download"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(TypeError, match="drop_rate"):  # a model argument it does not have is not silently dropped
        timm.create_model(name, drop_rate=0.1)


def test_convnet_classifier_follows_timm():
    """num_classes > 0 adds a Linear ``fc`` on the pooled features (run last by forward; pre_logits skips it);
    reset_classifier replaces or removes it; the features are untouched."""
    torch.manual_seed(0)
    model = timm.create_model("convnet_tiny", num_classes=10).eval()
    assert model.num_classes == 10 and isinstance(model.get_classifier(), nn.Linear)
    assert [k for k in model.state_dict() if k.startswith("fc.")] == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        final, maps = model.forward_intermediates(x)
        feats = model.forward_head(final, pre_logits=True)
        assert torch.equal(forward_with_maps(model, x)[0], feats) and len(maps) == 3
        assert logits.shape == (2, 10) and feats.shape == (2, 64)
        torch.testing.assert_close(logits, model.fc(feats), rtol=0, atol=0)
        assert torch.equal(model.forward_head(final), logits)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        assert not any(k.startswith("fc.") for k in model.state_dict()) and torch.equal(model(x), feats)
    with pytest.raises(ValueError, match="global average"):
        model.reset_classifier(3, global_pool="max")
