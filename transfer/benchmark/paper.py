"""The paper's published numbers (``paper_numbers.yaml`` beside this file), read and validated for the benchmark's
results table: one entry per paper row, keyed ``<table>/<teacher>/<student>/<method>`` (e.g. ``table1/r50/r18/disco``),
each with a ``source`` and a ``row`` string and the metrics the paper prints for that row (percent)."""
import difflib
import os
from typing import Dict, Optional

import yaml

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_numbers.yaml")

METRICS = ("linear_top1", "linear_top5", "knn_top1",
           "semi_1pct_top1", "semi_1pct_top5", "semi_10pct_top1", "semi_10pct_top5",
           "cifar10_top1", "cifar100_top1",
           "voc_ap", "voc_ap50", "voc_ap75",
           "coco_box_ap", "coco_box_ap50", "coco_box_ap75",
           "coco_mask_ap", "coco_mask_ap50", "coco_mask_ap75")


def load_paper_numbers(path: Optional[str] = None) -> Dict[str, dict]:
    """``{key: {"source": str, "row": str, metric: number, ...}}`` from ``path`` (default: the shipped file).

    Raises ValueError naming the key (and field) for a key without 4 '/'-separated parts, a missing or non-string
    ``source`` / ``row``, a field that is not in :data:`METRICS`, or a metric whose value is not an int or float."""
    path = path or DEFAULT_PATH
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of <table>/<teacher>/<student>/<method> keys")
    for key, entry in data.items():
        parts = str(key).split("/")
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"{path}: key {key!r} is not <table>/<teacher>/<student>/<method>")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {key}: expected a mapping with source, row and metrics")
        for field in ("source", "row"):
            if not isinstance(entry.get(field), str):
                raise ValueError(f"{path}: {key}: field {field!r} must be a string")
        for field, value in entry.items():
            if field in ("source", "row"):
                continue
            if field not in METRICS:
                close = difflib.get_close_matches(str(field), METRICS, n=3)
                raise ValueError(f"{path}: {key}: unknown field {field!r}"
                                 + (f" (did you mean {', '.join(close)}?)" if close else "")
                                 + f"; metrics are {', '.join(METRICS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}: {key}: field {field!r} must be a number, got {value!r}")
    return data


def paper_cells(key: str, numbers: Dict[str, dict]) -> dict:
    """``{metric: value}`` of one paper row (``source`` / ``row`` dropped); ``""`` -> ``{}`` (a row the paper does
    not have). An unknown key raises ValueError listing the 5 closest keys."""
    if not key:
        return {}
    if key not in numbers:
        close = difflib.get_close_matches(key, list(numbers), n=5, cutoff=0.0)
        raise ValueError(f"no paper row {key!r}; closest: {', '.join(close)}")
    return {m: v for m, v in numbers[key].items() if m in METRICS}
