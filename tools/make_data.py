#!/usr/bin/env python
"""Write synthetic stand-ins for the datasets of the paper, in their real on-disk layouts.

    python tools/make_data.py imagefolder OUT --num-classes 10 --train-per-class 300 --val-per-class 50 \\
        --image-size 64 --seed 0

    python tools/make_data.py cifar OUT --variant cifar10 --train-per-class 500 --test-per-class 100
    python tools/make_data.py subset IMAGEFOLDER_ROOT OUT/1percent.txt --percent 1
    python tools/make_data.py voc OUT/VOC2007 --num-classes 4 --trainval-images 200 --test-images 100
    python tools/make_data.py coco OUT/coco --num-classes 4 --train-images 200 --val-images 50

One subcommand per layout: ``imagefolder`` (ImageNet), ``cifar`` (CIFAR-10/100 python pickles), ``subset``
(SimCLR's 1percent.txt list), ``voc`` (one VOC year directory), ``coco`` (COCO 2017). Output is deterministic for
given arguments; an existing identical dataset is reused, anything else at OUT is refused.
All logic lives in :mod:`pretrain.synthetic`; this file only parses arguments and reports.
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain import synthetic  # noqa: E402  (no torch: --help stays fast)
from pretrain.cli import HelpFormatter  # noqa: E402


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


def _verb(info: dict) -> str:
    return "wrote" if info["generated"] else "found identical, reused"


def _cifar(args: argparse.Namespace) -> None:
    info = synthetic.write_cifar(args.out, variant=args.variant, num_classes=args.num_classes,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                 seed=args.seed, workers=args.workers)
    counts = ", ".join(f"{split}: {n} x {info['num_classes']}" for split, n in info["splits"].items())
    print(f"{_verb(info)} {info['variant']} dataset {info['root']} ({info['num_classes']} classes, {counts} images "
          f"of 32 px, seed {info['seed']}) in {info['seconds']:.1f} s")


def _subset(args: argparse.Namespace) -> None:
    names = synthetic.write_subset_list(args.imagefolder_root, args.out_file, percent=args.percent,
                                        per_class=args.per_class, seed=args.seed)
    how = f"{args.percent:g}% per class" if args.percent is not None else f"{args.per_class} per class"
    print(f"{args.out_file}: {len(names)} images of {args.imagefolder_root}/train ({how}, seed {args.seed})")


def _image_size(values) -> tuple:
    if len(values) not in (1, 2):
        raise ValueError(f"--image-size takes SIDE or WIDTH HEIGHT, got {' '.join(map(str, values))}")
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


def _voc(args: argparse.Namespace) -> None:
    info = synthetic.write_voc(args.out, num_classes=args.num_classes, trainval_images=args.trainval_images,
                               test_images=args.test_images, image_size=_image_size(args.image_size),
                               objects_per_image=tuple(args.objects_per_image), year=args.year, seed=args.seed,
                               workers=args.workers, jpeg_quality=args.jpeg_quality)
    w, h = info["image_size"]
    print(f"{_verb(info)} VOC{info['year']} dataset {info['root']} ({info['num_classes']} classes, trainval "
          f"{info['splits']['trainval']} / test {info['splits']['test']} images of {w}x{h} px, seed {info['seed']}) "
          f"in {info['seconds']:.1f} s")


def _coco(args: argparse.Namespace) -> None:
    info = synthetic.write_coco(args.out, num_classes=args.num_classes, train_images=args.train_images,
                                val_images=args.val_images, image_size=_image_size(args.image_size),
                                objects_per_image=tuple(args.objects_per_image), seed=args.seed,
                                workers=args.workers, jpeg_quality=args.jpeg_quality)
    w, h = info["image_size"]
    print(f"{_verb(info)} COCO 2017 dataset {info['root']} ({info['num_classes']} classes, train2017 "
          f"{info['splits']['train2017']} / val2017 {info['splits']['val2017']} images of {w}x{h} px, "
          f"seed {info['seed']}) in {info['seconds']:.1f} s")


def _add_detection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-classes", type=int, default=4, help=f"1..{synthetic.MAX_CLASSES} shape classes")
    p.add_argument("--image-size", type=int, nargs="+", default=[128], metavar="PX",
                   help="SIDE, or WIDTH HEIGHT, in pixels")
    p.add_argument("--objects-per-image", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"),
                   help="objects attempted per image (non-overlapping; a crowded image may hold fewer)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="PIL JPEG quality, 1 (worst) to 95 (best)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/make_data.py", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="layout", required=True, metavar="LAYOUT",
                                help="the dataset layout to write; `tools/make_data.py LAYOUT --help` for its options")

    def add_layout(name: str, what: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, description=what, formatter_class=HelpFormatter)

    p = add_layout("imagefolder", "ImageNet layout: OUT/{train,val}/<class>/<class>_NNNNN.jpg")
    _add_common(p)
    p.add_argument("--num-classes", type=int, default=10, help=f"1..{synthetic.MAX_CLASSES} shape classes")
    p.add_argument("--train-per-class", type=int, default=300, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class")
    p.add_argument("--image-size", type=int, default=64, help="square side in pixels")
    p.add_argument("--jpeg-quality", type=int, default=90, help="PIL JPEG quality, 1 (worst) to 95 (best)")
    p.set_defaults(func=_imagefolder)

    p = add_layout("cifar", "CIFAR python pickles: OUT/cifar-10-batches-py/ or OUT/cifar-100-python/")
    _add_common(p)
    p.add_argument("--variant", choices=["cifar10", "cifar100"], default="cifar10", help="which CIFAR to imitate")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"1..{synthetic.MAX_CLASSES} shape classes (default 10 for cifar10, "
                        f"{synthetic.MAX_CLASSES} for cifar100)")
    p.add_argument("--train-per-class", type=int, default=500, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    p.set_defaults(func=_cifar)

    p = add_layout("subset", "SimCLR-style 1percent.txt: a class-balanced list of train image names")
    p.add_argument("imagefolder_root", help="an ImageFolder root holding train/<class>/<images>")
    p.add_argument("out_file", help="the list to write (must be absent or identical)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--percent", type=float, help="percent of each class's images (at least 1 per class)")
    how.add_argument("--per-class", type=int, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="non-negative; the same seed gives the same list")
    p.set_defaults(func=_subset)

    p = add_layout("voc", "one VOC year directory: OUT/{JPEGImages,Annotations,ImageSets/Main}")
    _add_common(p)
    _add_detection(p)
    p.add_argument("--trainval-images", type=int, default=200, help="images of the trainval split")
    p.add_argument("--test-images", type=int, default=100, help="images of the test split")
    p.add_argument("--year", default="2007", help="written into the xml <folder> as VOC<year>")
    p.set_defaults(func=_voc)

    p = add_layout("coco", "COCO 2017: OUT/{train2017,val2017}/*.jpg + OUT/annotations/instances_*.json")
    _add_common(p)
    _add_detection(p)
    p.add_argument("--train-images", type=int, default=200, help="images of train2017")
    p.add_argument("--val-images", type=int, default=50, help="images of val2017")
    p.set_defaults(func=_coco)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad arguments (counts, sizes, class numbers, a missing ImageFolder root): the message names the fix.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except synthetic.DatasetMismatchError as e:
        # An expected refusal, not a bug: one clear line instead of a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
