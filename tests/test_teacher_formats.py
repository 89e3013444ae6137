"""The teachers of Tables 5-7 in the files their projects publish: DINO's training checkpoints (main_dino.py's
``checkpoint.pth``) and backbone-only releases (ViT-S/16, XCiT-S12/16), and the SwAV repository's SwAV,
DeepCluster-v2 and SeLa-v2 ResNet-50s. Each fixture is written in exactly that file's key layout (random weights of
the right shapes, made without running any initialiser), read by ``read_backbone`` and loaded by ``load_teacher``,
whose embedding must equal a forward written out by hand; plus the strict-loading errors, the refusal of a hostile
pickle shaped like a DINO checkpoint, the GELU head, and the detectron2 conversion of these files."""
import argparse
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.backbones import build_backbone, feature_dim
from pretrain.encoder import build_encoder
from pretrain.formats import read_backbone, xcit_official_to_timm
from pretrain.heads import build_head, infer_head_spec
from pretrain.safeload import UnsafeCheckpointError, load_torch
from pretrain.teacher import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small forwards run faster on one thread here

VIT, XCIT = "vit_small_patch16_224", "xcit_small_12_p16_224"
PROTOTYPES = 512  # DINO's last layer has 65536 outputs and SwAV's prototypes 3000; the count is all that changes


def _random_state(arch: str, seed: int) -> dict:
    """Random weights in ``build_backbone(arch)``'s keys, shapes and dtypes (the model is built on the meta device, so
    no initialiser runs): affine / norm scales near 1, BatchNorm variances positive, the rest small."""
    with torch.device("meta"):
        meta = build_backbone(arch).state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in meta.items():
        if not v.is_floating_point():
            out[k] = torch.full(v.shape, 7, dtype=v.dtype)  # num_batches_tracked
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.ndim == 1 and k.endswith("weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(v.shape, generator=g)
    return out


def _reference(arch: str, state: dict) -> nn.Module:
    """``arch`` holding ``state`` as its own tensors, independently of the readers under test."""
    with torch.device("meta"):
        model = build_backbone(arch)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _mlp(dims, seed: int, bn: bool = False) -> dict:
    """A head's state dict in build_head's layout (Linear [BN] act ... Linear): keys 0, 2, 4 / with BN 0, 1, 3, 4, 6."""
    g = torch.Generator().manual_seed(seed)
    out, i = {}, 0
    for n, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{i}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        out[f"{i}.bias"] = 0.1 * torch.randn(d_out, generator=g)
        i += 1
        if n < len(dims) - 2:
            if bn:
                out.update({f"{i}.weight": 1 + 0.1 * torch.randn(d_out, generator=g),
                            f"{i}.bias": 0.1 * torch.randn(d_out, generator=g),
                            f"{i}.running_mean": 0.1 * torch.randn(d_out, generator=g),
                            f"{i}.running_var": torch.rand(d_out, generator=g) + 0.5,
                            f"{i}.num_batches_tracked": torch.tensor(7)})
                i += 1
            i += 1  # the activation
    return out


def _head_forward(head: dict, x: torch.Tensor, act) -> torch.Tensor:
    """The head written out: each Linear, then (but after the last) BatchNorm in eval mode if present, then ``act``."""
    linear = sorted(int(k.split(".")[0]) for k, v in head.items() if k.endswith("weight") and v.ndim == 2)
    for j, i in enumerate(linear):
        x = F.linear(x, head[f"{i}.weight"], head[f"{i}.bias"])
        if j < len(linear) - 1:
            if f"{i + 1}.running_mean" in head:
                x = F.batch_norm(x, head[f"{i + 1}.running_mean"], head[f"{i + 1}.running_var"],
                                 head[f"{i + 1}.weight"], head[f"{i + 1}.bias"], training=False, eps=1e-5)
            x = act(x)
    return x


def _images(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def _assert_embedding(teacher, expected):
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(_images()), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# DINO


def _dino_args(arch: str, patch_size: int = 16, use_bn: bool = False) -> argparse.Namespace:
    """main_dino.py's parsed arguments (a few of them, with their types: what a checkpoint's ``args`` holds)."""
    return argparse.Namespace(arch=arch, patch_size=patch_size, out_dim=PROTOTYPES, norm_last_layer=True,
                              use_bn_in_head=use_bn, momentum_teacher=0.996, use_fp16=True, weight_decay=0.04,
                              lr=0.0005, epochs=100, local_crops_number=8, global_crops_scale=(0.4, 1.0),
                              local_crops_scale=(0.05, 0.4), data_path="/path/to/imagenet/train",
                              output_dir="/path/to/saving_dir", saveckp_freq=20, seed=0, num_workers=10,
                              dist_url="env://", gpu=0, rank=0, world_size=8)


def _dino_network(backbone: dict, mlp: dict, prefix: str, seed: int) -> dict:
    """utils.MultiCropWrapper(backbone, DINOHead).state_dict() behind ``prefix`` (DDP's "module." or "")."""
    g = torch.Generator().manual_seed(seed)
    bottleneck = mlp[f"{max(int(k.split('.')[0]) for k in mlp)}.weight"].shape[0]
    mlp_keys = {("mlp." + k[2:] if len(mlp) == 2 else "mlp." + k): v for k, v in mlp.items()}  # nlayers 1: one Linear
    return {**{f"{prefix}backbone.{k}": v for k, v in backbone.items()},
            **{f"{prefix}head.{k}": v for k, v in mlp_keys.items()},
            f"{prefix}head.last_layer.weight_g": torch.ones(PROTOTYPES, 1),
            f"{prefix}head.last_layer.weight_v": torch.randn(PROTOTYPES, bottleneck, generator=g)}


def _dino_checkpoint(teacher_backbone, teacher_mlp, student_backbone, student_mlp, args, teacher_prefix=""):
    """main_dino.py's ``save_dict``. The teacher is DDP-wrapped ("module.") only when the backbone has BatchNorm."""
    return {"student": _dino_network(student_backbone, student_mlp, "module.", 1),
            "teacher": _dino_network(teacher_backbone, teacher_mlp, teacher_prefix, 2),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04, "params": [0, 1]},
                                                        {"lr": 0.0, "weight_decay": 0.0, "params": [2]}]},
            "epoch": 100, "args": args, "dino_loss": {"center": torch.randn(1, PROTOTYPES)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 11}}


