"""Detection scenes, shared by the VOC and COCO writers: several non-overlapping objects per image, their boxes,
VOC's "difficult" rule, the per-image generator, the JPEG worker unit and the detection ``meta.json``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from .rendering import encode_jpeg, image_rng, render
from .shapes import Object, Size, _as_wh, _check_num_classes, class_names, sample_object
from .writer import GENERATOR_VERSION, _chunks

# Scene images are not of one class; they all draw from class slot 0 of their (layout, split).
_SCENE_CLASS_SLOT = 0


# --------------------------------------------------------------------------------------------------------
# Detection scenes: several non-overlapping objects, shared by the VOC and COCO writers
# --------------------------------------------------------------------------------------------------------

# Objects are mostly 15-50% of the shorter side; SMALL_OBJECT_PROB of them are 5-9.5% ("difficult" in VOC terms).
SCENE_SCALE_RANGE = (0.15, 0.5)
SMALL_SCALE_RANGE = (0.05, 0.095)
SMALL_OBJECT_PROB = 0.1
# VOC's "difficult": the longer box side under this fraction of the image's shorter side.
DIFFICULT_FRACTION = 0.1
_PLACEMENT_TRIES = 30


def pixel_box(obj: Object, size: Size) -> Tuple[int, int, int, int]:
    """The pixels an object touches, ``(x0, y0, x1, y1)`` with x1/y1 exclusive, clipped to the canvas."""
    w, h = _as_wh(size)
    x0, y0, x1, y1 = obj.bbox
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(w, math.ceil(x1)), min(h, math.ceil(y1)))


def voc_box(obj: Object, size: Size) -> Tuple[int, int, int, int]:
    """VOC's 1-based inclusive pixel box ``(xmin, ymin, xmax, ymax)``: detectron2 subtracts 1 from xmin/ymin,
    giving back :func:`pixel_box` in continuous coordinates."""
    x0, y0, x1, y1 = pixel_box(obj, size)
    return x0 + 1, y0 + 1, x1, y1


def is_difficult(obj: Object, size: Size) -> bool:
    x0, y0, x1, y1 = obj.bbox
    return max(x1 - x0, y1 - y0) < DIFFICULT_FRACTION * min(_as_wh(size))


def _check_objects_per_image(objects_per_image: Tuple[int, int]) -> Tuple[int, int]:
    try:
        lo, hi = (int(v) for v in objects_per_image)
    except (TypeError, ValueError):
        raise ValueError(f"objects_per_image must be (min, max), got {objects_per_image!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"objects_per_image must satisfy 1 <= min <= max, got {objects_per_image!r}")
    return lo, hi


def sample_scene(rng: np.random.Generator, num_classes: int, size: Size,
                 objects_per_image: Tuple[int, int] = (1, 3)) -> List[Object]:
    """Objects of uniformly random classes in ``[0, num_classes)`` and random sizes whose :func:`pixel_box`es
    are pairwise apart by at least a margin (2% of the shorter side, >= 1 px), so boxes and polygon masks are
    exact: nothing occludes an object but rare small clutter. Up to ``objects_per_image[1]`` are attempted
    (the count drawn uniformly in the range); one that finds no free place in a few tries is dropped, so a
    crowded canvas may hold fewer than ``objects_per_image[0]`` -- never fewer than one.
    """
    _check_num_classes(num_classes)
    lo, hi = _check_objects_per_image(objects_per_image)
    w, h = _as_wh(size)
    margin = max(1, round(0.02 * min(w, h)))
    count = int(rng.integers(lo, hi + 1))
    placed: List[Object] = []
    boxes: List[Tuple[int, int, int, int]] = []
    for _ in range(count):
        class_id = int(rng.integers(num_classes))
        scale = SMALL_SCALE_RANGE if rng.random() < SMALL_OBJECT_PROB else SCENE_SCALE_RANGE
        for _ in range(_PLACEMENT_TRIES):
            obj = sample_object(rng, class_id, (w, h), scale_range=scale)
            b = pixel_box(obj, (w, h))
            if all(b[0] >= o[2] + margin or o[0] >= b[2] + margin or b[1] >= o[3] + margin or o[1] >= b[3] + margin
                   for o in boxes):
                placed.append(obj)
                boxes.append(b)
                break
    return placed


def make_detection_image(rng: np.random.Generator, num_classes: int, size: Size,
                         objects_per_image: Tuple[int, int] = (1, 3)) -> Tuple[Image.Image, List[Object]]:
    """A scene (:func:`sample_scene`) rendered with background, clutter and noise, and its objects."""
    objects = sample_scene(rng, num_classes, size, objects_per_image)
    return render(objects, size, rng), objects


def scene_rng(seed: int, layout: str, split: str, index: int) -> np.random.Generator:
    """The generator of detection image ``index`` (0-based within its split): its scene and pixels."""
    return image_rng(seed, layout, split, _SCENE_CLASS_SLOT, index)


def _write_scene_images(out_dir: str, layout: str, split: str, start: int, stop: int, file_names: Sequence[str],
                        num_classes: int, size: Tuple[int, int], objects_per_image: Tuple[int, int], seed: int,
                        jpeg_quality: int) -> None:
    """Worker unit: JPEGs of images ``start..stop-1`` of a split (named ``file_names``)."""
    for index, name in zip(range(start, stop), file_names):
        img, _ = make_detection_image(scene_rng(seed, layout, split, index), num_classes, size, objects_per_image)
        (Path(out_dir) / name).write_bytes(encode_jpeg(img, jpeg_quality))


def _scene_tasks(out_dir: Path, layout: str, split: str, file_names: Sequence[str], num_classes: int,
                 size: Tuple[int, int], objects_per_image: Tuple[int, int], seed: int,
                 jpeg_quality: int) -> List[tuple]:
    return [(str(out_dir), layout, split, a, b, list(file_names[a:b]), num_classes, size, objects_per_image, seed,
             jpeg_quality) for a, b in _chunks(len(file_names), 32)]


def _scene_objects(seed: int, layout: str, split: str, count: int, num_classes: int, size: Tuple[int, int],
                   objects_per_image: Tuple[int, int]) -> List[List[Object]]:
    """The objects of every image of a split, without rendering (what the annotations are written from)."""
    return [sample_scene(scene_rng(seed, layout, split, i), num_classes, size, objects_per_image)
            for i in range(count)]


def _detection_meta(layout: str, num_classes: int, splits: dict, size: Tuple[int, int],
                    objects_per_image: Tuple[int, int], seed: int, jpeg_quality: int) -> dict:
    _check_num_classes(num_classes)
    return {
        "generator": "pretrain.synthetic",
        "generator_version": GENERATOR_VERSION,
        "layout": layout,
        "classes": class_names(num_classes),
        "num_classes": num_classes,
        "splits": splits,
        "image_size": [size[0], size[1]],  # (width, height); a list so it equals its JSON round trip
        "objects_per_image": list(objects_per_image),
        "seed": seed,
        "jpeg_quality": jpeg_quality,
    }
