"""CIFAR-10 / CIFAR-100 from the official python-pickle release (``cifar-10-batches-py``, ``cifar-100-python``).

Read from a user path, never downloaded and not md5-checked (copies and the synthetic sets of
``pretrain.synthetic.write_cifar`` differ from the published files). The class count and names come from the
``meta`` / ``batches.meta`` file, not from the variant's name.
"""
import os
from typing import List, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from pretrain.safeload import UnsafeCheckpointError, load_pickle

# variant -> (folder, training files, test files, meta file, label key, class-name key)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def resolve_cifar_dir(root: str, variant: str) -> str:
    """The folder holding the pickles: ``root/<cifar-10-batches-py | cifar-100-python>`` or ``root`` itself."""
    if variant not in LAYOUTS:
        raise ValueError(f"unknown CIFAR variant {variant!r}; expected one of {sorted(LAYOUTS)}")
    folder, train_files, _, meta, _, _ = LAYOUTS[variant]
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR root {root!r} does not exist; set DATA.ROOT to the folder that contains "
                                f"{folder}/ (or to {folder}/ itself)")
    for candidate in (os.path.join(root, folder), root):
        if os.path.isfile(os.path.join(candidate, meta)) or os.path.isfile(os.path.join(candidate, train_files[0])):
            return candidate
    other = [v for v, lay in LAYOUTS.items() if v != variant and os.path.isdir(os.path.join(root, lay[0]))]
    hint = f"; it holds {LAYOUTS[other[0]][0]}/, so set DATA.DATASET {other[0]}" if other else ""
    raise FileNotFoundError(f"no {variant} python-pickle files in {root!r} (looked for {folder}/{meta} and "
                            f"{meta}){hint}. Unpack the official {folder} archive there.")


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file {path} is missing; the folder must hold the whole official release "
                                f"({os.path.basename(os.path.dirname(path))})")
    try:  # plain data only: a pickle that would run code is refused (pretrain.safeload)
        return load_pickle(path, "CIFAR file", encoding="bytes")
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated download, wrong file
        raise ValueError(f"cannot read CIFAR pickle {path}: {type(e).__name__}: {e}") from e


def _get(d: dict, key: bytes, path: str):
    for k in (key, key.decode()):  # official files use bytes keys; tolerate str keys of re-pickled copies
        if k in d:
            return d[k]
    raise KeyError(f"{path} has no {key.decode()!r} entry (keys: {sorted(str(k) for k in d)[:8]}); is it a "
                   f"CIFAR python-pickle file of the right variant?")


class CIFAR(Dataset):
    """One split of CIFAR-10/100. ``self[i]`` -> ``(transform(PIL RGB 32x32 image), label)``.

    Also offers what the evaluators use on any dataset: ``load(i)`` (the PIL image), ``targets``, ``classes``.
    """

    def __init__(self, root: str, variant: str = "cifar10", train: bool = True, transform=None):
        self.dir = resolve_cifar_dir(root, variant)
        self.variant, self.train, self.transform = variant, train, transform
        _, train_files, test_files, meta_file, label_key, names_key = LAYOUTS[variant]
        meta_path = os.path.join(self.dir, meta_file)
        self.classes: List[str] = [n.decode() if isinstance(n, bytes) else str(n)
                                   for n in _get(_unpickle(meta_path), names_key, meta_path)]
        data, labels = [], []
        for name in train_files if train else test_files:
            path = os.path.join(self.dir, name)
            batch = _unpickle(path)
            x = np.asarray(_get(batch, b"data", path), dtype=np.uint8)
            y = list(_get(batch, label_key, path))
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != len(y):
                raise ValueError(f"{path}: expected an N x 3072 uint8 'data' array and N labels, got data "
                                 f"{x.shape} and {len(y)} labels")
            data.append(x)
            labels.extend(int(t) for t in y)
        # stored as N x 3072: 1024 red, then 1024 green, then 1024 blue values, each row-major 32 x 32
        self.data = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # N x 32 x 32 x 3
        self.targets: List[int] = labels
        bad = sorted({t for t in labels if not 0 <= t < len(self.classes)})
        if bad:
            raise ValueError(f"{self.dir}: labels {bad[:10]} are outside the {len(self.classes)} classes of "
                             f"{meta_file}")

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.data[index])

    def __getitem__(self, index: int) -> Tuple:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def __repr__(self) -> str:
        return (f"{self.variant} {'train' if self.train else 'test'} ({len(self)} images, {len(self.classes)} "
                f"classes) from {self.dir}")
