#!/usr/bin/env python
"""The paper's Table 2 at the demo's scale, with seeds: kNN and linear top-1 of MoCo-v2, DisCo, SEED, CompRess, AT,
RKD, AT + DisCo, RKD + DisCo, KD (MoCo-v2 + KD) and DisCo + KD as mean +- std over seeds -- the same teacher, the same
student, the same budget.

1. the demo's synthetic data (OUTPUT_DIR/data) and a teacher: --teacher (an export .pth), or
   configs/pretrain/quickstart_teacher.yaml trained once into OUTPUT_DIR/teacher (SEED 0); the teacher's own linear
   probe (OUTPUT_DIR/linear/teacher) is the KD teacher classifier;
2. every (method, seed) student pretraining (OUTPUT_DIR/<method>/seed<k>, SEED k), --jobs single-threaded processes
   at a time; a run whose export exists is not trained again and a partial one resumes, so rerunning continues;
3. kNN and a linear probe (configs/eval/quick_linear.yaml, SEED k, OUTPUT_DIR/linear/<method>/seed<k>) of every
   student; the KD rows are probes only: kd / disco_kd = the MoCo-v2 / DisCo student's export probed with KD from the
   teacher's probe (KD.REDUCTION mean, the official code), disco_kd_batchmean the same with Hinton's batchmean;
4. OUTPUT_DIR/results.json (every run, mean / std / n per method, overrides, minutes, CPU) and results.md (printed).

    python tools/compare_distillers.py --output-dir runs/compare [KEY VALUE ...] --seeds 0 1 2 [--methods NAME ...]

KEY VALUE overrides apply to every student pretraining (not to the teacher); put them before --seeds / --methods
(or after --), which take every word that follows.
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

import torch  # noqa: E402

from pretrain.cli import HelpFormatter, LauncherParser  # noqa: E402
from pretrain.cfgdiff import check_resume  # noqa: E402
from pretrain.cfgnode import cfg_value  # noqa: E402
from pretrain.config import SAFE_ON_RESUME, current_form, setup_cfg  # noqa: E402
from pretrain.export import load_exported_backbone  # noqa: E402
from pretrain.knn import KnnData, knn_evaluate  # noqa: E402
from pretrain.precision import AUTO_KEYS  # noqa: E402
from pretrain.synthetic import write_imagefolder  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.linear import run_linear_probe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "pretrain")
QUICK_LINEAR = os.path.join(ROOT, "configs", "eval", "quick_linear.yaml")

METHODS = {  # name: (pretraining config in configs/pretrain, what it is, the paper's Table 2 R-18 linear top-1)
    "mocov2": ("quickstart_moco.yaml", "MoCo-v2 alone, no teacher", 52.2),
    "disco": ("quickstart.yaml", "MoCo-v2 + DisCo", 60.6),
    "seed": ("compare/quickstart_seed.yaml", "SEED (paper: Table 1)", 57.6),
    "compress": ("compare/quickstart_compress.yaml", "CompRess-2q", None),
    "attention": ("compare/quickstart_attention.yaml", "MoCo-v2 + attention transfer (AT)", 56.2),
    "rkd": ("compare/quickstart_rkd.yaml", "MoCo-v2 + RKD (distance + angle)", 56.4),
    "attention_disco": ("compare/quickstart_attention_disco.yaml", "MoCo-v2 + AT + DisCo", 60.2),
    "rkd_disco": ("compare/quickstart_rkd_disco.yaml", "MoCo-v2 + RKD + DisCo", 60.6),
    # Table 5 (the SwAV testbed) and Table 6 (DINO): not Table 2 rows; their paper numbers are other students'
    "swav": ("compare/quickstart_swav.yaml", "SwAV alone, no teacher (paper Table 5: Eff-b0 46.8)", None),
    "swav_disco": ("compare/quickstart_swav_disco.yaml", "SwAV + DisCo (paper Table 5: Eff-b0 62.4)", None),
    "dino": ("compare/quickstart_dino.yaml", "DINO alone, demo ViT (paper Table 6: ViT-tiny 55)", None),
    "dino_disco": ("compare/quickstart_dino_disco.yaml", "DINO + DisCo, demo ViT (paper Table 6: ViT-tiny 68.4)",
                   None),
}
KD_ROWS = {  # name: (the student whose export is probed, KD.REDUCTION, what it is, the paper's value)
    "kd": ("mocov2", "mean", "KD: the MoCo-v2 student, probe with KD (official mean)", 51.5),
    "disco_kd": ("disco", "mean", "KD + DisCo: the DisCo student, probe with KD (official mean)", 60.6),
    "disco_kd_batchmean": ("disco", "batchmean", "KD + DisCo, KD with Hinton's batchmean", 60.6),
}
ROWS = list(METHODS) + list(KD_ROWS)  # the table's order
NO_TEACHER = ("mocov2", "swav", "dino")  # students trained without a teacher
OTHER_TESTBEDS = ("swav", "swav_disco", "dino", "dino_disco")  # run when named (--methods), not by default
METRICS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")


def mean_std(values) -> dict:
    """Mean and sample standard deviation (n - 1; None for a single value) of ``values``."""
    values = list(values)
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def fmt(stat: dict) -> str:
    """``52.31 +- 1.20``; a single value without +-; ``-`` for none."""
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:.2f}" if stat["std"] is None else f"{stat['mean']:.2f} +- {stat['std']:.2f}"


def summarize(runs) -> dict:
    """{method: {"seeds", and mean_std of each metric}} over ``runs`` (dicts with method, seed, METRICS), in ROWS
    order."""
    summary = {}
    for method in ROWS:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            summary[method] = {"seeds": sorted(r["seed"] for r in mine),
                               **{m: mean_std(r[m] for r in mine) for m in METRICS}}
    return summary


def describe(method: str):
    """(what it is, the paper's Table 2 R-18 linear top-1 or None)."""
    row = METHODS.get(method) or KD_ROWS[method][2:]
    return row[-2], row[-1]


def markdown_table(summary: dict) -> str:
    lines = ["| method | what it is | kNN top-1 | linear top-1 | seeds | paper (Table 2, R-18) |",
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        what, paper = describe(method)
        knn = fmt(s["knn_top1"]) + (f" (= {KD_ROWS[method][0]})" if method in KD_ROWS else "")
        seeds = " ".join(map(str, s["seeds"]))
        lines.append(f"| {method} | {what} | {knn} | {fmt(s['linear_top1'])} | {seeds} | "
                     f"{'-' if paper is None else f'{paper:.1f}'} |")
    return "\n".join(lines)


def export_path(cfg) -> str:
    return os.path.join(cfg.OUTPUT_DIR, "export", f"{cfg.MODEL.STUDENT.ARCH}.pth")


def _train(cfg) -> float:
    """One pretraining run in this (spawned) process with one compute thread; its minutes."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if Trainer(cfg).run() is None:
        raise RuntimeError(f"{cfg.OUTPUT_DIR} stopped before its last iteration (TRAIN.STOP_AT_ITER); run again")
    return round((time.perf_counter() - t0) / 60, 2)


def train_runs(cfgs: dict, jobs: int) -> dict:
    """Train every config of ``cfgs`` ({(name, seed): cfg}) without an export yet, ``jobs`` single-threaded
    processes at a time (on a small CPU, 1-thread processes get far more done than one 2-thread process on these
    tiny images), each reported on one line as it ends; an exported run must have the same config. {(name, seed): minutes} of the runs trained now."""
    todo = {}
    for key, cfg in cfgs.items():
        if not os.path.isfile(export_path(cfg)):
            todo[key] = cfg
        else:  # finished, but only counts with this config: refuse other values of keys that matter, as a resume
            # does (keys left to "auto" may have resolved to either value, as on a resume)
            auto = tuple(k for k in AUTO_KEYS if cfg_value(cfg, k) == "auto")
            saved = current_form(load_exported_backbone(export_path(cfg))[1]["config"])
            check_resume(saved, cfg, SAFE_ON_RESUME + auto, "TRAIN.RESUME_CHANGED_CONFIG", export_path(cfg))
    print(f"[compare] {len(todo)} run(s) to train, {len(cfgs) - len(todo)} already exported (not retrained)",
          flush=True)
    minutes, failed = {}, []
    if todo:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train, cfg): key for key, cfg in todo.items()}
            for future in as_completed(futures):
                (name, seed), error = futures[future], future.exception()
                if error is None:
                    minutes[name, seed] = future.result()
                    print(f"[compare] trained {name} seed {seed}: {minutes[name, seed]:.1f} min "
                          f"({len(minutes)}/{len(todo)})", flush=True)
                else:
                    failed.append(f"{name} seed {seed} ({todo[name, seed].OUTPUT_DIR}): {type(error).__name__}: "
                                  f"{error}")
                    print(f"[compare] FAILED {failed[-1]}", flush=True)
    if failed:
        raise RuntimeError("pretraining failed: " + "; ".join(failed))
    return minutes


def previous_minutes(out: str) -> dict:
    """{(name, seed): training minutes} recorded in OUTPUT_DIR/results.json by an earlier invocation: a run that is
    not retrained keeps its time."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    return {("teacher", 0): old["teacher"]["train_minutes"],
            **{(r["method"], r["seed"]): r["train_minutes"] for r in old["runs"] if "train_minutes" in r}}


def cpu_model() -> str:
    """The "model name" of /proc/cpuinfo (the timings depend on it), else platform.processor()."""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def build_parser() -> argparse.ArgumentParser:
    """Flags and KEY VALUE overrides in any order (:class:`pretrain.cli.LauncherParser`)."""
    p = LauncherParser(prog="tools/compare_distillers.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default="runs/compare", help="everything goes here: data/, teacher/, one folder "
                   "per method, linear/, results.json, results.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SEED of every student run and probe")
    p.add_argument("--methods", nargs="+", choices=ROWS, metavar="NAME",
                   help=f"rows of the table, default: all but the other testbeds' ({', '.join(OTHER_TESTBEDS)}; "
                        f"a KD row trains the student it probes too): {', '.join(ROWS)}")
    p.add_argument("--teacher", default="", help="the teacher's export .pth (default: train quickstart_teacher.yaml)")
    p.add_argument("--jobs", type=int, default=2, help="pretraining runs at a time, one thread each")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic dataset")
    p.add_argument("--train-per-class", type=int, default=300, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="held-out images per class (kNN, linear)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (data, training, evaluation)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="pretraining config overrides for every student run (pretrain/config.py), e.g. SOLVER.EPOCHS 5")
    return p


def main():
    args = build_parser().parse_args()
    out = os.path.abspath(args.output_dir)
    t0 = time.perf_counter()
    minutes = previous_minutes(out)
    methods = args.methods or [m for m in ROWS if m not in OTHER_TESTBEDS]
    kd_rows = [m for m in methods if m in KD_ROWS]
    students = [m for m in METHODS if m in methods or any(KD_ROWS[k][0] == m for k in kd_rows)]

    data = os.path.join(out, "data")
    info = write_imagefolder(data, num_classes=args.num_classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, image_size=args.image_size, seed=0)
    common = ["DATA.TRAIN_DIR", os.path.join(data, "train"), "DATA.VAL_DIR", os.path.join(data, "val"),
              "DATA.IMAGE_SIZE", str(args.image_size), "TEST.KNN.IMAGE_SIZE", str(args.image_size)]
    teacher = {"export": os.path.abspath(args.teacher), "train_minutes": None}
    if not args.teacher:
        cfg = setup_cfg(os.path.join(CONFIGS, "quickstart_teacher.yaml"),
                        ["OUTPUT_DIR", os.path.join(out, "teacher"), *common, "SEED", "0"])
        print(f"[compare] teacher {cfg.MODEL.STUDENT.ARCH} (MoCo-v2), {cfg.SOLVER.EPOCHS} epochs", flush=True)
        minutes.update(train_runs({("teacher", 0): cfg}, 1))
        teacher.update(export=export_path(cfg), train_minutes=minutes.get(("teacher", 0)))
    teacher["arch"] = load_exported_backbone(teacher["export"])[1]["arch"]

    cfgs, overrides = {}, {}
    for method in students:
        for seed in args.seeds:
            overrides[method, seed] = ["OUTPUT_DIR", os.path.join(out, method, f"seed{seed}"), *common, "SEED",
                                       str(seed), *([] if method in NO_TEACHER else [
                                           "MODEL.TEACHER.WEIGHTS", teacher["export"],
                                           "MODEL.TEACHER.ARCH", teacher["arch"]]), *args.opts]
            cfgs[method, seed] = setup_cfg(os.path.join(CONFIGS, METHODS[method][0]), overrides[method, seed])
    print(f"[compare] students: {', '.join(students)} x seeds {args.seeds}, {args.jobs} at a time", flush=True)
    minutes.update(train_runs(cfgs, args.jobs))

    print("[compare] kNN and linear probes", flush=True)
    torch.set_num_threads(1)  # tiny models and images: one thread is many times faster than two on a busy CPU
    knn_data = KnnData(os.path.join(data, "train"), os.path.join(data, "val"), args.image_size)
    knn_cfg = next(iter(cfgs.values())).TEST.KNN

    def knn(export):
        acc = knn_evaluate(load_exported_backbone(export)[0], knn_data, torch.device("cpu"), knn_cfg.K,
                           knn_cfg.TEMPERATURE)
        return {"knn_top1": round(acc["top1"], 2), "knn_top5": round(acc["top5"], 2)}

    def probe(folder, seed, export, *extra):
        opts = ["OUTPUT_DIR", os.path.join(out, "linear", folder), "SEED", str(seed), "MODEL.WEIGHTS", export,
                "DATA.NAME", "compare", "DATA.TRAIN_DIR", os.path.join(data, "train"), "DATA.VAL_DIR",
                os.path.join(data, "val"), "DATA.IMAGE_SIZE", str(args.image_size), "DATA.VAL_RESIZE",
                str(args.image_size), *extra]
        res = run_linear_probe(setup_eval_cfg(QUICK_LINEAR, opts))
        return {"linear_top1": round(res["top1"], 2), "linear_top5": round(res["top5"], 2),
                "linear_output_dir": res["output_dir"], "linear_overrides": opts, "kd": res["kd"]}

    teacher.update(knn(teacher["export"]), **probe("teacher", 0, teacher["export"]))
    runs = []
    for (method, seed), cfg in cfgs.items():
        runs.append({"method": method, "seed": seed, "export": export_path(cfg), "config": METHODS[method][0],
                     "pretrain_overrides": overrides[method, seed],
                     "train_minutes": minutes.get((method, seed)),
                     **knn(export_path(cfg)), **probe(os.path.join(method, f"seed{seed}"), seed, export_path(cfg))})
    for kd in kd_rows:
        student, reduction = KD_ROWS[kd][:2]
        for r in [r for r in runs if r["method"] == student]:
            runs.append({"method": kd, "seed": r["seed"], "student": student, "export": r["export"],
                         "knn_top1": r["knn_top1"], "knn_top5": r["knn_top5"],
                         **probe(os.path.join(kd, f"seed{r['seed']}"), r["seed"], r["export"],
                                 "KD.TEACHER_CLASSIFIER", teacher["linear_output_dir"], "KD.REDUCTION", reduction)})

    summary = summarize(runs)
    results = {"cpu": cpu_model(), "data": {"root": data, **{k: info[k] for k in ("num_classes", "splits", "image_size")}},
               "teacher": teacher, "seeds": args.seeds, "jobs": args.jobs, "overrides": args.opts,
               "summary": summary, "runs": runs, "minutes_total": round((time.perf_counter() - t0) / 60, 2)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    student_arch = next(iter(cfgs.values())).MODEL.STUDENT.ARCH
    md = (f"# Table 2 at the demo's scale\n\nStudent {student_arch}, teacher {teacher['arch']} (kNN top-1 "
          f"{teacher['knn_top1']:.2f}, linear top-1 {teacher['linear_top1']:.2f}); {info['num_classes']} synthetic "
          f"classes, {info['splits']['train']} / {info['splits']['val']} train / val images per class, "
          f"{args.image_size} px; overrides: {' '.join(args.opts) or 'none'}. Top-1 in %, mean +- sample std over "
          f"seeds. KD rows are linear probes of another row's export: their kNN is that row's.\n\n"
          f"{markdown_table(summary)}\n\n{results['cpu']}, {results['minutes_total']:.1f} min this invocation.\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print("\n" + md + f"{os.path.join(out, 'results.json')}, {os.path.join(out, 'results.md')}")


if __name__ == "__main__":
    main()