@pytest.fixture(scope="module")
def vit_state():
    return _random_state(VIT, 0)


def test_dino_training_checkpoint_vit_small(tmp_path, vit_state):
    """The teacher (not the student) of a ViT-S/16 checkpoint.pth, with its GELU head 384 -> 2048 -> 2048 -> 256;
    the last layer, the student, optimizer, centre and scaler reported as skipped; DINO's args give the arch."""
    mlp = _mlp([384, 2048, 2048, 256], 1)
    # the student differs from the teacher in its class token and head (the rest shares storage: a small file)
    student = dict(vit_state, cls_token=vit_state["cls_token"] + 1)
    path = str(tmp_path / "checkpoint.pth")
    torch.save(_dino_checkpoint(vit_state, mlp, student, _mlp([384, 2048, 2048, 256], 9), _dino_args("vit_small")),
               path)
    assert isinstance(load_torch(path)["args"], argparse.Namespace)  # allowed by pretrain.safeload

    ck = read_backbone(path)  # the architecture from DINO's args (vit_small, patch 16)
    assert (ck.format, ck.arch, ck.head_act, ck.metadata["network"]) == ("dino", VIT, "gelu", "teacher")
    assert ck.metadata["epoch"] == 100 and ck.metadata["args"]["arch"] == "vit_small"
    assert set(ck.state_dict) == set(vit_state) and torch.equal(ck.state_dict["cls_token"], vit_state["cls_token"])
    assert set(ck.head) == set(mlp) and all(torch.equal(ck.head[k], mlp[k]) for k in mlp)
    assert ck.head_sources["2.weight"] == "teacher.head.mlp.2.weight"
    for key, why in (("student.module.backbone.cls_token", "EMA teacher"), ("optimizer", "optimizer"),
                     ("dino_loss.center", "centre"), ("fp16_scaler", "loss-scaler"),
                     ("teacher.head.last_layer.weight_g", "last layer"),
                     ("teacher.head.last_layer.weight_v", "last layer")):
        assert why in ck.skipped[key], (key, ck.skipped.get(key))
    assert sum(k.startswith("student.") for k in ck.skipped) == len(student) + len(mlp) + 2

    other = read_backbone(path, dino_network="student")
    assert torch.equal(other.state_dict["cls_token"], student["cls_token"]) and "teacher.head.mlp.0.weight" in \
        other.skipped
    with pytest.raises(ValueError, match="dino_network 'ema'.*teacher, student"):
        read_backbone(path, dino_network="ema")

    teacher, info = load_teacher(path, VIT)
    assert info["format"] == "dino" and info["head_act"] == "gelu" and info["embedding"] == "projection head"
    assert info["head"] == dict(in_dim=384, hidden_dim=2048, out_dim=256, num_layers=3, bn=False, act="gelu")
    assert [type(m) for m in teacher.head] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert "teacher.head.last_layer.weight_v" in info["ignored_keys"] and "optimizer" in info["ignored_keys"]
    assert not any(k.startswith("teacher.head.mlp.") for k in info["ignored_keys"])
    assert teacher.out_dim == 256
    with torch.no_grad():
        expected = F.normalize(_head_forward(mlp, _reference(VIT, vit_state)(_images()), F.gelu), dim=1)
    _assert_embedding(teacher, expected)

    # the evaluators read the same file (its teacher backbone)
    from transfer.common import load_backbone

    backbone, info = load_backbone(path)
    assert info["arch"] == VIT and info["format"] == "dino" and "dino_loss.center" in info["skipped"]
    with torch.no_grad():
        torch.testing.assert_close(backbone(_images()), _reference(VIT, vit_state)(_images()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers, bn", [(3, True), (1, False)])
def test_dino_checkpoint_bn_head_one_layer_head_and_ddp_teacher(tmp_path, layers, bn):
    """DINO on a ResNet (BatchNorm: the teacher is DDP-wrapped too, "module.backbone.*"): with --use_bn_in_head the
    MLP is Linear, BN, GELU, Linear, BN, GELU, Linear (keys 0, 1, 3, 4, 6: build_head(bn=True, act="gelu")); with
    nlayers 1 it is one Linear, ``head.mlp.weight``."""
    state = _random_state("resnet18", 3)
    mlp = _mlp([512, 256, 256, 64] if layers == 3 else [512, 64], 4, bn=bn)
    args = _dino_args("resnet18", use_bn=bn)
    path = str(tmp_path / "checkpoint.pth")
    torch.save(_dino_checkpoint(state, mlp, state, mlp, args, teacher_prefix="module."), path)
    ck = read_backbone(path)
    assert ck.arch == "resnet18" and set(ck.head) == set(mlp)
    if layers == 1:
        assert ck.head_sources == {"0.weight": "teacher.module.head.mlp.weight",
                                   "0.bias": "teacher.module.head.mlp.bias"}
    teacher, info = load_teacher(path, "resnet18")
    assert info["head"]["bn"] == bn and info["head"]["num_layers"] == layers and info["head"]["act"] == "gelu"
    if bn:
        assert [type(m) for m in teacher.head] == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 2 + [nn.Linear]
    with torch.no_grad():
        expected = F.normalize(_head_forward(mlp, _reference("resnet18", state)(_images()), F.gelu), dim=1)
    _assert_embedding(teacher, expected)


def test_dino_checkpoint_strict_errors(tmp_path):
    """A missing and an unexpected backbone key are both named; so is a key outside backbone / head, and a missing
    head key."""
    state = _random_state("resnet18", 3)
    mlp = _mlp([512, 128, 128, 64], 4)
    args = _dino_args("resnet18")
    bad = _dino_checkpoint(state, mlp, state, mlp, args, teacher_prefix="module.")
    del bad["teacher"]["module.backbone.layer4.1.bn2.weight"]
    bad["teacher"]["module.backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"missing keys \(1\).*layer4\.1\.bn2\.weight.*unexpected keys \(1\).*layer5"):
        load_teacher(str(tmp_path / "bad.pth"), "resnet18")

    outside = _dino_checkpoint(state, mlp, state, mlp, args)
    outside["teacher"]["queue"] = torch.zeros(4, 4)
    torch.save(outside, tmp_path / "outside.pth")
    with pytest.raises(ValueError, match=r"outside 'backbone.\*'.*\['queue'\]"):
        read_backbone(str(tmp_path / "outside.pth"))

    no_bias = _dino_checkpoint(state, mlp, state, mlp, args)
    del no_bias["teacher"]["head.mlp.2.bias"]
    torch.save(no_bias, tmp_path / "no_bias.pth")
    with pytest.raises(KeyError, match=r"incomplete: missing \['2.bias'\]"):
        load_teacher(str(tmp_path / "no_bias.pth"), "resnet18")


class _RunsCode:
    """What a hostile checkpoint carries: unpickling it calls ``exec`` (here: writing a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("where", ["args", "inside args"])
def test_hostile_pickle_shaped_like_a_dino_checkpoint_is_refused(tmp_path, where):
    state = _random_state("resnet18", 3)
    mlp = _mlp([512, 128, 64], 4)
    marker = str(tmp_path / "ran.txt")
    args = _RunsCode(marker) if where == "args" else argparse.Namespace(arch="resnet18", lr=_RunsCode(marker))
    torch.save(_dino_checkpoint(state, mlp, state, mlp, args), tmp_path / "checkpoint.pth")
    with pytest.raises(UnsafeCheckpointError, match="exec") as e:
        load_teacher(str(tmp_path / "checkpoint.pth"), "resnet18")
    assert e.value.global_name.endswith("exec") and not os.path.exists(marker)  # refused before it ran


def test_dino_vit_backbone_release_has_timm_keys_and_no_head(tmp_path, vit_state):
    """dino_deitsmall16_pretrain.pth is DINO's ViT-S/16 with num_classes=0: exactly timm's keys. It has no projection
    head: load_teacher refuses it unless head_required=False, which distils the L2-normalised class token."""
    with torch.device("meta"):
        timm_keys = {k: tuple(v.shape) for k, v in timm.create_model(VIT, num_classes=0).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in vit_state.items()} == timm_keys
    path = str(tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save(vit_state, path)
    ck = read_backbone(path)
    assert (ck.format, ck.arch, ck.head, ck.skipped) == ("state_dict", VIT, {}, {})
    with pytest.raises(ValueError, match="no projection head.*head_required=False.*384-d"):
        load_teacher(path, VIT)
    teacher, info = load_teacher(path, VIT, head_required=False)
    assert isinstance(teacher.head, nn.Identity) and teacher.out_dim == feature_dim(VIT) == 384
    assert info["head"] is None and info["embedding"] == "backbone feature" and info["ignored_keys"] == []
    ref = _reference(VIT, vit_state)
    with torch.no_grad():
        cls = ref.forward_features(_images())[:, 0]  # the class token after the final norm
        torch.testing.assert_close(ref(_images()), cls, rtol=0, atol=0)
    _assert_embedding(teacher, F.normalize(cls, dim=1))

    # detection takes ResNet / CNN backbones: the converter says why a ViT is refused
    from transfer.convert import convert_checkpoint
    from transfer.d2.weights import UnsupportedArchError, convert_to_d2

    with pytest.raises(ValueError, match="vision transformer.*take ResNet backbones"):
        convert_checkpoint(path)
    with pytest.raises(UnsupportedArchError, match=f"architecture '{VIT}' has no detectron2 backbone.*resnet50"):
        convert_to_d2(path, str(tmp_path / "vit.pkl"))
    assert not os.path.exists(tmp_path / "vit.pkl")


def _xcit_repo_layout(timm_state: dict) -> dict:
    """timm's XCiT keys -> the xcit repository's (what DINO saved): ``pos_embed.`` -> ``pos_embeder.``, and the
    class-attention q / k / v fused back into one ``qkv`` (rows q, then k, then v)."""
    out = {}
    for k, v in timm_state.items():
        if ".attn.q." in k and k.startswith("cls_attn_blocks."):
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(
                [v, timm_state[k.replace(".q.", ".k.")], timm_state[k.replace(".q.", ".v.")]])
        elif k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        else:
            out[k.replace("pos_embed.", "pos_embeder.", 1) if k.startswith("pos_embed.") else k] = v
    return out


def test_dino_xcit_release_maps_xcit_repo_names_to_timm(tmp_path):
    """dino_xcit_small_12_p16_pretrain.pth holds the xcit repository's names: mapped to timm's as timm's own
    checkpoint_filter_fn maps them, also inside a DINO training checkpoint."""
    from timm.models.xcit import checkpoint_filter_fn

    state = _random_state(XCIT, 6)
    official = _xcit_repo_layout(state)
    assert "pos_embeder.token_projection.weight" in official and "cls_attn_blocks.1.attn.qkv.weight" in official
    assert official["cls_attn_blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    mapped, renamed = xcit_official_to_timm(official)
    with torch.device("meta"):
        timm_model = timm.create_model(XCIT, num_classes=0)
    by_timm = checkpoint_filter_fn(dict(official), timm_model)
    assert set(mapped) == set(by_timm) == set(state) and all(torch.equal(mapped[k], by_timm[k]) for k in state)
    assert renamed["pos_embeder.token_projection.bias"] == "pos_embed.token_projection.bias"
    unchanged, none = xcit_official_to_timm(state)  # timm's names stay as they are
    assert unchanged is state and none == {}

    path = str(tmp_path / "dino_xcit_small_12_p16_pretrain.pth")
    torch.save(official, path)
    ck = read_backbone(path)
    assert ck.format == "state_dict" and ck.arch == XCIT and len(ck.metadata["renamed_keys"]) == 6
    assert all(torch.equal(ck.state_dict[k], state[k]) for k in state) and set(ck.state_dict) == set(state)
    teacher, info = load_teacher(path, XCIT, head_required=False)
    assert teacher.out_dim == 384 and info["embedding"] == "backbone feature"
    with torch.no_grad():
        expected = F.normalize(_reference(XCIT, state)(_images()), dim=1)
    _assert_embedding(teacher, expected)

    # the same names inside a training checkpoint (student and teacher share storage: the file stays small)
    mlp = _mlp([384, 2048, 2048, 256], 7)
    torch.save(_dino_checkpoint(official, mlp, official, mlp, _dino_args("xcit_small_12_p16")),
               tmp_path / "checkpoint.pth")
    ck = read_backbone(str(tmp_path / "checkpoint.pth"))
    assert (ck.format, ck.arch, ck.head_act) == ("dino", XCIT, "gelu") and set(ck.state_dict) == set(state)


# ---------------------------------------------------------------------------------------------------------------
# The SwAV repository: SwAV, DeepCluster-v2, SeLa-v2 (Table 7's ResNet-50 teachers)


@pytest.fixture(scope="module")
def r50_state():
    return _random_state("resnet50", 8)


def _swav_repo_file(backbone: dict, head: dict, prototypes) -> dict:
    """The released ``*_pretrain.pth.tar``: the DDP model's bare state dict, ``module.`` + torchvision ResNet keys,
    ``projection_head.{0,1,3}`` and one prototype layer (``prototypes.weight``) or src/resnet50.py's MultiPrototypes
    (``prototypes.prototypes<i>.weight``)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"module.{k}": v for k, v in backbone.items()}
    sd.update({f"module.projection_head.{k}": v for k, v in head.items()})
    if len(prototypes) == 1:
        sd["module.prototypes.weight"] = torch.randn(prototypes[0], 128, generator=g)
    else:
        sd.update({f"module.prototypes.prototypes{i}.weight": torch.randn(k, 128, generator=g)
                   for i, k in enumerate(prototypes)})
    return sd


# SeLa-v2 has no training script in the repository: its release is read as the same model (hubconf / the
# third-party loaders strip "module.", "projection_head." and "prototypes."); SwAV's appendix trains it with several
# clustering heads, hence MultiPrototypes here. Any number of heads (or one layer) reads the same way.
SWAV_REPO = {"swav_800ep_pretrain.pth.tar": ("swav", [PROTOTYPES]),
             "deepclusterv2_800ep_pretrain.pth.tar": ("swav-multi-prototypes", [PROTOTYPES] * 3),
             "selav2_400ep_pretrain.pth.tar": ("swav-multi-prototypes", [PROTOTYPES] * 3)}


@pytest.mark.parametrize("name", sorted(SWAV_REPO))
def test_swav_repository_releases_give_the_bn_head_of_table7(tmp_path, r50_state, name):
    fmt, prototypes = SWAV_REPO[name]
    head = _mlp([2048, 2048, 128], 2, bn=True)
    assert set(head) - {"1.num_batches_tracked"} == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                                     "1.running_var", "3.weight", "3.bias"}
    path = str(tmp_path / name)
    torch.save(_swav_repo_file(r50_state, head, prototypes), path)
    ck = read_backbone(path)
    assert (ck.format, ck.arch, ck.metadata["prototype_heads"]) == (fmt, "resnet50", len(prototypes))
    teacher, info = load_teacher(path, "resnet50")
    assert info["head"] == dict(in_dim=2048, hidden_dim=2048, out_dim=128, num_layers=2, bn=True, act="relu")
    assert [type(m) for m in teacher.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    protos = sorted(k for k in info["ignored_keys"])
    assert protos == (["module.prototypes.weight"] if len(prototypes) == 1 else
                      [f"module.prototypes.prototypes{i}.weight" for i in range(3)])
    if len(prototypes) > 1:
        assert "one of 3 clustering heads" in ck.skipped[protos[0]]
    with torch.no_grad():
        expected = F.normalize(_head_forward(head, _reference("resnet50", r50_state)(_images()), F.relu), dim=1)
    _assert_embedding(teacher, expected)


def test_swav_repository_resnet50_converts_to_detectron2(tmp_path, r50_state):
    """tools/convert_to_d2.py reads the same file: every backbone and res5 weight loads into the R-50 C4 detector."""
    from transfer.d2.weights import convert_to_d2

    path = str(tmp_path / "deepclusterv2_800ep_pretrain.pth.tar")
    torch.save(_swav_repo_file(r50_state, _mlp([2048, 2048, 128], 2, bn=True), [PROTOTYPES] * 3), path)
    out = str(tmp_path / "deepclusterv2_r50.pkl")
    report, conv, _ = convert_to_d2(path, out)
    assert report.ok and os.path.isfile(out)
    assert conv.format == "swav-multi-prototypes" and conv.arch == "resnet50" and len(conv.model) == len(r50_state)
    assert torch.equal(conv.model["roi_heads.res5.2.conv3.norm.running_var"], r50_state["layer4.2.bn3.running_var"])
    assert "module.prototypes.prototypes2.weight" in conv.skipped and "module.projection_head.3.weight" in conv.skipped


def test_dino_resnet50_training_checkpoint_converts(tmp_path, r50_state):
    """A DINO ResNet-50's checkpoint.pth converts through its teacher (the weights DINO releases)."""
    from transfer.convert import convert_checkpoint

    mlp = _mlp([2048, 256, 256, 64], 4)
    student = dict(r50_state, **{"conv1.weight": r50_state["conv1.weight"] + 1})
    torch.save(_dino_checkpoint(r50_state, mlp, student, mlp, _dino_args("resnet50"), teacher_prefix="module."),
               tmp_path / "checkpoint.pth")
    conv = convert_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert conv.format == "dino" and conv.arch == "resnet50"
    assert torch.equal(conv.model["backbone.stem.conv1.weight"], r50_state["conv1.weight"])


# ---------------------------------------------------------------------------------------------------------------
# The GELU head


def test_gelu_head_layout_and_relu_default_unchanged():
    torch.manual_seed(0)
    gelu = build_head(384, 2048, 256, num_layers=3, act="gelu")
    assert [type(m) for m in gelu] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert gelu[1].approximate == "none"  # DINO's nn.GELU(): the exact erf form
    assert sorted(gelu.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert set(build_head(384, 64, 32, num_layers=3, bn=True, act="gelu").state_dict()) == set(
        _mlp([384, 64, 64, 32], 0, bn=True))  # DINO's use_bn_in_head layout: 0, 1, 3, 4, 6
    torch.manual_seed(0)
    default = build_head(512, 64, 16)
    torch.manual_seed(0)
    relu = build_head(512, 64, 16, act="relu")
    assert [type(m) for m in default] == [nn.Linear, nn.ReLU, nn.Linear] and default[1].inplace
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), relu.state_dict().values()))
    with pytest.raises(ValueError, match="'tanh'.*relu, gelu"):
        build_head(512, 64, 16, act="tanh")
    with pytest.raises(ValueError, match="relu, gelu"):
        infer_head_spec(default.state_dict(), act="silu")
    enc = build_encoder("convnet_tiny", 32, 16, act="gelu")
    assert isinstance(enc.head[1], nn.GELU) and enc.out_dim == 16
    assert infer_head_spec(enc.head.state_dict(), "gelu")["act"] == "gelu"
