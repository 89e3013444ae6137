"""PASCAL VOC: one year directory (what sits at ``VOCdevkit/VOC2007``), XML annotations and ``ImageSets/Main``."""
from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from .scenes import (_check_objects_per_image, _detection_meta, _scene_objects, _scene_tasks, _write_scene_images,
                     is_difficult, voc_box)
from .shapes import Object, Size
from .writer import (_check_count, _check_file_count, _check_files_exist, _check_image_size, _resolve_workers,
                     _run_tasks, _write_atomically)


# --------------------------------------------------------------------------------------------------------
# PASCAL VOC (one year directory, e.g. VOCdevkit/VOC2007)
# --------------------------------------------------------------------------------------------------------

_VOC_SPLITS = ("train", "val", "trainval", "test")


def _voc_xml(file_id: str, year: str, size: Tuple[int, int], objects: Sequence[Object]) -> bytes:
    """One ``Annotations/<id>.xml`` as real VOC writes it (tab-indented, no XML declaration)."""
    w, h = size
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = f"VOC{year}"
    ET.SubElement(ann, "filename").text = f"{file_id}.jpg"
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "pretrain.synthetic shapes"
    ET.SubElement(source, "annotation").text = f"PASCAL VOC{year} layout"
    ET.SubElement(source, "image").text = "procedural"
    size_el = ET.SubElement(ann, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for obj in objects:
        el = ET.SubElement(ann, "object")
        ET.SubElement(el, "name").text = obj.class_name
        ET.SubElement(el, "pose").text = "Unspecified"
        # Objects lie wholly inside the image (sample_object keeps them there), so none is truncated.
        ET.SubElement(el, "truncated").text = "0"
        ET.SubElement(el, "difficult").text = str(int(is_difficult(obj, size)))
        box = ET.SubElement(el, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), voc_box(obj, size)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="unicode").encode() + b"\n"


def write_voc(root: Union[str, os.PathLike], num_classes: int = 4, trainval_images: int = 200,
              test_images: int = 100, image_size: Size = 128, objects_per_image: Tuple[int, int] = (1, 3),
              year: str = "2007", seed: int = 0, workers: Optional[int] = None, jpeg_quality: int = 90) -> dict:
    """Write one PASCAL VOC year directory at ``root`` (what sits at ``VOCdevkit/VOC2007``, i.e. detectron2's
    ``$DETECTRON2_DATASETS/VOC2007``), readable by ``detectron2.data.datasets.pascal_voc.load_voc_instances``
    and its VOC evaluator:

    - ``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml``, ids ``000001``... (trainval first, then test);
    - ``ImageSets/Main/{train,val,trainval,test}.txt`` (train = even trainval positions, val = odd) and
      ``<class>_<split>.txt`` with VOC's flags: 1 present, 0 only as difficult, -1 absent.

    Scenes come from :func:`sample_scene` (image ``i`` of split ``trainval``/``test`` draws from
    ``scene_rng(seed, "voc", split, i)``). Boxes are 1-based inclusive pixels (:func:`voc_box`); objects whose
    longer side is under 10% of the image are ``difficult`` (about 10% of objects); ``truncated`` is always 0.
    ``image_size``: side or (width, height). Returns the meta dict plus ``root``, ``generated``, ``seconds``.
    """
    _check_count("trainval_images", trainval_images)
    _check_count("test_images", test_images)
    size = _check_image_size(image_size, 16)
    opi = _check_objects_per_image(objects_per_image)
    year = str(year)
    if not (len(year) == 4 and year.isdigit()):
        raise ValueError(f"year must be four digits like '2007', got {year!r}")
    root = Path(root)
    meta = _detection_meta("voc", num_classes, {"trainval": trainval_images, "test": test_images}, size, opi,
                           seed, jpeg_quality)
    meta["year"] = year
    names = meta["classes"]
    ids = {"trainval": [f"{i + 1:06d}" for i in range(trainval_images)],
           "test": [f"{trainval_images + i + 1:06d}" for i in range(test_images)]}
    ids["train"], ids["val"] = ids["trainval"][0::2], ids["trainval"][1::2]

    def write_files(out: Path) -> None:
        for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (out / d).mkdir(parents=True)
        flags = {}  # id -> per class: 1 present, 0 only difficult, -1 absent
        for split in ("trainval", "test"):
            scenes = _scene_objects(seed, "voc", split, len(ids[split]), num_classes, size, opi)
            for file_id, objects in zip(ids[split], scenes):
                (out / "Annotations" / f"{file_id}.xml").write_bytes(_voc_xml(file_id, year, size, objects))
                f = [-1] * num_classes
                for obj in objects:
                    f[obj.class_id] = max(f[obj.class_id], 0 if is_difficult(obj, size) else 1)
                flags[file_id] = f
        tasks = [t for split in ("trainval", "test") for t in _scene_tasks(
            out / "JPEGImages", "voc", split, [f"{i}.jpg" for i in ids[split]], num_classes, size, opi, seed,
            jpeg_quality)]
        _run_tasks(_write_scene_images, tasks, _resolve_workers(workers, trainval_images + test_images))
        main = out / "ImageSets" / "Main"
        for split in _VOC_SPLITS:
            (main / f"{split}.txt").write_text("".join(i + "\n" for i in ids[split]))
            for c, name in enumerate(names):
                (main / f"{name}_{split}.txt").write_text("".join(f"{i} {flags[i][c]:2d}\n" for i in ids[split]))

    def verify(existing: Path) -> None:
        for d, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
            _check_file_count(existing / d, suffix, trainval_images + test_images, existing)
        _check_files_exist([existing / "ImageSets" / "Main" / f"{s}.txt" for s in _VOC_SPLITS], existing)

    start = time.perf_counter()
    generated = _write_atomically(root, meta, write_files, verify)
    return {**meta, "root": str(root), "generated": generated, "seconds": time.perf_counter() - start}
