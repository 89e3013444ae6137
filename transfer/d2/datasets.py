"""Datasets for detection transfer: the real VOC / COCO splits (detectron2's own names) and our synthetic sets.

Real data: detectron2 registers ``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``, ``coco_2017_train``,
``coco_2017_val``, ... on import, under ``$DETECTRON2_DATASETS`` (default ``./datasets``) holding ``VOC2007/``,
``VOC2012/`` and ``coco/``. :func:`check_datasets` turns a missing folder into an error that says so before a run
starts, instead of a traceback from inside a data-loader worker.

Synthetic data (``tools/make_data.py voc ROOT/VOC2007`` and ``coco ROOT/coco``): ``DATASETS.SYNTHETIC_ROOT ROOT``
registers ``shapes_voc_2007_{trainval,train,val,test}`` and ``shapes_coco_{train,val}`` (those whose files are there)
with the class names stored in each set's ``meta.json``. A run checks only the datasets it uses: training
DATASETS.TRAIN and DATASETS.TEST, ``--eval-only`` DATASETS.TEST alone.
"""
import json
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc

SYNTHETIC_VOC_SPLITS = ("trainval", "train", "val", "test")
SYNTHETIC_COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def _classes(meta_path: str) -> List[str]:
    with open(meta_path) as f:
        return list(json.load(f)["classes"])


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _register(name: str, register, **metadata) -> None:
    _unregister(name)  # registering twice (e.g. setup() called again in one process): replace
    register()
    MetadataCatalog.get(name).set(**metadata)


def _voc_split_file(voc: str, split: str) -> str:
    return os.path.join(voc, "ImageSets", "Main", f"{split}.txt")


def _coco_json(coco: str, folder: str) -> str:
    return os.path.join(coco, "annotations", f"instances_{folder}.json")


def synthetic_files(root: str) -> Dict[str, str]:
    """Every synthetic set name -> the file under ``root`` that holds its list of images (whether it exists or not)."""
    voc, coco = os.path.join(root, "VOC2007"), os.path.join(root, "coco")
    files = {f"shapes_voc_2007_{split}": _voc_split_file(voc, split) for split in SYNTHETIC_VOC_SPLITS}
    files.update({f"shapes_coco_{split}": _coco_json(coco, folder) for split, folder in SYNTHETIC_COCO_SPLITS.items()})
    return files


def register_synthetic(root: str) -> List[str]:
    """Register the synthetic sets found under ``root`` (``VOC2007/`` and/or ``coco/``, each with its
    ``meta.json``): only the splits whose image list exists (a VOC ``ImageSets/Main/<split>.txt``, a COCO
    ``annotations/instances_<split>2017.json``); returns their names. A synthetic set registered before (from
    another root, in the same process) that ``root`` lacks is removed. A run asks :func:`check_datasets` for the
    ones it needs, which names the missing file of a split that is not there."""
    names = []
    voc = os.path.join(root, "VOC2007")
    if os.path.isfile(os.path.join(voc, "meta.json")):
        classes = _classes(os.path.join(voc, "meta.json"))
        for split in SYNTHETIC_VOC_SPLITS:
            name = f"shapes_voc_2007_{split}"
            if not os.path.isfile(_voc_split_file(voc, split)):
                continue
            _register(name, lambda n=name, s=split: register_pascal_voc(n, voc, s, 2007, classes),
                      evaluator_type="pascal_voc")
            names.append(name)
    coco = os.path.join(root, "coco")
    if os.path.isfile(os.path.join(coco, "meta.json")):
        classes = _classes(os.path.join(coco, "meta.json"))
        for split, folder in SYNTHETIC_COCO_SPLITS.items():
            name = f"shapes_coco_{split}"
            json_file = _coco_json(coco, folder)
            if not os.path.isfile(json_file):
                continue
            # thing_classes up front (detectron2 sets them only when the json is loaded; the same list, its
            # categories by id): MODEL.ROI_HEADS.NUM_CLASSES is checked against them before the run starts
            _register(name, lambda n=name, j=json_file, f=folder: register_coco_instances(
                n, {}, j, os.path.join(coco, f)), thing_classes=classes)
            names.append(name)
    for name in synthetic_files(root):
        if name not in names:
            _unregister(name)
    if not names:
        raise FileNotFoundError(
            f"DATASETS.SYNTHETIC_ROOT {root!r} holds no synthetic set (no VOC2007/meta.json or coco/meta.json with "
            f"its image lists); write them with: python tools/make_data.py voc {root}/VOC2007 (and coco {root}/coco)")
    return names


