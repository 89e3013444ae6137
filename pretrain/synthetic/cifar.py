"""CIFAR-10 / CIFAR-100 in the official "python version" layout: protocol-2 pickles written the way Python 2
``cPickle`` wrote the originals (:class:`_Py2Pickler`), readable by torchvision's ``CIFAR10`` / ``CIFAR100``."""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .rendering import image_rng, make_classification_image
from .shapes import CLASS_NAMES, MAX_CLASSES, _check_num_classes
from .writer import (GENERATOR_VERSION, _check_count, _check_files_exist, _chunks, _resolve_workers, _run_tasks,
                     _write_atomically)

# A "class id" no class uses: the seed stream of a split's sample order (CIFAR shuffling), apart from every image's.
_ORDER_STREAM = 1 << 16


# --------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, in the official "python version" pickles
# --------------------------------------------------------------------------------------------------------

CIFAR_IMAGE_SIZE = 32
# CIFAR-100's coarse label of a class: class_id // CIFAR_COARSE_GROUP (consecutive shapes form a superclass).
CIFAR_COARSE_GROUP = 4
_CIFAR10_TRAIN_BATCHES = 5
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_DEFAULT_CLASSES = {"cifar10": 10, "cifar100": MAX_CLASSES}


class _GlobalRef:
    """A module-level name to be pickled by reference, written verbatim whatever the running library calls it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # the pickler insists that a reduce function be callable; it is never called
        raise TypeError(f"{self.module}.{self.name} is a pickling placeholder")


class _Reduced:
    """A ready-made ``__reduce__`` tuple to be pickled as such (the dtype inside an array's state)."""

    def __init__(self, reduce: tuple) -> None:
        self.reduce = reduce


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Writes pickles the way the original CIFAR files were written (Python 2 ``cPickle``, protocol 2).

    Python 3 pickles ``bytes`` at protocol 2 as a call to ``codecs.encode``, which loads as ``bytes`` under every
    ``encoding``. The originals hold Python 2 ``str`` (``BINSTRING`` opcodes) instead, which load as ``bytes`` with
    ``encoding="bytes"`` and as ``str`` with ``encoding="latin1"`` -- torchvision relies on the latter (it indexes
    ``entry["data"]``). So every ``bytes`` here is written as a Python 2 string, and uint8 arrays are reduced as
    Python 2 numpy reduced them (``numpy.core.multiarray._reconstruct``, a state holding the raw buffer), a form
    numpy 1.x and 2.x both load.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    def save_global_ref(self, obj: _GlobalRef) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[_GlobalRef] = save_global_ref

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            if obj.dtype != np.uint8:
                raise TypeError(f"only uint8 arrays are written in CIFAR pickles, got {obj.dtype}")
            arr = np.ascontiguousarray(obj)
            dtype = (_GlobalRef("numpy", "dtype"), (b"u1", 0, 1), (3, b"|", None, None, None, -1, -1, 0))
            state = (1, tuple(int(d) for d in arr.shape), _Reduced(dtype), False, arr.tobytes())
            return (_GlobalRef("numpy.core.multiarray", "_reconstruct"), (_GlobalRef("numpy", "ndarray"), (0,), b"b"),
                    state)
        if type(obj) is _Reduced:
            return obj.reduce
        return NotImplemented


def _dump_py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar_coarse_names(num_classes: int) -> List[str]:
    """CIFAR-100-style superclass names: one per ``CIFAR_COARSE_GROUP`` consecutive classes, e.g.
    ``g0_circle_triangle_square_star``."""
    _check_num_classes(num_classes)
    groups = [list(range(g, min(g + CIFAR_COARSE_GROUP, num_classes)))
              for g in range(0, num_classes, CIFAR_COARSE_GROUP)]
    return [f"g{i}_" + "_".join(CLASS_NAMES[c] for c in members) for i, members in enumerate(groups)]


def cifar_sample_order(seed: int, split: str, num_classes: int, per_class: int) -> List[Tuple[int, int]]:
    """The ``(class_id, index)`` of every sample of a CIFAR split in file order: a seeded shuffle, so labels are
    mixed as in the real files. Image ``(c, i)`` is ``make_classification_image(image_rng(seed, "cifar", split,
    c, i), c, 32)``."""
    samples = [(c, i) for c in range(num_classes) for i in range(per_class)]
    perm = image_rng(seed, "cifar", split, _ORDER_STREAM, 0).permutation(len(samples))
    return [samples[k] for k in perm]


def _cifar_rows(seed: int, split: str, samples: Sequence[Tuple[int, int]]) -> np.ndarray:
    """uint8 ``(len(samples), 3072)``: each row the R plane, then G, then B, each 32x32 row-major (CIFAR's)."""
    rows = np.empty((len(samples), 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE), dtype=np.uint8)
    for k, (c, i) in enumerate(samples):
        img = make_classification_image(image_rng(seed, "cifar", split, c, i), c, CIFAR_IMAGE_SIZE)
        rows[k] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).reshape(-1)
    return rows


