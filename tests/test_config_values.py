"""Values and files a run cannot work with are refused up front, naming the key (or file) and what is allowed
(issue #10: untrained exports with exit 0, ZeroDivisionError, RecursionError, messages that blame the wrong thing)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import tiny_cfg
from pretrain.cfgnode import ConfigFileError
from pretrain.config import get_cfg, setup_cfg
from transfer.config import setup_eval_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISCO = ["METHOD.DISTILLERS", "['disco']", "MODEL.TEACHER.WEIGHTS", "teacher.pth"]  # every part's check_config runs

PRETRAIN_BAD = [
    ("SOLVER.EPOCHS", "0"), ("SOLVER.EPOCHS", "-1"), ("SOLVER.IMS_PER_BATCH", "0"), ("SOLVER.BASE_LR", "-0.03"),
    ("SOLVER.BASE_LR", "0"), ("SOLVER.REFERENCE_BATCH", "0"), ("SOLVER.MOMENTUM", "1.0"),
    ("SOLVER.MOMENTUM", "-0.1"), ("SOLVER.WEIGHT_DECAY", "-0.0001"), ("SOLVER.WARMUP_EPOCHS", "-1"),
    ("SOLVER.WARMUP_EPOCHS", "201"), ("TRAIN.CHECKPOINT_PERIOD", "0"), ("TRAIN.MAX_TO_KEEP", "0"),
    ("TRAIN.LOG_PERIOD", "0"), ("TRAIN.STOP_AT_ITER", "-2"), ("MODEL.MOCO.QUEUE_SIZE", "0"),
    ("MODEL.MOCO.QUEUE_SIZE", "100"), ("MODEL.MOCO.TEMPERATURE", "0"), ("MODEL.MOCO.MOMENTUM", "1.5"),
    ("MODEL.MOCO.BN_SPLITS", "0"), ("MODEL.MOCO.BN_SPLITS", "3"), ("LOSS.CONTRASTIVE.WEIGHT", "-1"),
    ("LOSS.DISCO.WEIGHT", "-1"), ("MODEL.STUDENT.HEAD.NUM_LAYERS", "0"), ("MODEL.STUDENT.HEAD.HIDDEN_DIM", "0"),
    ("MODEL.STUDENT.HEAD.OUT_DIM", "0"), ("DATA.IMAGE_SIZE", "0"), ("DATA.CROP_SCALE", "(0.0, 1.0)"),
    ("DATA.CROP_SCALE", "(0.5, 0.2)"), ("DATA.CROP_SCALE", "(0.2, 1.5)"), ("DATA.CROP_SCALE", "(0.2,)"),
    ("DATA.BLUR_SIGMA", "(-0.1, 2.0)"), ("DATA.BLUR_SIGMA", "(2.0, 0.1)"),
    ("DATA.COLOR_JITTER", "(0.4, 0.4, 0.4, 0.6)"),
    ("DATA.COLOR_JITTER", "(-0.1, 0.4, 0.4, 0.1)"), ("DATA.GRAYSCALE_P", "1.5"), ("DATA.NUM_WORKERS", "-1"),
    ("DATA.MEAN", "(0.5, 0.5)"), ("DATA.STD", "(0.2, 0.0, 0.2)"), ("TEST.KNN.K", "0"), ("TEST.KNN.TEMPERATURE", "0"),
    ("TEST.KNN.IMAGE_SIZE", "0"), ("TEST.KNN.PERIOD", "-2"), ("TEST.KNN.MAX_TRAIN_IMAGES", "-1"), ("SEED", "-1"),
    ("OUTPUT_DIR", "''"),
]


@pytest.mark.parametrize("key, value", PRETRAIN_BAD)
def test_pretrain_value_out_of_range_names_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(key)) as e:
        setup_cfg("", DISCO + [key, value])
    assert "\n" not in str(e.value)


def test_negative_lr_names_base_lr_not_the_scaled_value():
    with pytest.raises(ValueError, match=r"SOLVER\.BASE_LR -0\.03 is out of range: must be > 0"):
        setup_cfg("", DISCO + ["SOLVER.BASE_LR", "-0.03", "SOLVER.IMS_PER_BATCH", "512"])


def test_range_messages_name_value_and_range():
    with pytest.raises(ValueError, match=r"^SOLVER\.EPOCHS 0 is out of range: must be >= 1$"):
        setup_cfg("", DISCO + ["SOLVER.EPOCHS", "0"])
    with pytest.raises(ValueError, match=r"^TRAIN\.MAX_TO_KEEP 0 is out of range: must be >= 1$"):
        setup_cfg("", DISCO + ["TRAIN.MAX_TO_KEEP", "0"])
    with pytest.raises(ValueError, match=r"^DATA\.CROP_SCALE \(0\.0, 1\.0\) is out of range: each value must be in "
                                         r"\(0, 1\]$"):
        setup_cfg("", DISCO + ["DATA.CROP_SCALE", "(0.0, 1.0)"])
    with pytest.raises(ValueError, match=r"^MODEL\.MOCO\.QUEUE_SIZE 0 is out of range: must be >= 1$"):
        setup_cfg("", DISCO + ["MODEL.MOCO.QUEUE_SIZE", "0"])


def test_edge_values_in_range_are_accepted():
    cfg = setup_cfg("", DISCO + ["SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "1", "DATA.CROP_SCALE", "(1.0, 1.0)",
                                 "DATA.NUM_WORKERS", "0", "MODEL.MOCO.MOMENTUM", "1.0", "SOLVER.MOMENTUM", "0.0",
                                 "TRAIN.STOP_AT_ITER", "0", "TEST.KNN.PERIOD", "-1", "LOSS.CONTRASTIVE.WEIGHT", "0",
                                 "DATA.BLUR_SIGMA", "(0.0, 0.0)", "MODEL.MOCO.BN_SPLITS", "8"])
    assert cfg.SOLVER.EPOCHS == 1


EVAL_BAD = [
    ("SOLVER.EPOCHS", "0"), ("SOLVER.IMS_PER_BATCH", "0"), ("SOLVER.BASE_LR", "-30.0"), ("SOLVER.BASE_LR", "0"),
    ("SOLVER.MOMENTUM", "1.0"), ("SOLVER.WEIGHT_DECAY", "-1.0"), ("SOLVER.GAMMA", "0"), ("SOLVER.GAMMA", "1.5"),
    ("SOLVER.STEPS", "(80, 60)"), ("SOLVER.STEPS", "(0, 60)"), ("SOLVER.STOP_AT_EPOCH", "-2"),
    ("SOLVER.CHECKPOINT_PERIOD", "0"), ("SOLVER.MAX_TO_KEEP", "0"), ("TEST.EVAL_PERIOD", "-1"),
    ("TEST.IMS_PER_BATCH", "0"), ("KNN.K", "0"), ("KNN.TEMPERATURE", "0"), ("KNN.MAX_TRAIN_IMAGES", "-1"),
    ("TSNE.NUM_CLASSES", "0"), ("TSNE.PER_CLASS", "0"), ("TSNE.PERPLEXITY", "0"), ("DATA.IMAGE_SIZE", "0"),
    ("DATA.VAL_RESIZE", "100"), ("DATA.VAL_RESIZE", "-1"), ("DATA.SUBSET_PERCENT", "101"),
    ("DATA.SUBSET_PER_CLASS", "-1"), ("DATA.NUM_WORKERS", "-1"), ("DATA.STD", "(0.2, 0.2, -0.2)"),
    ("DATA.MEAN", "(0.5,)"), ("SEED", "-1"), ("OUTPUT_DIR", "''"),
]


@pytest.mark.parametrize("key, value", EVAL_BAD)
def test_eval_value_out_of_range_names_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(key)) as e:
        setup_eval_cfg("", [key, value])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "**", "*.yaml"),
                                               recursive=True)))
def test_shipped_pretrain_configs_validate(path):
    setup_cfg(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "eval", "*.yaml"))))
def test_shipped_eval_configs_validate(path):
    setup_eval_cfg(path)


def test_pretrain_cli_refuses_zero_epochs(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), "--config-file",
                          os.path.join(ROOT, "configs", "pretrain", "quickstart_moco.yaml"), "SOLVER.EPOCHS", "0",
                          "OUTPUT_DIR", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "SOLVER.EPOCHS 0 is out of range: must be >= 1" in out.stderr
    assert not os.path.exists(tmp_path / "run" / "export")


# ---------------------------------------------------------------------------------------------------------------
# config files


def test_cyclic_base_chain_names_its_files(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\nSEED: 1\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\nSEED: 2\n")
    with pytest.raises(ConfigFileError, match=r"cyclic _BASE_ chain: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        get_cfg().merge_from_file(str(tmp_path / "a.yaml"))
    with pytest.raises(ValueError, match=r"cyclic _BASE_ chain"):
        setup_cfg(str(tmp_path / "b.yaml"))
    (tmp_path / "self.yaml").write_text("_BASE_: self.yaml\n")
    with pytest.raises(ConfigFileError, match=r"self\.yaml -> .*self\.yaml"):
        get_cfg().merge_from_file(str(tmp_path / "self.yaml"))
    # the loader is usable again afterwards, and a shared base (a diamond) is no cycle
    (tmp_path / "base.yaml").write_text("SEED: 3\n")
    (tmp_path / "mid.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 4\n")
    (tmp_path / "leaf.yaml").write_text("_BASE_: [mid.yaml, base.yaml]\nSOLVER:\n  BASE_LR: 0.5\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "leaf.yaml"))
    assert (cfg.SEED, cfg.SOLVER.EPOCHS, cfg.SOLVER.BASE_LR) == (3, 4, 0.5)


def test_missing_base_names_the_file_that_asks_for_it(tmp_path):
    (tmp_path / "leaf.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml, the _BASE_ of .*leaf\.yaml"):
        get_cfg().merge_from_file(str(tmp_path / "leaf.yaml"))


def test_broken_yaml_names_the_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("SEED: 1\nSOLVER:\n  EPOCHS: [1, 2\n  BASE_LR: 0.1\n")
    with pytest.raises(ConfigFileError, match=r"broken\.yaml, line 4, column \d+: invalid YAML"):
        setup_cfg(str(tmp_path / "broken.yaml"))
    (tmp_path / "leaf.yaml").write_text("_BASE_: indent.yaml\n")
    (tmp_path / "indent.yaml").write_text("SEED: 1\n  EPOCHS: 2\n")
    with pytest.raises(ConfigFileError, match=r"indent\.yaml, line 2, column \d+: invalid YAML"):
        setup_cfg(str(tmp_path / "leaf.yaml"))
    for text, what in (("", "empty file"), ("- 1\n- 2\n", "list")):
        (tmp_path / "odd.yaml").write_text(text)
        with pytest.raises(ConfigFileError, match=rf"odd\.yaml: a config file must be a mapping.*{what}"):
            setup_cfg(str(tmp_path / "odd.yaml"))


def test_eval_config_cycle_is_refused_too(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigFileError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        setup_eval_cfg(str(tmp_path / "a.yaml"))


# ---------------------------------------------------------------------------------------------------------------
# data


def test_train_dir_that_is_a_file_says_so(tmp_path):
    from pretrain.data import ImageFolder

    (tmp_path / "train.tar").write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match=r"train\.tar' is a file, not a folder"):
        ImageFolder(str(tmp_path / "train.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(str(tmp_path / "missing"))


def _corrupt_copy(src, dst, victims):
    shutil.copytree(src, dst)
    files = sorted(dst.rglob("*.jpg"))
    for i in victims:
        files[i].write_bytes(files[i].read_bytes()[:100])  # truncated JPEG
    return [files[i] for i in victims]


def test_corrupt_image_hint_depends_on_the_caller(tmp_path, imagefolder):
    from pretrain.data import CorruptImageError, ImageFolder, MultiViewDataset
    from transfer.common import TransformedDataset

    (victim,) = _corrupt_copy(imagefolder / "train", tmp_path / "train", [3])
    base = ImageFolder(str(tmp_path / "train"))
    index = [p for p, _ in base.samples].index(str(victim))
    # an evaluator (no DATA.SKIP_CORRUPT there): replace or delete the file
    with pytest.raises(CorruptImageError) as e:
        TransformedDataset(base, lambda img: img)[index]
    assert victim.name in str(e.value) and "Replace or delete" in str(e.value) and "SKIP_CORRUPT" not in str(e.value)
    # the pretrainer, which has the option, names it
    with pytest.raises(CorruptImageError, match=rf"{victim.name}.*Replace or delete.*DATA\.SKIP_CORRUPT True"):
        MultiViewDataset(base, lambda img: torch.zeros(1), seed=0)[(0, index)]


@pytest.mark.parametrize("world", [1, 2])
def test_skipped_counts_each_unreadable_file_once_over_epochs_and_processes(tmp_path, imagefolder, world):
    """Summing ``skipped`` over a run gives the distinct unreadable files drawn so far, also when the sampler drops
    a tail (64 images, batch 12: 4 dropped per epoch) and consecutive files are unreadable (a walk passes several)."""
    from pretrain.data import ImageFolder, MultiViewDataset, ResumableSampler

    victims = _corrupt_copy(imagefolder / "train", tmp_path / "train", [3, 4, 5, 40])
    base = ImageFolder(str(tmp_path / "train"))
    bad = {[p for p, _ in base.samples].index(str(v)) for v in victims}
    samplers = [ResumableSampler(len(base), 12, rank, world, seed=0) for rank in range(world)]
    datasets = [MultiViewDataset(base, lambda img: torch.zeros(1), 0, num_views=1, skip_corrupt=True, sampler=s)
                for s in samplers]
    total, drawn = 0, set()
    for epoch in range(3):
        for sampler, dataset in zip(samplers, datasets):
            sampler.set_epoch(epoch)
            for key in sampler:
                total += dataset[key][2]
                drawn.add(key[1])
        assert total == len(bad & drawn)
    assert total == len(bad)


def test_skipped_images_counts_distinct_files(tmp_path, imagefolder):
    from pretrain.trainer import Trainer

    _corrupt_copy(imagefolder / "train", tmp_path / "data" / "train", [5, 30])
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "data", **{"SOLVER.EPOCHS": 2, "DATA.SKIP_CORRUPT": True})
    Trainer(cfg).run()
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if "loss" in x]
    assert recs[-1]["epoch"] == 1 and recs[-1]["skipped_images"] == 2


# ---------------------------------------------------------------------------------------------------------------
# messages that named the wrong thing


def test_teacher_head_missing_a_weight_names_the_head_file(tmp_path):
    from pretrain.encoder import build_encoder
    from pretrain.export import export_encoder
    from pretrain.teacher import load_teacher

    torch.manual_seed(0)
    paths = export_encoder(build_encoder("resnet18", 64, 128), "resnet18", str(tmp_path), "resnet18", {})
    head = torch.load(paths["head"], weights_only=True)
    del head["state_dict"]["2.weight"]
    torch.save(head, paths["head"])
    with pytest.raises(KeyError) as e:
        load_teacher(paths["backbone"], "resnet18")
    msg = str(e.value)
    assert "resnet18_head.pth" in msg and "missing ['2.weight']" in msg and "unexpected" not in msg


def test_class_mismatch_message_does_not_assume_a_linear_classifier(tmp_path, imagefolder):
    from transfer.common import build_datasets
    from transfer.config import get_eval_cfg

    shutil.copytree(imagefolder / "val", tmp_path / "val")
    first = sorted(p for p in (tmp_path / "val").iterdir())[0]
    first.rename(tmp_path / "val" / "zebra")
    cfg = get_eval_cfg()
    cfg.DATA.TRAIN_DIR, cfg.DATA.VAL_DIR = str(imagefolder / "train"), str(tmp_path / "val")
    with pytest.raises(ValueError) as e:
        build_datasets(cfg)
    msg = str(e.value)
    assert "linear" not in msg and "the evaluation labels" in msg and "['zebra']" in msg and first.name in msg
    with pytest.raises(ValueError, match="kNN evaluation labels"):
        build_datasets(cfg, "kNN evaluation")
