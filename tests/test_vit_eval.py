"""Transformer students in the evaluators: ViT-Tiny and XCiT-Tiny exports load in plain timm, DINO's linear features
(the normed class tokens of a ViT's last blocks) against a by-hand forward of the timm model, clear errors where an
architecture has no such features, and both students through the linear, kNN and t-SNE evaluators on 32-px data."""
import argparse
import json
import os

import pytest
import timm
import torch
from torchvision import transforms as T

from pretrain.encoder import build_encoder
from pretrain.export import export_encoder
from transfer.common import (POOLED, LastBlocksFeatures, build_feature_extractor, end_run, feature_dim_of,
                             load_backbone, train_transform)
from transfer.config import setup_eval_cfg
from transfer.knn import run as run_knn
from transfer.linear import LinearEvaluator, run_linear_probe
from transfer.tsne import run_tsne

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT, XCIT = "vit_tiny_patch16_224", "xcit_tiny_12_p16_224"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """arch -> our export of a randomly initialised student (backbone + a small MoCo head), as a pretraining run
    writes it."""
    out = tmp_path_factory.mktemp("vit_exports")
    paths = {}
    for seed, arch in enumerate((VIT, XCIT)):
        torch.manual_seed(seed)
        paths[arch] = export_encoder(build_encoder(arch, 64, 32), arch, str(out), arch, {"method": "disco"})["backbone"]
    return paths


def _mode(n, avgpool=False):
    return {"n_last_blocks": n, "avgpool_patch_tokens": avgpool}


def _eval_opts(out, data, weights, **over):
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": weights, "DATA.TRAIN_DIR": data / "train",
            "DATA.VAL_DIR": data / "val", "DATA.IMAGE_SIZE": 32, "DATA.VAL_RESIZE": 36, "DATA.NUM_WORKERS": 0,
            "SOLVER.EPOCHS": 2, "SOLVER.IMS_PER_BATCH": 16, "TEST.IMS_PER_BATCH": 32}
    opts.update(over)
    return [str(x) for kv in opts.items() for x in kv]


# ----------------------------------------------------------------------------------------------------------------
# Exports and features


@pytest.mark.parametrize("arch", [VIT, XCIT])
def test_export_loads_in_plain_timm_with_our_features(exports, arch):
    """``timm.create_model(arch, num_classes=0, checkpoint_path=export)`` loads strictly (timm's own model, not our
    registry's dynamic-size ViT) and gives bitwise our loader's features at timm's native 224 px."""
    ours, info = load_backbone(exports[arch])
    assert info["arch"] == arch and info["format"] == "export" and info["method"] == "disco"
    model = timm.create_model(arch, num_classes=0, checkpoint_path=exports[arch]).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), rtol=0, atol=0)


def test_dino_features_are_the_normed_cls_tokens_of_the_last_blocks(exports):
    """By hand with the timm model loaded from the export: patch + position embedding, block by block, the final
    norm on each of the last 4 outputs, their class tokens concatenated oldest first (+ the mean patch token of the
    last one). n = 1 without the mean is the pooled output (timm's ViT pools the normed class token)."""
    backbone, _ = load_backbone(exports[VIT])
    ref = timm.create_model(VIT, num_classes=0, checkpoint_path=exports[VIT], dynamic_img_size=True).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))  # 3 x (1 + 2 x 2) x 192: CLS first
        normed = []
        for blk in ref.blocks:
            tokens = blk(tokens)
            normed.append(ref.norm(tokens))
        want = torch.cat([t[:, 0] for t in normed[-4:]], dim=1)
        want_avg = torch.cat([want, normed[-1][:, 1:].mean(dim=1)], dim=1)

        for mode, expected in ((_mode(4), want), (_mode(4, True), want_avg)):
            extractor, dim = build_feature_extractor(backbone, VIT, mode)
            assert isinstance(extractor, LastBlocksFeatures) and dim == expected.shape[1] == feature_dim_of(VIT, mode)
            assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
            torch.testing.assert_close(extractor(x), expected, rtol=1e-6, atol=1e-6)
        assert (dim, feature_dim_of(VIT, _mode(4))) == (5 * 192, 4 * 192)
        one, _ = build_feature_extractor(backbone, VIT, _mode(1))
        assert torch.equal(one(x), backbone(x))
    pooled, dim = build_feature_extractor(backbone, VIT, POOLED)
    assert pooled is backbone and dim == 192 == feature_dim_of(XCIT)