def _write_cifar_chunk(out: str, seed: int, split: str, samples: Sequence[Tuple[int, int]]) -> None:
    """Worker unit: the rows of ``samples`` into ``out`` (an .npy scratch file assembled by the caller)."""
    np.save(out, _cifar_rows(seed, split, samples))


def _cifar_split_rows(tmp: Path, seed: int, split: str, samples: List[Tuple[int, int]],
                      workers: int) -> np.ndarray:
    chunk_files, tasks = [], []
    for k, (a, b) in enumerate(_chunks(len(samples), 256)):
        chunk_files.append(tmp / f".{split}_{k:05d}.npy")
        tasks.append((str(chunk_files[-1]), seed, split, samples[a:b]))
    _run_tasks(_write_cifar_chunk, tasks, workers)
    parts = [np.load(f) for f in chunk_files]
    for f in chunk_files:
        f.unlink()
    return np.concatenate(parts) if parts else np.empty((0, 3 * CIFAR_IMAGE_SIZE ** 2), dtype=np.uint8)


def cifar_meta(variant: str, num_classes: int, train_per_class: int, test_per_class: int, seed: int) -> dict:
    """The ``meta.json`` content that identifies a CIFAR dataset (every generation argument)."""
    _check_num_classes(num_classes)
    meta = {
        "generator": "pretrain.synthetic",
        "generator_version": GENERATOR_VERSION,
        "layout": "cifar",
        "variant": variant,
        "classes": [CLASS_NAMES[c] for c in range(num_classes)],
        "num_classes": num_classes,
        "splits": {"train": train_per_class, "test": test_per_class},
        "image_size": CIFAR_IMAGE_SIZE,
        "seed": seed,
    }
    if variant == "cifar100":
        meta["coarse_classes"] = cifar_coarse_names(num_classes)
        meta["coarse_rule"] = f"class_id // {CIFAR_COARSE_GROUP}"
    return meta


