#!/usr/bin/env python
"""Convert a student (or teacher) checkpoint into detectron2 weights, then prove they load.

    python tools/convert_to_d2.py runs/disco_r50_r18/export/resnet18.pth r18_disco.pkl
    python tools/convert_to_d2.py moco_v2_200ep_pretrain.pth.tar r50_moco.pkl --config-file \\
        configs/detection/coco/r50_mask_C4_1x.yaml

Input: our export / pretraining checkpoint, MoCo-v1/v2 or DisCo-pytorch ``.pth.tar``, a SwAV / DeepCluster-v2 /
SeLa-v2 release, a DINO ResNet-50 (training checkpoint: its teacher; or the backbone-only release) or a bare timm /
torchvision state dict; the architecture comes from the checkpoint, ``--arch`` or its keys and shapes. Detection
takes ResNet and timm CNN backbones: a ViT / XCiT (DINO's) is refused with the list of supported architectures. The output
``.pkl`` uses full detectron2 key names (no matching heuristics). The detectron2 model of ``--config-file`` (default:
the VOC C4 config of the architecture) is built and the weights loaded with ``DetectionCheckpointer``; every key is
reported (loaded / new in the detector / skipped and why). Any backbone or ROI-stage (res5) weight that does not load
is an error: exit status 1 and nothing written. Use the same config (or one with the same backbone) to train:
``tools/train_net.py --config-file ... MODEL.WEIGHTS OUT.pkl``.
"""
import argparse
import os
import sys

# tools/pretrain.py shares its name with the `pretrain` package: put the repository root, not tools/, on the path.
_TOOLS = os.path.dirname(os.path.realpath(__file__))
if sys.path and os.path.realpath(sys.path[0]) == _TOOLS:
    sys.path[0] = os.path.dirname(_TOOLS)

from pretrain.cli import HelpFormatter  # noqa: E402  (light: --help never imports torch or detectron2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/convert_to_d2.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", help="checkpoint to convert")
    p.add_argument("output", help="detectron2 weights to write (.pkl)")
    p.add_argument("--arch", default=None, help="pretrain.backbones name (resnet18, efficientnet_b0, ...); default: "
                                                "from the checkpoint or inferred from its keys and shapes")
    p.add_argument("--config-file", default=None, help="detection config the weights are for (default per arch: "
                                                       "configs/detection/voc/<arch>_C4_24k.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not one line per key")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="config overrides of --config-file, before, between or after the flags (e.g. "
                        "MODEL.RESNETS.DEPTH 101)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from transfer.d2.weights import LoadError, convert_to_d2

    try:
        report, conv, config_file = convert_to_d2(args.input, args.output, args.arch, args.config_file, args.opts,
                                                  args.force)
    except LoadError as e:
        if not args.quiet:
            print("\n".join(e.report.lines()))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, AssertionError) as e:
        # AssertionError: how detectron2's CfgNode rejects an unknown override key
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print("\n".join(report.lines()))
    print(f"{args.input} ({conv.format}, {conv.arch}) -> {args.output} ({conv.layout}; checked against "
          f"{os.path.relpath(config_file)}): {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
