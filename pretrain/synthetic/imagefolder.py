"""The ImageNet layout that ``torchvision.datasets.ImageFolder`` reads: ``root/{train,val}/<class>/<image>.jpg``."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Union

from .rendering import encode_jpeg, image_rng, make_classification_image
from .shapes import _check_num_classes, class_folder_name, class_names
from .writer import (GENERATOR_VERSION, META_FILENAME, DatasetMismatchError, _resolve_workers, _run_tasks,
                     _write_atomically)


def _write_imagefolder_class(out: str, split: str, class_id: int, count: int, image_size: int, seed: int,
                             jpeg_quality: int) -> None:
    """All images of one (split, class): the unit of work of one worker process."""
    name = class_folder_name(class_id)
    d = Path(out) / split / name
    d.mkdir(parents=True)
    for i in range(count):
        img = make_classification_image(image_rng(seed, "imagefolder", split, class_id, i), class_id,
                                        image_size)
        (d / f"{name}_{i:05d}.jpg").write_bytes(encode_jpeg(img, jpeg_quality))


def imagefolder_meta(num_classes: int, train_per_class: int, val_per_class: int, image_size: int,
                     seed: int, jpeg_quality: int = 90) -> dict:
    """The ``meta.json`` content that identifies an ImageFolder dataset (every generation argument)."""
    _check_num_classes(num_classes)
    return {
        "generator": "pretrain.synthetic",
        "generator_version": GENERATOR_VERSION,
        "layout": "imagefolder",
        "classes": class_names(num_classes),
        "num_classes": num_classes,
        "splits": {"train": train_per_class, "val": val_per_class},
        "image_size": image_size,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
    }


def write_imagefolder(root: Union[str, os.PathLike], num_classes: int = 10, train_per_class: int = 300,
                      val_per_class: int = 50, image_size: int = 64, seed: int = 0,
                      jpeg_quality: int = 90, workers: Optional[int] = None) -> dict:
    """Write ``root/{train,val}/<cNN_name>/<cNN_name>_<i:05d>.jpg`` + ``root/meta.json``, the layout of
    ImageNet that ``torchvision.datasets.ImageFolder`` reads.

    Byte-identical for identical arguments. If ``root`` already holds the same dataset (same meta, same file
    counts) it returns at once; if it holds anything else it raises :class:`DatasetMismatchError`.
    ``workers``: processes to generate with (default: all cores, at most 8, for 1000+ images; the output
    does not depend on it). Returns the meta dict plus ``root``, ``generated`` (False when skipped) and
    ``seconds``.
    """
    if train_per_class < 0 or val_per_class < 0 or image_size < 8:
        raise ValueError("per-class counts must be >= 0 and image_size >= 8")
    root = Path(root)
    meta = imagefolder_meta(num_classes, train_per_class, val_per_class, image_size, seed, jpeg_quality)
    splits = meta["splits"]

    def write_files(out: Path) -> None:
        # A split of 0 images is not written at all: ImageFolder refuses class folders without images.
        tasks = [(str(out), split, class_id, per_class, image_size, seed, jpeg_quality)
                 for split, per_class in splits.items() if per_class > 0 for class_id in range(num_classes)]
        num_images = num_classes * sum(splits.values())
        _run_tasks(_write_imagefolder_class, tasks, _resolve_workers(workers, num_images))

    def verify(existing: Path) -> None:
        # A cheap completeness check (a listing, no decoding): catches hand-deleted or truncated copies.
        for split, per_class in splits.items():
            for name in meta["classes"]:
                d = existing / split / name
                n = sum(1 for p in d.iterdir() if p.suffix == ".jpg") if d.is_dir() else 0
                if n != per_class:
                    raise DatasetMismatchError(
                        f"{d} has {n} images, its {META_FILENAME} promises {per_class}: the dataset is "
                        f"incomplete or was modified. Delete {existing} to regenerate it.")

    start = time.perf_counter()
    generated = _write_atomically(root, meta, write_files, verify)
    return {**meta, "root": str(root), "generated": generated, "seconds": time.perf_counter() - start}