def test_architectures_without_cls_blocks_are_clear_errors(exports):
    with pytest.raises(ValueError, match=r"resnet18 is not a Vision Transformer with a class token.*"
                                         r"MODEL.FEATURES.N_LAST_BLOCKS 0"):
        feature_dim_of("resnet18", _mode(4))
    convnet, _ = load_backbone("random", "convnet_tiny")
    with pytest.raises(ValueError, match=r"convnet_tiny is not a Vision Transformer"):
        build_feature_extractor(convnet, "convnet_tiny", _mode(1))
    xcit, _ = load_backbone(exports[XCIT])
    with pytest.raises(ValueError, match=r"XCiT's 12 XCA blocks carry no class token.*linear_dino_xcit.yaml"):
        build_feature_extractor(xcit, XCIT, _mode(4))
    with pytest.raises(ValueError, match=r"asks for the last 13 blocks, but vit_tiny_patch16_224 has 12"):
        feature_dim_of(VIT, _mode(13))
    with pytest.raises(ValueError, match=r"MODEL.FEATURES.AVGPOOL_PATCH_TOKENS True needs .*N_LAST_BLOCKS >= 1"):
        setup_eval_cfg("", ["MODEL.FEATURES.AVGPOOL_PATCH_TOKENS", "True"])
    with pytest.raises(ValueError, match=r"MODEL.FEATURES.N_LAST_BLOCKS -1 is out of range"):
        setup_eval_cfg("", ["MODEL.FEATURES.N_LAST_BLOCKS", "-1"])


def test_dino_config_crops_bilinear_and_evaluates_bicubic():
    cfg = setup_eval_cfg(os.path.join(ROOT, "configs/eval/linear_dino_vit.yaml"))
    assert (cfg.MODEL.FEATURES.N_LAST_BLOCKS, cfg.MODEL.FEATURES.AVGPOOL_PATCH_TOKENS) == (4, False)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.SCHEDULER) == (0.001 * 1024 / 256, 1024, "cosine")
    crop = train_transform(cfg).transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert cfg.DATA.INTERPOLATION == "bicubic" and cfg.DATA.VAL_RESIZE == 256
    xcit = setup_eval_cfg(os.path.join(ROOT, "configs/eval/linear_dino_xcit.yaml"))
    assert xcit.MODEL.FEATURES.N_LAST_BLOCKS == 0 and xcit.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR


# ----------------------------------------------------------------------------------------------------------------
# The evaluators


