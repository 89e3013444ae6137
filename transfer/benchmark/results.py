"""The benchmark's one results table: runs x protocols from every stage's results.json, the paper's number beside ours
where the paper reports that cell, per-stage wall time and images/s, and the plots (grouped bars per protocol as
the paper's Figures 5 and 6, the hidden-dimension curve of Figure 9 when the runs sweep it, the training curves).
"""
import json
import math
import os
from typing import Dict, List, Optional

from .stage import DETECTION_STAGES, Stage, read_results, write_json

# (stage kind, cell name, where in its results.json): the table's columns, in this order
CELLS = (
    ("knn", "knn_top1", ("top1",)), ("knn", "knn_top5", ("top5",)),
    ("linear", "linear_top1", ("top1",)), ("linear", "linear_top5", ("top5",)),
    ("semi_1pct", "semi_1pct_top1", ("top1",)), ("semi_1pct", "semi_1pct_top5", ("top5",)),
    ("semi_10pct", "semi_10pct_top1", ("top1",)), ("semi_10pct", "semi_10pct_top5", ("top5",)),
    ("cifar10", "cifar10_top1", ("top1",)), ("cifar100", "cifar100_top1", ("top1",)),
    ("voc", "voc_ap", ("bbox", "AP")), ("voc", "voc_ap50", ("bbox", "AP50")), ("voc", "voc_ap75", ("bbox", "AP75")),
    ("coco", "coco_box_ap", ("bbox", "AP")), ("coco", "coco_box_ap50", ("bbox", "AP50")),
    ("coco", "coco_box_ap75", ("bbox", "AP75")), ("coco", "coco_mask_ap", ("segm", "AP")),
    ("coco", "coco_mask_ap50", ("segm", "AP50")), ("coco", "coco_mask_ap75", ("segm", "AP75")),
)
PLOTTED = ("knn_top1", "linear_top1", "semi_1pct_top1", "semi_10pct_top1", "cifar10_top1", "cifar100_top1",
           "voc_ap50", "coco_box_ap", "coco_mask_ap")


def _cell(kind: str, results: dict, where) -> Optional[float]:
    if kind in DETECTION_STAGES:  # {dataset: {task: {AP, ...}}}; one test set per protocol
        results = next(iter(results.values()), {})
    for key in where:
        results = results.get(key) if isinstance(results, dict) else None
    if results is None or (isinstance(results, float) and math.isnan(results)):
        return None
    return float(results)


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def images_per_second(stage: Stage, results: dict, timing: dict) -> Optional[float]:
    """Images the stage processed per second of its wall time, where that count is known (None otherwise, and for
    a pretraining that resumed: its wall time covers only the last attempt)."""
    wall = timing.get("wall_s")
    if not wall:
        return None
    if stage.kind == "pretrain" and not timing.get("resumed") and results.get("iterations"):
        return results["iterations"] * stage.info["images_per_iter"] / wall
    if stage.kind == "knn":
        return (results.get("train_images", 0) + results.get("val_images", 0)) / wall
    if stage.kind in ("linear", "semi_1pct", "semi_10pct", "cifar10", "cifar100") and "epochs" in results:
        return results.get("train_images", 0) * results["epochs"] / wall
    if stage.kind == "tsne":
        return results.get("images", 0) / wall
    return None


