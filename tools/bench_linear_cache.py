#!/usr/bin/env python
"""Time the CIFAR linear protocol with and without the feature cache, in one process, on a synthetic CIFAR-10.

Both runs use configs/eval/cifar10.yaml (no augmentation, lr 3, /10 at 60 and 80) with the same seed, so they see the
same batches in the same order; the uncached run forwards the frozen backbone on every batch of every epoch, the
cached one extracts the features once. Prints both top-1 and the speed ratio.

    python tools/bench_linear_cache.py [--arch resnet18] [--epochs 100] [--image-size 64] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

import torch  # noqa: E402

from pretrain.synthetic import write_cifar  # noqa: E402
from transfer.config import setup_eval_cfg  # noqa: E402
from transfer.linear import run_linear_probe  # noqa: E402

ROOT = os.path.dirname(_TOOLS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="backbone (randomly initialised: the timing is what matters)")
    p.add_argument("--epochs", type=int, default=100, help="the protocol's 100; the ratio grows with it")
    p.add_argument("--image-size", type=int, default=64,
                   help="resize 32 -> this (the protocol's 224 takes ~12x longer per forward on a CPU)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="", help="where data and runs go (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_linear_cache_")
    data = os.path.join(work, "cifar")
    write_cifar(data, "cifar10", num_classes=args.classes, train_per_class=args.train_per_class,
                test_per_class=args.test_per_class, seed=0)
    steps = f"({round(args.epochs * 0.6)}, {round(args.epochs * 0.8)})"
    results = {}
    for cached in (True, False):
        out = os.path.join(work, "cached" if cached else "uncached")
        cfg = setup_eval_cfg(os.path.join(ROOT, "configs/eval/cifar10.yaml"), [
            "OUTPUT_DIR", out, "MODEL.WEIGHTS", "random", "MODEL.ARCH", args.arch, "DATA.ROOT", data,
            "DATA.IMAGE_SIZE", str(args.image_size), "DATA.VAL_RESIZE", str(args.image_size), "DATA.NUM_WORKERS", "0",
            "SOLVER.EPOCHS", str(args.epochs), "SOLVER.STEPS", steps, "SOLVER.IMS_PER_BATCH", str(args.batch),
            "SOLVER.CACHE_FEATURES", str(cached), "SOLVER.MAX_TO_KEEP", "1"])
        if os.path.isdir(os.path.join(out, "checkpoints")):
            raise FileExistsError(f"{out} holds an earlier run (it would resume); use an empty --workdir")
        t = time.perf_counter()
        results[cached] = run_linear_probe(cfg)
        results[cached]["wall"] = time.perf_counter() - t
    c, u = results[True], results[False]
    n_train, n_test = args.classes * args.train_per_class, args.classes * args.test_per_class
    print(f"\nCIFAR-10 linear protocol, {args.arch} (random init), synthetic {args.classes} classes, {n_train} train / "
          f"{n_test} test images, 32 -> {args.image_size} px bicubic, {args.epochs} epochs, batch {args.batch}, "
          f"{args.threads} threads")
    print(f"  uncached (backbone every epoch): {u['wall']:8.1f} s   top-1 {u['top1']:.2f}  top-5 {u['top5']:.2f}")
    print(f"  cached features:                 {c['wall']:8.1f} s   top-1 {c['top1']:.2f}  top-5 {c['top5']:.2f}   "
          f"(feature extraction {c['cache_seconds']:.1f} s)")
    print(f"  speed-up {u['wall'] / c['wall']:.1f}x, top-1 difference {abs(u['top1'] - c['top1']):.2f} points")


if __name__ == "__main__":
    main()