def write_cifar(root: Union[str, os.PathLike], variant: str = "cifar10", num_classes: Optional[int] = None,
                train_per_class: int = 500, test_per_class: int = 100, seed: int = 0,
                workers: Optional[int] = None) -> dict:
    """Write the official CIFAR "python version" layout under ``root``, readable by torchvision's ``CIFAR10`` /
    ``CIFAR100`` (except for their md5 check, which is of the real files).

    ``variant="cifar10"``: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; the shuffled
    training samples are split over the 5 batches in order (sizes differ by at most one).
    ``variant="cifar100"``: ``root/cifar-100-python/{train, test, meta}`` with fine labels = class ids and coarse
    labels = ``class_id // CIFAR_COARSE_GROUP`` (names from :func:`cifar_coarse_names`).
    Class names are the bare shape names (``circle``, ``triangle``, ...), like CIFAR's ``airplane``; there are only
    ``MAX_CLASSES`` of them, so ``num_classes`` (default 10 / 16) picks the first N -- readers must take names
    and count from the meta file. Every batch is a protocol-2 pickle with bytes keys, as the originals:
    ``pickle.load(f, encoding="bytes")`` and ``encoding="latin1"`` both work. ``b"data"`` is uint8 N x 3072
    (R plane, G plane, B plane; each 32x32 row-major).

    The variant folder is the atomic unit (its own ``meta.json``), so both variants can share ``root``.
    Returns the meta dict plus ``root`` (the variant folder), ``generated`` and ``seconds``.
    """
    if variant not in _CIFAR_FOLDERS:
        raise ValueError(f"variant must be one of {sorted(_CIFAR_FOLDERS)}, got {variant!r}")
    num_classes = _CIFAR_DEFAULT_CLASSES[variant] if num_classes is None else num_classes
    _check_count("train_per_class", train_per_class)
    _check_count("test_per_class", test_per_class)
    folder = Path(root) / _CIFAR_FOLDERS[variant]
    meta = cifar_meta(variant, num_classes, train_per_class, test_per_class, seed)
    names = [n.encode() for n in meta["classes"]]
    total = num_classes * (train_per_class + test_per_class)
    files = (["batches.meta", "test_batch"] + [f"data_batch_{b}" for b in range(1, _CIFAR10_TRAIN_BATCHES + 1)]
             if variant == "cifar10" else ["meta", "train", "test"])

    def write_files(out: Path) -> None:
        n_workers = _resolve_workers(workers, total)
        split_data = {}
        for split, per_class in meta["splits"].items():
            samples = cifar_sample_order(seed, split, num_classes, per_class)
            split_data[split] = (samples, _cifar_split_rows(out, seed, split, samples, n_workers))

        def filenames(samples: Sequence[Tuple[int, int]]) -> List[bytes]:
            return [f"{CLASS_NAMES[c]}_s_{i:06d}.png".encode() for c, i in samples]

        if variant == "cifar10":
            samples, rows = split_data["train"]
            bounds = np.linspace(0, len(samples), _CIFAR10_TRAIN_BATCHES + 1).round().astype(int)
            for b in range(_CIFAR10_TRAIN_BATCHES):
                lo, hi = bounds[b], bounds[b + 1]
                _dump_py2_pickle(out / f"data_batch_{b + 1}", {
                    b"batch_label": f"training batch {b + 1} of {_CIFAR10_TRAIN_BATCHES}".encode(),
                    b"labels": [c for c, _ in samples[lo:hi]],
                    b"data": rows[lo:hi],
                    b"filenames": filenames(samples[lo:hi]),
                })
            samples, rows = split_data["test"]
            _dump_py2_pickle(out / "test_batch", {
                b"batch_label": b"testing batch 1 of 1", b"labels": [c for c, _ in samples], b"data": rows,
                b"filenames": filenames(samples)})
            _dump_py2_pickle(out / "batches.meta", {
                b"num_cases_per_batch": int(bounds[1] - bounds[0]), b"label_names": names,
                b"num_vis": 3 * CIFAR_IMAGE_SIZE ** 2})
        else:
            for split, label in (("train", b"training batch 1 of 1"), ("test", b"testing batch 1 of 1")):
                samples, rows = split_data[split]
                _dump_py2_pickle(out / split, {
                    b"filenames": filenames(samples), b"batch_label": label,
                    b"fine_labels": [c for c, _ in samples],
                    b"coarse_labels": [c // CIFAR_COARSE_GROUP for c, _ in samples], b"data": rows})
            _dump_py2_pickle(out / "meta", {
                b"fine_label_names": names, b"coarse_label_names": [n.encode() for n in meta["coarse_classes"]]})

    def verify(existing: Path) -> None:
        _check_files_exist([existing / f for f in files], existing)

    start = time.perf_counter()
    generated = _write_atomically(folder, meta, write_files, verify)
    return {**meta, "root": str(folder), "generated": generated, "seconds": time.perf_counter() - start}
