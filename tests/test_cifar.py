"""CIFAR: the official python-pickle reader, its errors, the CLI end to end, and cached vs uncached training."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.synthetic import write_cifar
from transfer.cifar import CIFAR
from transfer.common import eval_transform_from_cfg
from transfer.config import setup_eval_cfg
from transfer.linear import LinearEvaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """Synthetic CIFAR-10 (4 classes) and CIFAR-100 (6 classes) in the official layout, side by side."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10", num_classes=4, train_per_class=12, test_per_class=5, seed=0)
    write_cifar(root, "cifar100", num_classes=6, train_per_class=4, test_per_class=2, seed=1)
    return root


def test_reader_matches_the_pickles(cifar_root):
    train = CIFAR(str(cifar_root), "cifar10", train=True)
    same = CIFAR(str(cifar_root / "cifar-10-batches-py"), "cifar10", train=True)  # the folder itself works too
    test = CIFAR(str(cifar_root), "cifar10", train=False)
    assert len(train) == len(same) == 48 and len(test) == 20 and train.classes == same.classes
    with open(cifar_root / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    assert train.classes == names and len(names) == 4  # class count from the meta, not assumed to be 10
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    row = batch[b"data"][0]  # R plane, G plane, B plane
    img = np.asarray(train.load(0))
    assert img.shape == (32, 32, 3)
    for c in range(3):
        assert np.array_equal(img[:, :, c].reshape(-1), row[c * 1024:(c + 1) * 1024])
    assert train.targets[:len(batch[b"labels"])] == list(batch[b"labels"])
    x, y = CIFAR(str(cifar_root), "cifar10", transform=eval_transform_from_cfg(setup_eval_cfg("", [])))[0]
    assert x.shape == (3, 224, 224) and y == train.targets[0]  # 32 -> 224

    c100 = CIFAR(str(cifar_root), "cifar100", train=True)
    assert len(c100.classes) == 6 and len(c100) == 24 and set(c100.targets) == set(range(6))  # fine labels


def test_reader_errors_name_the_cause(cifar_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA.ROOT"):
        CIFAR(str(tmp_path / "missing"), "cifar10")
    with pytest.raises(FileNotFoundError, match="set DATA.DATASET cifar10"):
        only10 = tmp_path / "only10"
        shutil.copytree(cifar_root / "cifar-10-batches-py", only10 / "cifar-10-batches-py")
        CIFAR(str(only10), "cifar100")
    broken = tmp_path / "broken"
    shutil.copytree(cifar_root / "cifar-10-batches-py", broken / "cifar-10-batches-py")
    os.remove(broken / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        CIFAR(str(broken), "cifar10")
    (broken / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read CIFAR pickle .*data_batch_3"):
        CIFAR(str(broken), "cifar10")


def _opts(out, root, weights, **over):
    opts = {"OUTPUT_DIR": out, "MODEL.WEIGHTS": weights, "DATA.ROOT": root, "DATA.IMAGE_SIZE": 64,
            "DATA.VAL_RESIZE": 64, "DATA.NUM_WORKERS": 0, "SOLVER.EPOCHS": 4, "SOLVER.STEPS": "(2, 3)",
            "SOLVER.IMS_PER_BATCH": 16, "TEST.IMS_PER_BATCH": 64}
    opts.update(over)
    return [str(x) for kv in opts.items() for x in kv]


def test_cli_cifar10_end_to_end(tmp_path, cifar_root, teacher_export):
    out = tmp_path / "c10"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_linear.py"), "--config-file",
                           os.path.join(ROOT, "configs/eval/cifar10.yaml"), *_opts(out, cifar_root, teacher_export)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ,
                                                                                         OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "cifar10" and res["cached_features"] and res["lr"] == 3.0
    assert res["train_images"] == 48 and res["val_images"] == 20 and 0 <= res["top1"] <= res["top5"] <= 100
    assert f"linear resnet18 cifar10: top-1 {res['top1']:.2f}" in proc.stdout


def test_cached_and_uncached_training_agree(tmp_path, cifar_root, teacher_export):
    """Same sampler order, same batches: the cached path trains the same classifier as running the backbone."""
    base = os.path.join(ROOT, "configs/eval/cifar100.yaml")
    runs = {}
    for cache in (True, False):
        cfg = setup_eval_cfg(base, _opts(tmp_path / str(cache), cifar_root, teacher_export,
                                    **{"SOLVER.CACHE_FEATURES": cache}))
        runs[cache] = LinearEvaluator(cfg).run()
    assert runs[True]["cached_features"] and not runs[False]["cached_features"]
    assert abs(runs[True]["top1"] - runs[False]["top1"]) <= 0.5
    a = torch.load(tmp_path / "True/checkpoints/model_0000004.pth", weights_only=False)["classifier"]
    b = torch.load(tmp_path / "False/checkpoints/model_0000004.pth", weights_only=False)["classifier"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
