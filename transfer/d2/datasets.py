"""Datasets for detection transfer: the real VOC / COCO splits (detectron2's own names) and our synthetic sets.

Real data: detectron2 registers ``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``, ``coco_2017_train``,
``coco_2017_val``, ... on import, under ``$DETECTRON2_DATASETS`` (default ``./datasets``) holding ``VOC2007/``,
``VOC2012/`` and ``coco/``. :func:`check_datasets` turns a missing folder into an error that says so before a run
starts, instead of a traceback from inside a data-loader worker.

Synthetic data (``tools/make_data.py voc ROOT/VOC2007`` and ``coco ROOT/coco``): ``DATASETS.SYNTHETIC_ROOT ROOT``
registers ``shapes_voc_2007_{trainval,train,val,test}`` and ``shapes_coco_{train,val}`` with the class names stored
in each set's ``meta.json``.
"""
import json
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc

SYNTHETIC_VOC_SPLITS = ("trainval", "train", "val", "test")
SYNTHETIC_COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def _classes(meta_path: str) -> List[str]:
    with open(meta_path) as f:
        return list(json.load(f)["classes"])


def _register(name: str, register, **metadata) -> None:
    if name in DatasetCatalog.list():  # registering twice (e.g. setup() called again in one process): replace
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register()
    MetadataCatalog.get(name).set(**metadata)


def register_synthetic(root: str) -> List[str]:
    """Register the synthetic sets found under ``root`` (``VOC2007/`` and/or ``coco/``); returns their names."""
    names = []
    voc = os.path.join(root, "VOC2007")
    if os.path.isfile(os.path.join(voc, "meta.json")):
        classes = _classes(os.path.join(voc, "meta.json"))
        for split in SYNTHETIC_VOC_SPLITS:
            name = f"shapes_voc_2007_{split}"
            _register(name, lambda n=name, s=split: register_pascal_voc(n, voc, s, 2007, classes),
                      evaluator_type="pascal_voc")
            names.append(name)
    coco = os.path.join(root, "coco")
    if os.path.isfile(os.path.join(coco, "meta.json")):
        for split, folder in SYNTHETIC_COCO_SPLITS.items():
            name = f"shapes_coco_{split}"
            json_file = os.path.join(coco, "annotations", f"instances_{folder}.json")
            _register(name, lambda n=name, j=json_file, f=folder: register_coco_instances(
                n, {}, j, os.path.join(coco, f)))
            names.append(name)
    if not names:
        raise FileNotFoundError(
            f"DATASETS.SYNTHETIC_ROOT {root!r} holds no synthetic set (no VOC2007/meta.json or coco/meta.json); "
            f"write them with: python tools/make_data.py voc {root}/VOC2007 (and coco {root}/coco)")
    return names


def _required_files(name: str) -> List[str]:
    """The files a registered dataset needs on disk (empty for names we cannot check)."""
    meta = MetadataCatalog.get(name)
    if hasattr(meta, "dirname") and hasattr(meta, "split"):  # VOC
        return [os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt"),
                os.path.join(meta.dirname, "Annotations"), os.path.join(meta.dirname, "JPEGImages")]
    if hasattr(meta, "json_file"):  # COCO
        return [meta.json_file, meta.image_root]
    return []


def check_datasets(names) -> None:
    """Fail before training if a dataset is unknown or its files are missing, naming the fix."""
    known = set(DatasetCatalog.list())
    for name in names:
        if name not in known:
            raise KeyError(f"dataset {name!r} is not registered. Real VOC/COCO: detectron2's names (e.g. "
                           f"voc_2007_trainval, coco_2017_train) under $DETECTRON2_DATASETS; synthetic: shapes_* "
                           f"with DATASETS.SYNTHETIC_ROOT set")
        missing = [p for p in _required_files(name) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"dataset {name!r} needs {missing[0]}, which does not exist. Put VOC2007/, VOC2012/ and coco/ in one "
                f"folder and set DETECTRON2_DATASETS to it (currently "
                f"{os.environ.get('DETECTRON2_DATASETS', 'unset: ./datasets')}), or for the synthetic sets set "
                f"DATASETS.SYNTHETIC_ROOT")
