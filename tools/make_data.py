#!/usr/bin/env python
"""Write synthetic stand-ins for the datasets of the paper, in their real on-disk layouts.

    python tools/make_data.py imagefolder OUT --num-classes 10 --train-per-class 300 --val-per-class 50 \\
        --image-size 64 --seed 0

One subcommand per layout (``imagefolder`` now; ``cifar``, ``voc``, ``coco`` slot in beside it). Output is
deterministic for given arguments; an existing identical dataset is reused, anything else at OUT is refused.
All logic lives in :mod:`pretrain.synthetic`; this file only parses arguments and reports.
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain import synthetic  # noqa: E402


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output directory (created; must be absent, empty, or the same dataset)")
    p.add_argument("--seed", type=int, default=0, help="non-negative; the same seed gives the same bytes")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: all cores up to 8 for 1000+ images; does not change the output)")


def _imagefolder(args: argparse.Namespace) -> None:
    info = synthetic.write_imagefolder(args.out, num_classes=args.num_classes,
                                       train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                       image_size=args.image_size, seed=args.seed,
                                       jpeg_quality=args.jpeg_quality, workers=args.workers)
    verb = "wrote" if info["generated"] else "found identical, reused"
    counts = ", ".join(f"{split}: {n} x {info['num_classes']}" for split, n in info["splits"].items())
    print(f"{verb} ImageFolder dataset {info['root']} ({info['num_classes']} classes, {counts} images of "
          f"{info['image_size']} px, seed {info['seed']}) in {info['seconds']:.1f} s")
    print(f"classes: {' '.join(info['classes'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="layout", required=True)

    p = sub.add_parser("imagefolder", help="ImageNet layout: OUT/{train,val}/<class>/<class>_NNNNN.jpg")
    _add_common(p)
    p.add_argument("--num-classes", type=int, default=10, help=f"1..{synthetic.MAX_CLASSES} shape classes")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64, help="square side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.set_defaults(func=_imagefolder)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except synthetic.DatasetMismatchError as e:
        # An expected refusal, not a bug: one clear line instead of a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
