"""Every detection config merges strictly and builds; the detectron2 extensions have the structure they claim."""
import glob
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import transfer.d2  # noqa: E402,F401  (registers the ROI heads and backbones)
from pretrain.cfgnode import DuplicateKeyError  # noqa: E402
from transfer.d2.config import get_cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs/detection")
CONFIGS = sorted(os.path.relpath(p, CONFIG_DIR) for p in glob.glob(f"{CONFIG_DIR}/**/*.yaml", recursive=True))


def _cfg(name: str, *opts: str):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_configs_found():
    names = set(CONFIGS)
    for short in ("r18", "r34", "r50", "effb0", "effb1", "mobv3l"):
        assert {f"voc/{short}_C4_24k.yaml", f"voc/{short}_C4_48k_bs32.yaml", f"coco/{short}_mask_C4_1x.yaml",
                f"coco/{short}_mask_C4_2x.yaml"} <= names
    assert {"quick_schedules/voc_r18_C4_instant_test.yaml", "quick_schedules/coco_r18_mask_C4_instant_test.yaml",
            "quick_schedules/voc_effb0_C4_instant_test.yaml"} <= names


@pytest.mark.parametrize("name", CONFIGS)
def test_config_merges_and_builds(name):
    cfg = _cfg(name)
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.120, 57.375]
    assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    if os.path.basename(name).startswith("Base-"):
        return  # bases merge (strictly); the leaves built from them are built below
    assert cfg.MODEL.WEIGHTS == ""  # filled with the converted .pkl on the command line
    model = build_model(cfg)
    if "instant_test" in name:
        assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION <= 7 and cfg.SOLVER.MAX_ITER <= 50
        assert cfg.DATASETS.TRAIN[0].startswith("shapes_") and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 4
    if "timm" in cfg.MODEL.BACKBONE.NAME:
        assert cfg.MODEL.TIMM.ARCH
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm":
        res5 = model.roi_heads.res5
        depth = cfg.MODEL.RESNETS.DEPTH
        blocks = [m for n, m in res5.named_children() if n != "norm"]
        assert len(blocks) == {18: 2, 34: 3, 50: 3}[depth]
        assert all(type(b).__name__ == ("BasicBlock" if depth < 50 else "BottleneckBlock") for b in blocks)
        out = 512 if depth < 50 else 2048
        assert model.roi_heads.box_predictor.cls_score.in_features == out
        assert res5.norm.num_features == out and blocks[0].stride == 2


@pytest.mark.parametrize("name", ["quick_schedules/coco_r18_mask_C4_instant_test.yaml",
                                  "quick_schedules/coco_mobv3l_mask_C4_instant_test.yaml"])
def test_instant_model_trains_one_step(name):
    """One training forward of Mask R-CNN C4 at the instant-test sizes: the 7x7 pooler and the stride-2 ROI stage
    give 4x4 region features, 8x8 masks; all losses finite and all parameters trainable."""
    torch.manual_seed(0)
    model = build_model(_cfg(name)).train()
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    inst = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]])),
                     gt_classes=torch.tensor([1, 3]))
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 12:50, 10:40] = True
    masks[1, 5:30, 50:90] = True
    inst.gt_masks = BitMasks(masks)
    with EventStorage():
        losses = model([{"image": image, "instances": inst, "height": 64, "width": 96}])
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if not p.requires_grad or p.grad is None]
    assert not no_grad  # the whole student (backbone and ROI stage) is fine-tuned


def test_duplicated_key_is_rejected(tmp_path):
    leaf = tmp_path / "dup.yaml"
    leaf.write_text(f'_BASE_: "{CONFIG_DIR}/voc/r18_C4_24k.yaml"\nSOLVER:\n  BASE_LR: 0.1\nSOLVER:\n  MAX_ITER: 10\n')
    with pytest.raises(DuplicateKeyError, match="'SOLVER'.*dup.yaml"):
        get_cfg().merge_from_file(str(leaf))
    # ... in any file of the _BASE_ chain, nested keys included
    base = tmp_path / "base.yaml"
    base.write_text(f'_BASE_: "{CONFIG_DIR}/Base-RCNN-C4-BN.yaml"\nMODEL:\n  RESNETS:\n    DEPTH: 18\n    DEPTH: 34\n')
    leaf.write_text('_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 10\n')
    with pytest.raises(DuplicateKeyError, match="'DEPTH'.*base.yaml"):
        get_cfg().merge_from_file(str(leaf))


def test_bad_settings_are_rejected_clearly():
    from transfer.d2.roi_heads import build_res5

    # detectron2's stock C4 head silently ignores RES5_DILATION (its backbone accepts 2 for R-50)
    with pytest.raises(ValueError, match="RES5_DILATION 2 is not supported"):
        build_model(_cfg("voc/r50_C4_24k.yaml", "MODEL.RESNETS.RES5_DILATION", "2"))
    with pytest.raises(ValueError, match="RES2_OUT_CHANNELS 64"):
        build_res5(_cfg("voc/r34_C4_24k.yaml", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"))
    with pytest.raises(ValueError, match="MODEL.TIMM.NORM"):
        build_model(_cfg("voc/effb0_C4_24k.yaml", "MODEL.TIMM.NORM", "GN"))
    with pytest.raises(KeyError, match="efficientnet_b0"):
        build_model(_cfg("voc/effb0_C4_24k.yaml", "MODEL.TIMM.ARCH", "resnet18"))


def test_timm_norm_and_freeze():
    from timm.layers import FrozenBatchNormAct2d, SyncBatchNormAct

    model = build_model(_cfg("voc/effb0_C4_24k.yaml", "MODEL.BACKBONE.FREEZE_AT", "2"))
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNormAct2d) and not body.conv_stem.weight.requires_grad
    assert not any(p.requires_grad for p in body.blocks[1].parameters())  # res2's last block
    assert all(p.requires_grad for p in body.blocks[2].parameters())
    assert isinstance(body.blocks[2][0].bn1, SyncBatchNormAct)  # the base config's SyncBN, activation kept
    assert isinstance(model.roi_heads.res5.bn2, SyncBatchNormAct)
    assert len(body.blocks) == 5 and list(model.roi_heads.res5.blocks._modules) == ["5", "6"]
