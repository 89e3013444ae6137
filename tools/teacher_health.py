#!/usr/bin/env python
"""Is a teacher's projection embedding worth distilling? Its mean pairwise cosine, effective rank and per-dimension
spread on a class-balanced subset of the training images, and the verdict (healthy / COLLAPSED, with what to do).

    python tools/teacher_health.py --config-file configs/pretrain/quickstart.yaml \\
        MODEL.TEACHER.WEIGHTS runs/demo/quickstart_teacher/export/convnet_small.pth [--images 256]

The teacher is MODEL.TEACHER.ARCH / WEIGHTS of the config, the images DATA.TRAIN_DIR (resized and centre-cropped to
DATA.IMAGE_SIZE). The pretrainer runs the same check at the start of every fresh distillation run
(TEST.TEACHER_HEALTH.IMAGES). Exit status 0 whatever the verdict; 2 for a mistake on the command line or in the
config. Logic: pretrain.health.
"""
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import HelpFormatter, LauncherParser  # noqa: E402  (light: --help never imports torch)


def build_parser() -> LauncherParser:
    p = LauncherParser(prog="tools/teacher_health.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="pretraining config (its _BASE_ files are merged first); default: the built-in defaults")
    p.add_argument("--images", type=int, default=None,
                   help="training images to measure on (default: TEST.TEACHER_HEALTH.IMAGES of the config, or 256 "
                        "when that is 0)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU, else cpu)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.TEACHER.WEIGHTS teacher.pth DATA.TRAIN_DIR data/train")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.images is not None and args.images < 2:
        build_parser().error(f"--images {args.images}: measure on at least 2 images")
    from pretrain.cli import user_errors

    with user_errors("pretrain"):
        import torch

        from pretrain.cfgnode import ConfigError
        from pretrain.config import setup_cfg
        from pretrain.health import check_teacher
        from pretrain.teacher import load_teacher

        cfg = setup_cfg(args.config_file, args.opts)
        t = cfg.MODEL.TEACHER
        if not t.WEIGHTS:
            raise ConfigError("MODEL.TEACHER.WEIGHTS is empty: name the teacher checkpoint to check")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher, info = load_teacher(t.WEIGHTS, t.ARCH)
        images = args.images or cfg.TEST.TEACHER_HEALTH.IMAGES or 256
        rec = check_teacher(cfg, teacher.to(device), device, max_images=images)
    print(f"teacher {t.ARCH} from {t.WEIGHTS} ({info['format']} format), {rec['teacher_images']} images of "
          f"{cfg.DATA.TRAIN_DIR}")
    print(f"  projection embedding ({rec['teacher_dim']}-d): mean pairwise cosine {rec['teacher_mean_cosine']:.4f}, "
          f"effective rank {rec['teacher_effective_rank']:.2f}, per-dimension std {rec['teacher_std']:.4g} "
          f"(evenly spread: {rec['teacher_std_uniform']:.4g})")
    print(f"  backbone features: mean pairwise cosine {rec['teacher_features_mean_cosine']:.4f}, effective rank "
          f"{rec['teacher_features_effective_rank']:.2f}")
    print(f"verdict: {'COLLAPSED' if rec['teacher_collapsed'] else 'healthy'}")
    if rec["teacher_collapsed"]:
        print(rec["message"].split(": COLLAPSED. ", 1)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
