import glob
import os

import pytest

from pretrain.config import DuplicateKeyError, get_cfg, setup_cfg

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
    (tmp_path / "leaf.yaml").write_text("_BASE_: base.yaml\nSEED: 7\nMETHOD: moco\n")
    cfg = setup_cfg(str(tmp_path / "leaf.yaml"), ["SOLVER.BASE_LR", "0.5"])
    assert (cfg.SOLVER.EPOCHS, cfg.SEED, cfg.SOLVER.BASE_LR) == (3, 7, 0.5)
    with pytest.raises(ValueError, match="KEY VALUE"):
        setup_cfg(str(tmp_path / "leaf.yaml"), ["SEED"])


def test_disco_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="MODEL.TEACHER.WEIGHTS"):
        setup_cfg("", ["METHOD", "disco"])


def test_every_key_has_a_comment():
    src = open(os.path.join(ROOT, "pretrain", "config.py")).read().splitlines()
    keys = [ln for ln in src if ln.startswith("_C.") and " = CN()" not in ln]
    uncommented = [ln for i, ln in enumerate(src) if ln in keys and "#" not in ln and not src[i - 1].startswith("#")]
    assert keys and not uncommented


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "**", "*.yaml"),
                                               recursive=True)))
def test_shipped_configs_load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    from pretrain.backbones import BACKBONES

    assert cfg.MODEL.STUDENT.ARCH in BACKBONES and cfg.MODEL.TEACHER.ARCH in BACKBONES
    if cfg.METHOD == "disco":
        assert cfg.MODEL.TEACHER.WEIGHTS and cfg.MODEL.STUDENT.HEAD.OUT_DIM == 128