def collect(cfg, stages: List[Stage]) -> dict:
    """{"runs": [one dict per run: cells, paper cells, stage dirs], "stages": [status, wall time, images/s]}."""
    from .paper import load_paper_numbers, paper_cells

    numbers = load_paper_numbers()
    out = os.path.abspath(cfg.OUTPUT_DIR)
    runs: Dict[str, dict] = {}
    stage_rows = []
    for stage in stages:
        if stage.kind == "report":
            continue
        results = read_results(stage)
        timing = _read(os.path.join(stage.out, "stage.json"))
        ips = images_per_second(stage, results or {}, timing) if results else None
        stage_rows.append({"stage": stage.name, "status": "done" if results is not None else "not done",
                           "wall_s": timing.get("wall_s"), "images_per_s": None if ips is None else round(ips, 1),
                           "dir": os.path.relpath(stage.out, out),
                           "log": os.path.relpath(os.path.join(stage.out, "stage.log"), out)})
        if stage.run is None:
            continue
        run = stage.run
        row = runs.setdefault(run.name, {
            "run": run.name, "method": run.template, "values": run.values,
            "group": " ".join(str(v) for k, v in run.values.items() if k != "seed"),
            "seed": run.values.get("seed"), "paper_key": run.paper, "evaluate": run.evaluate,
            "paper": paper_cells(run.paper, numbers), "cells": {}, "dirs": {}, "hidden_dim": None})
        if results is None:
            continue
        if stage.kind == "export":
            row.update(arch=results.get("arch"), params_m=results.get("params_m"),
                       hidden_dim=(results.get("head") or {}).get("hidden_dim"))
        if stage.kind == "tsne":
            row["tsne_png"] = os.path.relpath(results["png"], out)
        for kind, name, where in CELLS:
            if kind == stage.kind:
                value = _cell(kind, results, where)
                if value is not None:
                    row["cells"][name] = round(value, 2)
                    row["dirs"][name] = os.path.relpath(stage.out, out)
    return {"runs": [r for r in runs.values() if r["evaluate"]], "stages": stage_rows}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(cfg, data: dict, plots: Dict[str, str]) -> str:
    runs = data["runs"]
    columns = [name for _, name, _ in CELLS if any(name in r["cells"] or name in r["paper"] for r in runs)]
    lines = [f"# Benchmark results: {os.path.abspath(cfg.OUTPUT_DIR)}", "",
             "Ours, linked to the stage that produced it; the paper's number in parentheses where the paper reports "
             "that cell (transfer/benchmark/paper_numbers.yaml). Top-1 / top-5 in %, AP as detectron2 reports it.",
             "", "| run | arch | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in runs:
        cells = []
        for name in columns:
            ours = (f"[{r['cells'][name]:.2f}]({r['dirs'][name]}/)" if name in r["cells"] else "-")
            cells.append(ours + (f" ({r['paper'][name]:g})" if name in r["paper"] else ""))
        lines.append(f"| {r['run']} | {r.get('arch') or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "## Stages", "", "| stage | status | wall time (s) | images/s | log |", "|---|---|---|---|---|"]
    for s in data["stages"]:
        wall = "-" if s["wall_s"] is None else f"{s['wall_s']:.1f}"
        ips = "-" if s["images_per_s"] is None else f"{s['images_per_s']:.1f}"
        lines.append(f"| [{s['stage']}]({s['dir']}/) | {s['status']} | {wall} | {ips} | [log]({s['log']}) |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def plot_rows(data: dict) -> List[dict]:
    return [{"run": r["run"], "method": r["method"], "group": r["group"], "seed": r["seed"],
             "hidden_dim": r["hidden_dim"], "cells": r["cells"], "paper": r["paper"]} for r in data["runs"]]


def write_report(cfg, stages: List[Stage]) -> dict:
    """OUTPUT_DIR/results.json and results.md (and the plots) from whatever stages are done; returns the data."""
    from transfer.plots import hidden_dim_sweeps, plot_hidden_dim, plot_protocol_bars, plot_training_curves

    out = os.path.abspath(cfg.OUTPUT_DIR)
    data = collect(cfg, stages)
    rows = plot_rows(data)
    plots = {}
    metrics = [m for m in PLOTTED if any(m in r["cells"] for r in rows)]
    if metrics:
        plots["protocols"] = os.path.relpath(plot_protocol_bars(rows, os.path.join(out, "protocols.png"), metrics),
                                             out)
    if any(hidden_dim_sweeps(rows, "linear_top1").values()):
        plots["hidden_dim"] = os.path.relpath(plot_hidden_dim(rows, os.path.join(out, "hidden_dim.png")), out)
    curves = {s.run.name: s.out for s in stages if s.kind == "pretrain" and read_results(s) is not None}
    if curves:
        plots["training_curves"] = os.path.relpath(plot_training_curves(curves, os.path.join(out, "curves.png")),
                                                   out)
    table = markdown(cfg, data, plots)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    write_json(os.path.join(out, "results.json"), {**data, "plots": plots, "table": table})
    return data
