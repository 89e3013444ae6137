"""A study made of many ``tools/compare_distillers.py`` runs -- one ``--output-dir`` per cell of a grid (a DisCo loss
weight, a teacher setting, ...) -- as one table and sweep points (tools/collect_studies.py).

Each cell's ``DIR/results.json`` is what compare_distillers writes: ``overrides`` (the flat ``KEY VALUE ...`` list
given to every student pretraining), ``teacher`` (``knn_top1``, ``linear_top1``, ``export``, ...), ``summary``
(``{method: {"seeds": [...], "knn_top1": {"mean", "std", "n"}, "linear_top1": {...}, ...}}``) and ``runs`` (one
record per (method, seed) with its ``knn_top1`` / ``linear_top1``). A row of :func:`load_cells` is one (cell,
method)::

    {"dir": str, "method": str, "overrides": {KEY: VALUE str}, "teacher_knn": float | None,
     "teacher_linear": float | None, "knn": (mean, std | None, n), "linear": (mean, std | None, n),
     "per_seed_knn": [float, ...], "per_seed_linear": [float, ...], "seeds": [int, ...]}

with the per-seed values in the order of ``seeds`` (ascending, as in the summary).
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

Stat = Tuple[Optional[float], Optional[float], int]  # (mean, sample std or None with one seed, n)


def _flat_overrides(words, path: str) -> Dict[str, str]:
    """``{KEY: VALUE}`` (both strings) of a flat ``[KEY, VALUE, KEY, VALUE, ...]`` list; an odd length is an error
    naming ``path``."""
    words = [str(w) for w in (words or [])]
    if len(words) % 2:
        raise ValueError(f"{path}: 'overrides' {words} is not a list of KEY VALUE pairs (odd length)")
    return dict(zip(words[0::2], words[1::2]))


def _stat(summary: dict, metric: str) -> Stat:
    s = summary.get(metric) or {}
    return (s.get("mean"), s.get("std"), int(s.get("n") or 0))


def _read_results(folder: str) -> dict:
    """The parsed ``folder/results.json``; ValueError naming the file when it is missing or is not compare_distillers'
    output, saying which command writes it."""
    path = os.path.join(folder, "results.json")
    rerun = f"run tools/compare_distillers.py --output-dir {folder} first"
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: {rerun}")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): {rerun}") from None
    missing = [k for k in ("summary", "runs", "teacher") if not isinstance(results, dict) or k not in results]
    if missing:
        raise ValueError(f"{path} is not a results.json of tools/compare_distillers.py (no {', '.join(missing)}): "
                         f"{rerun}")
    return results


def load_cells(dirs: Sequence[str]) -> List[dict]:
    """One row (see the module docstring) per (directory, method) of the compare_distillers output folders ``dirs``,
    in the given folder order and each folder's summary order. ``knn`` / ``linear`` are the summary's mean, sample std
    and n; ``per_seed_knn`` / ``per_seed_linear`` the records of ``runs`` in ascending seed order, which must be the
    summary's seeds. A missing or unreadable results.json, or one whose runs disagree with its summary, is a
    ValueError naming the file."""
    rows = []
    for folder in dirs:
        results = _read_results(folder)
        path = os.path.join(folder, "results.json")
        try:
            overrides = _flat_overrides(results.get("overrides"), path)
            teacher = results["teacher"] or {}
            for method, s in results["summary"].items():
                records = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["seed"])
                seeds = [r["seed"] for r in records]
                if seeds != list(s["seeds"]):
                    raise ValueError(f"{path}: the runs of {method!r} have seeds {seeds}, its summary {s['seeds']}")
                rows.append({"dir": folder, "method": method, "overrides": overrides,
                             "teacher_knn": teacher.get("knn_top1"), "teacher_linear": teacher.get("linear_top1"),
                             "knn": _stat(s, "knn_top1"), "linear": _stat(s, "linear_top1"),
                             "per_seed_knn": [r["knn_top1"] for r in records],
                             "per_seed_linear": [r["linear_top1"] for r in records], "seeds": seeds})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a results.json of tools/compare_distillers.py ({type(e).__name__}: "
                             f"{e}): run tools/compare_distillers.py --output-dir {folder} first") from None
    return rows


def cell_label(overrides: Dict[str, str]) -> str:
    """``KEY VALUE, KEY VALUE`` (full keys, given order), or ``defaults`` without overrides."""
    return ", ".join(f"{k} {v}" for k, v in overrides.items()) or "defaults"


def format_stat(stat: Stat) -> str:
    """``59.3 +- 1.1``; a single value without +-; ``-`` for none."""
    mean, std, n = stat
    if not n or mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} +- {std:.1f}"


def _value(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a markdown table cell cannot hold a bare |


def markdown(rows: Sequence[dict]) -> str:
    """The markdown table of :func:`load_cells` rows, in their order: ``| cell (overrides) | method | teacher kNN /
    linear | kNN top-1 | linear top-1 | per-seed linear | seeds |`` with 1 decimal (``mean +- std``)."""
    lines = ["| cell (overrides) | method | teacher kNN / linear | kNN top-1 | linear top-1 | per-seed linear "
             "| seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        teacher = f"{_value(r['teacher_knn'])} / {_value(r['teacher_linear'])}"
        cells = [cell_label(r["overrides"]), r["method"], teacher,
                 format_stat(r["knn"]), format_stat(r["linear"]), " ".join(_value(v) for v in r["per_seed_linear"]),
                 " ".join(map(str, r["seeds"]))]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def sweep_points(rows: Sequence[dict], key: str, method: str, default=None,
                 metric: str = "linear") -> List[tuple]:
    """``[(x, mean, std or None, n, per-seed values), ...]`` sorted by x, of ``metric`` (``"linear"`` or ``"knn"``)
    for the rows of ``method`` whose overrides are exactly ``{key: value}`` (x = ``float(value)``), and, when
    ``default`` is given, the rows of ``method`` without any override at x = ``float(default)`` (the config's own
    value of ``key``). Rows with other or further overrides are not part of the sweep. A non-numeric value, or two
    rows at the same x, is a ValueError naming the directories."""
    if metric not in ("linear", "knn"):
        raise ValueError(f"metric must be 'linear' or 'knn', not {metric!r}")
    by_x = {}
    for r in rows:
        if r["method"] != method:
            continue
        if set(r["overrides"]) == {key}:
            value = r["overrides"][key]
        elif not r["overrides"] and default is not None:
            value = default
        else:
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{r['dir']}: {key} {value!r} is not a number, not a point of a sweep") from None
        if not math.isfinite(x):
            raise ValueError(f"{r['dir']}: {key} {value!r} is not a finite number")
        if x in by_x:
            raise ValueError(f"two cells of {method!r} at {key} = {x:g}: {by_x[x]['dir']} and {r['dir']}; keep one")
        by_x[x] = r
    return [(x, *by_x[x][metric], list(by_x[x][f"per_seed_{metric}"])) for x in sorted(by_x)]
