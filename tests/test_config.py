import glob
import os

import pytest

from pretrain.cfgnode import DuplicateKeyError
from pretrain.config import get_cfg, setup_cfg

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_duplicate_key_rejected_with_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  CHANNELS_LAST: True\nSEED: 1\nMODEL:\n  STUDENT:\n    ARCH: resnet34\n")
    with pytest.raises(DuplicateKeyError, match=r"'MODEL'.*bad\.yaml"):
        get_cfg().merge_from_file(str(bad))


def test_duplicate_key_in_base_rejected(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  EPOCHS: 3\n  EPOCHS: 4\n")
    (tmp_path / "leaf.yaml").write_text("_BASE_: base.yaml\nSEED: 2\n")
    with pytest.raises(DuplicateKeyError, match=r"'EPOCHS'.*base\.yaml"):
        get_cfg().merge_from_file(str(tmp_path / "leaf.yaml"))


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  EPOCHS: 3\nSEED: 5\n")
    (tmp_path / "leaf.yaml").write_text("_BASE_: base.yaml\nSEED: 7\nMETHOD:\n  DISTILLERS: []\n")
    cfg = setup_cfg(str(tmp_path / "leaf.yaml"), ["SOLVER.BASE_LR", "0.5"])
    assert (cfg.SOLVER.EPOCHS, cfg.SEED, cfg.SOLVER.BASE_LR) == (3, 7, 0.5)
    assert cfg.METHOD.TESTBED == "mocov2" and list(cfg.METHOD.DISTILLERS) == []
    with pytest.raises(ValueError, match="KEY VALUE"):
        setup_cfg(str(tmp_path / "leaf.yaml"), ["SEED"])


def test_disco_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="MODEL.TEACHER.WEIGHTS"):
        setup_cfg("", ["METHOD.DISTILLERS", "['disco']"])


@pytest.mark.parametrize("value, distillers", [("disco", "[disco]"), ("moco", "[]")])
def test_method_of_earlier_versions_is_refused_with_the_new_keys(tmp_path, value, distillers):
    (tmp_path / "old.yaml").write_text(f"METHOD: {value}\n")
    for args in ((str(tmp_path / "old.yaml"), []), ("", ["METHOD", value])):
        with pytest.raises(ValueError, match=rf"TESTBED: mocov2\n    DISTILLERS: \{distillers}"):
            setup_cfg(*args)


def test_unknown_method_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="not a registered testbed.*mocov2"):
        setup_cfg("", ["METHOD.TESTBED", "simclr", "METHOD.DISTILLERS", "[]"])
    with pytest.raises(ValueError, match="not a registered distiller.*disco"):
        setup_cfg("", ["METHOD.DISTILLERS", "['dsico']", "MODEL.TEACHER.WEIGHTS", "t.pth"])
    with pytest.raises(ValueError, match="trains nothing"):
        setup_cfg("", ["METHOD.TESTBED", "none", "METHOD.DISTILLERS", "[]"])


def test_every_key_has_a_comment():
    """The defaults of config.py and the keys every testbed / distiller adds (``cfg.X = value`` lines)."""
    files = [os.path.join(ROOT, "pretrain", "config.py")] + sorted(
        glob.glob(os.path.join(ROOT, "pretrain", "testbeds", "*.py")) +
        glob.glob(os.path.join(ROOT, "pretrain", "distillers", "*.py")))
    keys, uncommented = [], []
    for path in files:
        src = [ln.strip() for ln in open(path).read().splitlines()]
        for i, ln in enumerate(src):
            if ln.startswith(("_C.", "cfg.")) and " = " in ln and " = CN()" not in ln:
                keys.append(ln)
                if "#" not in ln and not src[i - 1].startswith("#"):
                    uncommented.append(f"{os.path.basename(path)}: {ln}")
    assert len(keys) > 50 and not uncommented


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "**", "*.yaml"),
                                               recursive=True)))
def test_shipped_configs_load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    from pretrain.backbones import BACKBONES

    assert cfg.MODEL.STUDENT.ARCH in BACKBONES and cfg.MODEL.TEACHER.ARCH in BACKBONES
    if "disco" in cfg.METHOD.DISTILLERS:  # the teachers' embedding: MoCo / SwAV heads 128-d, DINO ViT-S / XCiT-S 256
        dino_teacher = cfg.MODEL.TEACHER.ARCH in ("vit_small_patch16_224", "xcit_small_12_p16_224")
        assert cfg.MODEL.TEACHER.WEIGHTS and cfg.MODEL.STUDENT.HEAD.OUT_DIM == (256 if dino_teacher else 128)


def test_checkpoints_from_before_a_key_existed_resume_under_its_default():
    """A config dump written before DATA.BACKEND / MODEL.TEACHER.COPY_QUEUE existed is the run of their defaults:
    current_form fills them, so check_resume finds no change; another value is still a change."""
    from pretrain.cfgdiff import check_resume
    from pretrain.config import SAFE_ON_RESUME, current_form

    cfg = setup_cfg(os.path.join(CONFIGS, "quickstart.yaml"), [])
    old = cfg.clone()
    old.defrost()
    del old.DATA["BACKEND"]
    del old.MODEL.TEACHER["COPY_QUEUE"]
    del old.DATA["MULTI_CROP"], old.MODEL["SWAV"], old.SOLVER["CLIP_GRAD"]  # whole nodes too (issue 13's keys)
    with pytest.raises(ValueError, match="COPY_QUEUE"):
        check_resume(old.dump(), cfg, SAFE_ON_RESUME, "TRAIN.RESUME_CHANGED_CONFIG", "ckpt")
    assert check_resume(current_form(old.dump()), cfg, SAFE_ON_RESUME, "TRAIN.RESUME_CHANGED_CONFIG", "ckpt") == {}
    copying = setup_cfg(os.path.join(CONFIGS, "quickstart.yaml"), ["MODEL.TEACHER.COPY_QUEUE", "True"])
    with pytest.raises(ValueError, match="MODEL.TEACHER.COPY_QUEUE: False in the checkpoint, True now"):
        check_resume(current_form(old.dump()), copying, SAFE_ON_RESUME, "TRAIN.RESUME_CHANGED_CONFIG", "ckpt")
