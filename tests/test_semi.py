"""Semi-supervised data: SimCLR subset lists (the first line is an image, not a header), name matching,
class-balanced subsets, and the semi-supervised linear evaluation end to end through the CLI."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from pretrain.data import ImageFolder
from pretrain.synthetic import write_subset_list
from transfer.semi import balanced_subset_indices, read_subset_list, subset_indices_from_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_first_line_is_kept(tmp_path):
    """The official reader (pd.read_csv without header=None) takes the first name for a header and drops it."""
    path = tmp_path / "1percent.txt"
    path.write_text("c00_circle_00003.jpg\nc01_triangle_00007.jpg\n\n  c02_square_00001.jpg  \n")
    assert read_subset_list(str(path)) == ["c00_circle_00003.jpg", "c01_triangle_00007.jpg", "c02_square_00001.jpg"]
    path.write_text("n01440764_10026.JPEG")  # a one-line list, no trailing newline: still one image
    assert read_subset_list(str(path)) == ["n01440764_10026.JPEG"]


def test_written_list_maps_to_every_named_image(tmp_path, imagefolder):
    names = write_subset_list(imagefolder, tmp_path / "list.txt", per_class=3, seed=0)
    read = read_subset_list(str(tmp_path / "list.txt"))
    assert read == names and len(read) == 12
    train = ImageFolder(str(imagefolder / "train"))
    idx = subset_indices_from_list(train.samples, read)
    assert [os.path.basename(train.samples[i][0]) for i in idx] == sorted(read)  # the first name included
    assert read[0] in {os.path.basename(train.samples[i][0]) for i in idx}
    assert Counter(train.targets[i] for i in idx) == {c: 3 for c in range(4)}


def test_unknown_names_are_listed(imagefolder):
    train = ImageFolder(str(imagefolder / "train"))
    with pytest.raises(FileNotFoundError, match=r"2 of the 3 images .*\['n01440764_1.JPEG', 'zzz.jpg'\]"):
        subset_indices_from_list(train.samples, ["zzz.jpg", "c00_circle_00000.jpg", "n01440764_1.JPEG"])


def test_balanced_subsets_are_deterministic_and_balanced():
    targets = [0] * 100 + [1] * 50 + [2] * 10
    one = balanced_subset_indices(targets, percent=10, seed=0)
    assert one == balanced_subset_indices(targets, percent=10, seed=0) != balanced_subset_indices(
        targets, percent=10, seed=1)
    assert Counter(targets[i] for i in one) == {0: 10, 1: 5, 2: 1}
    per = balanced_subset_indices(targets, per_class=8, seed=0)
    assert Counter(targets[i] for i in per) == {0: 8, 1: 8, 2: 8} and per == sorted(per)
    assert balanced_subset_indices(targets) == list(range(160))


def test_cli_semi_supervised_end_to_end(tmp_path, imagefolder, teacher_export):
    listed = write_subset_list(imagefolder, tmp_path / "subset.txt", per_class=4, seed=2)
    out = tmp_path / "semi"
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": teacher_export, "DATA.TRAIN_DIR": imagefolder / "train",
            "DATA.VAL_DIR": imagefolder / "val", "DATA.SUBSET_FILE": tmp_path / "subset.txt", "DATA.IMAGE_SIZE": 32,
            "DATA.VAL_RESIZE": 36, "DATA.NUM_WORKERS": 0, "SOLVER.EPOCHS": 2, "SOLVER.IMS_PER_BATCH": 8}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_linear.py"), "--config-file",
                           os.path.join(ROOT, "configs/eval/semi_1pct.yaml"), *[str(x) for kv in opts.items()
                                                                                 for x in kv]],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["eval"] == "semi" and res["subset"] == "subset.txt" and res["train_images"] == len(listed) == 16
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["val_images"] == 16
    assert "semi resnet18 shapes (subset.txt, 16 images): top-1" in proc.stdout
