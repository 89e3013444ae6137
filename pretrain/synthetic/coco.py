"""COCO 2017 (what sits at ``$DETECTRON2_DATASETS/coco``): images and ``instances_*.json`` with polygon masks."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .scenes import _check_objects_per_image, _detection_meta, _scene_objects, _scene_tasks, _write_scene_images
from .shapes import Object, Size, polygon_area
from .writer import (_check_count, _check_file_count, _check_files_exist, _check_image_size, _resolve_workers,
                     _run_tasks, _write_atomically)


# --------------------------------------------------------------------------------------------------------
# COCO 2017 (what sits at $DETECTRON2_DATASETS/coco)
# --------------------------------------------------------------------------------------------------------

_COCO_SPLITS = ("train2017", "val2017")
# Fixed, so the json is byte-identical run to run.
_COCO_INFO = {"description": "Synthetic shapes in the COCO 2017 layout (pretrain.synthetic)", "url": "",
              "version": "1.0", "year": 2017, "contributor": "pretrain.synthetic", "date_created": "2017/09/01"}
_COCO_LICENSES = [{"id": 1, "name": "procedurally generated, no restrictions", "url": ""}]


def coco_annotation(obj: Object, ann_id: int, image_id: int) -> dict:
    """A COCO instance: the polygon (2 decimals, as COCO stores them), its shoelace area, its box [x, y, w, h]."""
    poly = np.round(obj.polygon, 2)
    x, y = poly[:, 0], poly[:, 1]
    area = polygon_area(poly)
    x0, y0, x1, y1 = float(x.min()), float(y.min()), float(x.max()), float(y.max())
    return {"id": ann_id, "image_id": image_id, "category_id": obj.class_id + 1,
            "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]], "area": round(area, 2),
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "iscrowd": 0}


def write_coco(root: Union[str, os.PathLike], num_classes: int = 4, train_images: int = 200, val_images: int = 50,
               image_size: Size = 128, objects_per_image: Tuple[int, int] = (1, 3), seed: int = 0,
               workers: Optional[int] = None, jpeg_quality: int = 90) -> dict:
    """Write the COCO 2017 layout at ``root`` (what sits at ``$DETECTRON2_DATASETS/coco``):
    ``{train2017,val2017}/<12-digit id>.jpg`` and ``annotations/instances_{train2017,val2017}.json`` with
    ``info``, ``licenses``, ``images``, ``annotations`` (polygon ``segmentation``, polygon ``area``, ``bbox``
    [x, y, w, h], ``iscrowd`` 0) and ``categories`` (ids from 1, names ``class_names(num_classes)``,
    supercategory ``shape``). Image ids are 1.. over train then val; annotation ids likewise.

    Scenes are the VOC writer's (:func:`sample_scene`; image ``i`` of split ``train``/``val`` draws from
    ``scene_rng(seed, "coco", split, i)``). Returns the meta dict plus ``root``, ``generated``, ``seconds``.
    """
    _check_count("train_images", train_images)
    _check_count("val_images", val_images)
    size = _check_image_size(image_size, 16)
    opi = _check_objects_per_image(objects_per_image)
    root = Path(root)
    meta = _detection_meta("coco", num_classes, {"train2017": train_images, "val2017": val_images}, size, opi,
                           seed, jpeg_quality)
    categories = [{"supercategory": "shape", "id": c + 1, "name": n} for c, n in enumerate(meta["classes"])]

    def write_files(out: Path) -> None:
        (out / "annotations").mkdir()
        next_image, next_ann, tasks = 1, 1, []
        for folder, split in zip(_COCO_SPLITS, ("train", "val")):
            (out / folder).mkdir()
            count = meta["splits"][folder]
            image_ids = list(range(next_image, next_image + count))
            next_image += count
            file_names = [f"{i:012d}.jpg" for i in image_ids]
            images, annotations = [], []
            for image_id, name, objects in zip(image_ids, file_names,
                                               _scene_objects(seed, "coco", split, count, num_classes, size, opi)):
                images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1],
                               "license": 1})
                for obj in objects:
                    annotations.append(coco_annotation(obj, next_ann, image_id))
                    next_ann += 1
            with open(out / "annotations" / f"instances_{folder}.json", "w") as f:
                json.dump({"info": _COCO_INFO, "licenses": _COCO_LICENSES, "images": images,
                           "annotations": annotations, "categories": categories}, f)
            tasks += _scene_tasks(out / folder, "coco", split, file_names, num_classes, size, opi, seed,
                                  jpeg_quality)
        _run_tasks(_write_scene_images, tasks, _resolve_workers(workers, train_images + val_images))

    def verify(existing: Path) -> None:
        for folder in _COCO_SPLITS:
            _check_file_count(existing / folder, ".jpg", meta["splits"][folder], existing)
        _check_files_exist([existing / "annotations" / f"instances_{f}.json" for f in _COCO_SPLITS], existing)

    start = time.perf_counter()
    generated = _write_atomically(root, meta, write_files, verify)
    return {**meta, "root": str(root), "generated": generated, "seconds": time.perf_counter() - start}
