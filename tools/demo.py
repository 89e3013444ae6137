#!/usr/bin/env python
"""The README's main job, end to end on the CPU in minutes:

1. write a synthetic ImageNet-layout dataset (``tools/make_data.py imagefolder``);
2. pretrain a small MoCo-v2 teacher (``configs/pretrain/quickstart_teacher.yaml``);
3. distil a student from it with DisCo (``quickstart.yaml``) and, with the same budget, train the same student with
   MoCo-v2 only (``quickstart_moco.yaml``) -- the two students train side by side in two processes;
4. print the kNN accuracy of the teacher and both students on the held-out split;
5. a linear probe of each frozen backbone (``configs/eval/quick_linear.yaml``: cached features, 100 epochs, seconds),
   a t-SNE figure of the three models' features (``tsne.png``, the paper's Figure 8) and the training curves
   (``curves.png``); write ``results.json``.

Every stage auto-resumes from its OUTPUT_DIR, so an interrupted demo continues where it stopped.

    python tools/demo.py [--output-dir runs/demo] [KEY VALUE ...]   (overrides apply to all three runs)
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

import torch  # noqa: E402

from pretrain.backbones import build_backbone  # noqa: E402
from pretrain.cli import HelpFormatter, LauncherParser  # noqa: E402
from pretrain.config import setup_cfg  # noqa: E402
from pretrain.export import load_exported_backbone  # noqa: E402
from pretrain.knn import KnnData, knn_evaluate  # noqa: E402
from pretrain.synthetic import write_imagefolder  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.linear import run_linear_probe  # noqa: E402
from transfer.plots import plot_training_curves  # noqa: E402
from transfer.tsne import run_tsne  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "pretrain")
EVAL_CONFIGS = os.path.join(ROOT, "configs", "eval")


def stage_cfg(name: str, out: str, data: str, opts, extra=()):
    return setup_cfg(os.path.join(CONFIGS, name), ["OUTPUT_DIR", os.path.join(out, name.replace(".yaml", "")),
                                                   "DATA.TRAIN_DIR", os.path.join(data, "train"),
                                                   "DATA.VAL_DIR", os.path.join(data, "val"), *extra, *opts])


def train(cfg, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    exports = Trainer(cfg).run()
    return {"export": exports["backbone"], "head": exports["head"], "minutes": (time.perf_counter() - t0) / 60}


def _train_in_child(cfg, threads, queue):
    try:
        queue.put(("ok", train(cfg, threads)))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))
        raise


def train_side_by_side(cfgs):
    """Train several configs at once, one single-threaded process each: on a small CPU, two 1-thread processes get
    far more done than one 2-thread process on these tiny images."""
    ctx = mp.get_context("spawn")
    queues, procs = [], []
    for cfg in cfgs:
        q = ctx.Queue()
        p = ctx.Process(target=_train_in_child, args=(cfg, 1, q))
        p.start()
        queues.append(q)
        procs.append(p)
    results = []
    for cfg, p, q in zip(cfgs, procs, queues):
        status, value = q.get()
        p.join()
        if status != "ok":
            raise RuntimeError(f"training {cfg.OUTPUT_DIR} failed: {value}")
        results.append(value)
    return results


def build_parser() -> argparse.ArgumentParser:
    """Flags and KEY VALUE overrides in any order (:class:`pretrain.cli.LauncherParser`)."""
    p = LauncherParser(prog="tools/demo.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="everything goes here: data/, one folder per stage")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic dataset")
    p.add_argument("--train-per-class", type=int, default=300, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="held-out images per class (kNN, linear, t-SNE)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (data, training, evaluation)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="pretraining config overrides for all three runs (pretrain/config.py), e.g. SOLVER.EPOCHS 2")
    return p


def main():
    args = build_parser().parse_args()
    out = os.path.abspath(args.output_dir)
    t0 = time.perf_counter()

    data = os.path.join(out, "data")
    info = write_imagefolder(data, num_classes=args.num_classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, image_size=args.image_size, seed=0)
    print(f"[demo] data: {data} ({info['num_classes']} classes, {info['splits']} images per class, "
          f"{args.image_size} px)", flush=True)

    size = ["DATA.IMAGE_SIZE", str(args.image_size), "TEST.KNN.IMAGE_SIZE", str(args.image_size)]
    teacher_cfg = stage_cfg("quickstart_teacher.yaml", out, data, args.opts, size)
    print(f"[demo] 1/4 MoCo-v2 teacher {teacher_cfg.MODEL.STUDENT.ARCH}, {teacher_cfg.SOLVER.EPOCHS} epochs",
          flush=True)
    teacher = train(teacher_cfg, 1)  # 1 compute thread + 1 data worker beats 2 threads on 32-px images

    disco_cfg = stage_cfg("quickstart.yaml", out, data, args.opts,
                          size + ["MODEL.TEACHER.WEIGHTS", teacher["export"],
                                  "MODEL.TEACHER.ARCH", teacher_cfg.MODEL.STUDENT.ARCH])
    moco_cfg = stage_cfg("quickstart_moco.yaml", out, data, args.opts, size)
    print(f"[demo] 2/4 students {disco_cfg.MODEL.STUDENT.ARCH}, {disco_cfg.SOLVER.EPOCHS} epochs each: DisCo and "
          f"MoCo-v2 side by side", flush=True)
    disco, moco = train_side_by_side([disco_cfg, moco_cfg])

    print("[demo] 3/4 kNN evaluation on the held-out split", flush=True)
    knn_data = KnnData(os.path.join(data, "train"), os.path.join(data, "val"), args.image_size)
    rows = [("teacher (MoCo-v2)", teacher_cfg, teacher), ("student DisCo", disco_cfg, disco),
            ("student MoCo-v2", moco_cfg, moco)]
    results = {"data": {"root": data, **{k: info[k] for k in ("num_classes", "splits", "image_size", "seed")}}}
    for name, cfg, res in rows:
        backbone, meta = load_exported_backbone(res["export"])
        acc = knn_evaluate(backbone, knn_data, torch.device("cpu"), cfg.TEST.KNN.K, cfg.TEST.KNN.TEMPERATURE)
        params = sum(p.numel() for p in backbone.parameters()) / 1e6
        results[name] = {"arch": meta["arch"], "method": meta["method"], "params_m": round(params, 2),
                         "epochs": meta["epoch"], "knn_top1": round(acc["top1"], 2), "knn_top5": round(acc["top5"], 2),
                         "train_minutes": round(res["minutes"], 2), "export": res["export"], "head": res["head"],
                         "output_dir": cfg.OUTPUT_DIR}
    # The floor both students must beat: the same student architecture, untrained (a random CNN's features are
    # far above chance on these shapes, so the learned rows mean little without it).
    random_name, student_arch = "student random init", disco_cfg.MODEL.STUDENT.ARCH
    torch.manual_seed(0)
    backbone = build_backbone(student_arch)
    acc = knn_evaluate(backbone, knn_data, torch.device("cpu"), disco_cfg.TEST.KNN.K, disco_cfg.TEST.KNN.TEMPERATURE)
    results[random_name] = {"arch": student_arch, "method": "none", "epochs": 0,
                            "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2),
                            "knn_top1": round(acc["top1"], 2), "knn_top5": round(acc["top5"], 2)}

    print("[demo] 4/4 linear probes (cached features), t-SNE figure, training curves", flush=True)
    eval_data = ["DATA.NAME", "demo", "DATA.TRAIN_DIR", os.path.join(data, "train"), "DATA.VAL_DIR",
                 os.path.join(data, "val"), "DATA.IMAGE_SIZE", str(args.image_size), "DATA.VAL_RESIZE",
                 str(args.image_size)]
    probes = [(name, os.path.basename(cfg.OUTPUT_DIR), ["MODEL.WEIGHTS", res["export"]]) for name, cfg, res in rows]
    probes.append((random_name, "random_init", ["MODEL.WEIGHTS", "random", "MODEL.ARCH", student_arch]))
    for name, folder, weights in probes:
        probe = run_linear_probe(setup_eval_cfg(os.path.join(EVAL_CONFIGS, "quick_linear.yaml"), [
            "OUTPUT_DIR", os.path.join(out, "linear", folder), *weights, *eval_data]))
        results[name].update(linear_top1=round(probe["top1"], 2), linear_top5=round(probe["top5"], 2),
                             linear_output_dir=probe["output_dir"])
    tsne = run_tsne(setup_eval_cfg("", [
        "OUTPUT_DIR", os.path.join(out, "tsne"), "MODEL.WEIGHTS", rows[0][2]["export"], "TSNE.COMPARE_WEIGHTS",
        str([disco["export"], moco["export"]]), "TSNE.NUM_CLASSES", str(min(10, info["num_classes"])),
        "TSNE.PER_CLASS", str(min(50, info["splits"]["val"])), "DATA.NUM_WORKERS", "0",
        "DATA.INTERPOLATION", "bicubic", *eval_data]))
    curves = plot_training_curves({name: cfg.OUTPUT_DIR for name, cfg, _ in rows}, os.path.join(out, "curves.png"))
    results.update(tsne_png=tsne["png"], curves_png=curves)
    results["minutes_total"] = round((time.perf_counter() - t0) / 60, 2)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n{'model':20s} {'arch':14s} {'params':>7s} {'epochs':>6s} {'kNN top-1':>10s} {'kNN top-5':>10s} "
          f"{'linear top-1':>13s} {'linear top-5':>13s}")
    for name in [row[0] for row in rows] + [random_name]:
        r = results[name]
        print(f"{name:20s} {r['arch']:14s} {r['params_m']:6.2f}M {r['epochs']:6d} {r['knn_top1']:10.2f} "
              f"{r['knn_top5']:10.2f} {r['linear_top1']:13.2f} {r['linear_top5']:13.2f}")
    chance = 100.0 / info["num_classes"]
    print(f"(weighted kNN, k={teacher_cfg.TEST.KNN.K}, and a linear probe on frozen features (100 epochs, cached), on "
          f"{info['splits']['val'] * info['num_classes']} held-out images; chance = {chance:.1f}%) total "
          f"{results['minutes_total']:.1f} min; {os.path.join(out, 'results.json')}")
    print(f"t-SNE: {tsne['png']}  training curves: {curves}")


if __name__ == "__main__":
    main()