def synthetic_equivalent(name: str) -> str:
    """The synthetic set that stands in for a real VOC / COCO split (``voc_2007_test`` -> ``shapes_voc_2007_test``),
    or "" for a name that has none."""
    if name.startswith("voc_"):
        return "shapes_voc_2007_test" if name.endswith("_test") else "shapes_voc_2007_trainval"
    if name.startswith("coco_"):
        return "shapes_coco_val" if "_val" in name or "_test" in name else "shapes_coco_train"
    return ""


def _required_files(name: str) -> List[str]:
    """The files a registered dataset needs on disk (empty for names we cannot check)."""
    meta = MetadataCatalog.get(name)
    if hasattr(meta, "dirname") and hasattr(meta, "split"):  # VOC
        return [os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt"),
                os.path.join(meta.dirname, "Annotations"), os.path.join(meta.dirname, "JPEGImages")]
    if hasattr(meta, "json_file"):  # COCO
        return [meta.json_file, meta.image_root]
    return []


def _synthetic_hint(name: str, key: str, synthetic_root: str) -> str:
    """How to use the synthetic sets instead of ``name`` (a real dataset), for the error about it."""
    other = synthetic_equivalent(name)
    names = f'{key} ("{other}",)' if other else f"{key} to shapes_* names"
    if synthetic_root:
        return (f"DATASETS.SYNTHETIC_ROOT ({synthetic_root}) registers only the synthetic sets, under their own names "
                f"(shapes_voc_2007_{{trainval,test}}, shapes_coco_{{train,val}}): to use them instead, set {names}")
    return f"or, for the synthetic sets, set DATASETS.SYNTHETIC_ROOT and {names}"


def check_datasets(names, key: str = "DATASETS.TEST", synthetic_root: str = "") -> None:
    """Fail before a run if a dataset it needs is unknown or its files are missing, naming the fix. ``names``: the
    datasets of config ``key`` (DATASETS.TRAIN / DATASETS.TEST, named in the errors); ``synthetic_root``:
    DATASETS.SYNTHETIC_ROOT, for the errors."""
    known = set(DatasetCatalog.list())
    for name in names:
        if name not in known:
            if name.startswith("shapes_") and synthetic_root and name in synthetic_files(synthetic_root):
                raise FileNotFoundError(
                    f"dataset {name!r} ({key}) is not in DATASETS.SYNTHETIC_ROOT {synthetic_root}: "
                    f"{synthetic_files(synthetic_root)[name]} does not exist; write the sets with: python "
                    f"tools/make_data.py voc {synthetic_root}/VOC2007 (and coco {synthetic_root}/coco)")
            raise KeyError(f"dataset {name!r} ({key}) is not registered. Real VOC/COCO: detectron2's names (e.g. "
                           f"voc_2007_trainval, coco_2017_train) under $DETECTRON2_DATASETS; synthetic: "
                           f"shapes_voc_2007_{{trainval,test}}, shapes_coco_{{train,val}} with DATASETS.SYNTHETIC_ROOT "
                           f"set")
        missing = [p for p in _required_files(name) if not os.path.exists(p)]
        if missing:
            if name.startswith("shapes_"):
                raise FileNotFoundError(f"dataset {name!r} ({key}) needs {missing[0]}, which does not exist; write "
                                        f"the synthetic sets again with tools/make_data.py")
            raise FileNotFoundError(
                f"dataset {name!r} ({key}) needs {missing[0]}, which does not exist. Put VOC2007/, VOC2012/ and coco/ "
                f"in one folder and set DETECTRON2_DATASETS to it (currently "
                f"{os.environ.get('DETECTRON2_DATASETS', 'unset: ./datasets')}); "
                f"{_synthetic_hint(name, key, synthetic_root)}")