def test_vit_linear_dino_protocol_resumes_only_in_its_feature_mode(tmp_path, imagefolder, exports):
    """linear_dino_vit.yaml on a ViT student: a 4 x 192 + 192 = 960-d classifier, evaluated every epoch; the cached
    path too. A finished run asked again under another MODEL.FEATURES is refused, never evaluated on other features."""
    out = tmp_path / "vit"
    cfg = setup_eval_cfg(os.path.join(ROOT, "configs/eval/linear_dino_vit.yaml"), _eval_opts(
        out, imagefolder, exports[VIT], **{"SOLVER.BASE_LR": 0.01, "MODEL.FEATURES.AVGPOOL_PATCH_TOKENS": True}))
    res = run_linear_probe(cfg)
    assert res["arch"] == VIT and res["feature_dim"] == 960 and res["epochs"] == 2
    assert res["features"] == _mode(4, True) and 0 <= res["top1"] <= res["top5"] == 100
    ckpt = torch.load(out / "checkpoints/model_0000002.pth", weights_only=False)
    assert ckpt["classifier"]["weight"].shape == (4, 960) and ckpt["features"] == _mode(4, True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_top1" in lines[0]  # DINO's val_freq 1 (the last epoch's is results.json)

    with pytest.raises(ValueError, match=r"is a classifier on the CLS of the last 4 blocks \(normed\) \+ mean patch "
                                         r"token of the last of vit_tiny.*use another OUTPUT_DIR"):
        LinearEvaluator(setup_eval_cfg(os.path.join(ROOT, "configs/eval/linear_dino_vit.yaml"), _eval_opts(
            out, imagefolder, exports[VIT], **{"SOLVER.BASE_LR": 0.01}))).run()

    cached = run_linear_probe(setup_eval_cfg("", _eval_opts(
        tmp_path / "cached", imagefolder, exports[VIT], **{"MODEL.FEATURES.N_LAST_BLOCKS": 2,
                                                           "DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True,
                                                           "SOLVER.BASE_LR": 0.01})))
    assert cached["feature_dim"] == 384 and cached["cached_features"] and cached["features"] == _mode(2)


def test_xcit_linear_dino_protocol_with_a_vit_kd_teacher(tmp_path, imagefolder, exports):
    """XCiT on its own output (linear_dino_xcit.yaml); then XCiT distilled from a ViT teacher whose classifier was
    trained on DINO's block features: the teacher is rebuilt with the features its checkpoint records."""
    res = run_linear_probe(setup_eval_cfg(os.path.join(ROOT, "configs/eval/linear_dino_xcit.yaml"), _eval_opts(
        tmp_path / "xcit", imagefolder, exports[XCIT], **{"SOLVER.BASE_LR": 0.01})))
    assert res["arch"] == XCIT and res["feature_dim"] == 192 and res["features"] == POOLED
    assert res["epochs"] == 2 and res["val_images"] == 16 and 0 <= res["top1"] <= res["top5"] == 100

    cached = {"DATA.TRAIN_AUGMENT": False, "SOLVER.CACHE_FEATURES": True, "SOLVER.BASE_LR": 0.01}
    run_linear_probe(setup_eval_cfg("", _eval_opts(tmp_path / "vit", imagefolder, exports[VIT], **cached,
                                                   **{"MODEL.FEATURES.N_LAST_BLOCKS": 3, "SOLVER.EPOCHS": 1})))
    student = LinearEvaluator(setup_eval_cfg("", _eval_opts(tmp_path / "kd", imagefolder, exports[XCIT], **cached,
                                                            **{"KD.TEACHER_CLASSIFIER": tmp_path / "vit"})))
    res = student.run()
    assert res["kd"]["teacher_arch"] == VIT and res["features"] == POOLED and res["feature_dim"] == 192
    teacher = student.teacher
    assert isinstance(teacher.backbone, LastBlocksFeatures) and teacher.backbone.n_last_blocks == 3
    assert teacher.fc.weight.shape == (4, 3 * 192)

    wrong = setup_eval_cfg("", _eval_opts(tmp_path / "wrong", imagefolder, exports[XCIT], **cached, **{
        "KD.TEACHER_CLASSIFIER": tmp_path / "vit", "KD.TEACHER_ARCH": XCIT, "KD.TEACHER_WEIGHTS": exports[XCIT]}))
    with pytest.raises(ValueError, match=r"was trained on the CLS of the last 3 blocks \(normed\) of vit_tiny_patch16"
                                         r"_224 .* which the teacher architecture xcit_tiny_12_p16_224 cannot give; "
                                         r"clear KD.TEACHER_ARCH"):
        try:
            LinearEvaluator(wrong).setup()
        finally:
            end_run(wrong)


@pytest.mark.parametrize("arch, n_last_blocks, dim", [(VIT, 4, 768), (XCIT, 0, 192)])
def test_knn_runs_transformer_students(tmp_path, imagefolder, exports, arch, n_last_blocks, dim, capsys):
    out = tmp_path / "knn"
    args = argparse.Namespace(config_file=os.path.join(ROOT, "configs/eval/knn_imagenet.yaml"), eval_only=False,
                              resume=False, opts=_eval_opts(out, imagefolder, exports[arch], **{
                                  "KNN.K": 5, "MODEL.FEATURES.N_LAST_BLOCKS": n_last_blocks}))
    res = run_knn(args)
    assert res["arch"] == arch and res["feature_dim"] == dim and res["features"] == _mode(n_last_blocks)
    assert res["train_images"] == 64 and res["val_images"] == 16 and 0 <= res["top1"] <= res["top5"] <= 100
    assert json.loads((out / "results.json").read_text()) == res
    assert f"knn {arch} shapes: top-1 {res['top1']:.2f}" in capsys.readouterr().out


def test_tsne_draws_transformer_students(tmp_path, imagefolder, exports):
    cfg = setup_eval_cfg(os.path.join(ROOT, "configs/eval/tsne_imagenet.yaml"), _eval_opts(
        tmp_path / "tsne", imagefolder, exports[VIT], **{"TSNE.NUM_CLASSES": 3, "TSNE.PER_CLASS": 4,
                                                         "TSNE.COMPARE_WEIGHTS": f"['{exports[XCIT]}']"}))
    res = run_tsne(cfg)
    assert [m["arch"] for m in res["models"]] == [VIT, XCIT] and res["images"] == 12
    assert all(m["features"] == POOLED for m in res["models"]) and os.path.getsize(res["png"]) > 10_000
