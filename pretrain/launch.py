"""The entry point every launch goes through: local (one or several processes), torchrun, and the SLURM seam.

``run(args)`` is what one process executes; ``launch_local(args)`` starts the local processes. A SLURM launcher only
has to export the distributed environment (``submitit.helpers.TorchDistributedEnvironment().export()``) and call
``run(args)`` in each task.
"""
import argparse

from .config import setup_cfg
from .distributed import launch
from .trainer import Trainer


def argument_parser(description: str = "DisCo / MoCo-v2 pretraining") -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` (--config-file, --resume, --eval-only, --num-gpus, --num-machines,
    --machine-rank, --dist-url, trailing KEY VALUE opts)."""
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser()
    parser.description = description
    return parser


def run(args: argparse.Namespace):
    """One process of a run. ``--num-gpus`` counts processes per machine (gloo CPU processes without GPUs).
    Runs always auto-resume from OUTPUT_DIR; ``--resume`` additionally insists that a checkpoint exists."""
    cfg = setup_cfg(args.config_file, args.opts)
    trainer = Trainer(cfg, require_checkpoint=args.resume)
    return trainer.evaluate() if args.eval_only else trainer.run()


def launch_local(args: argparse.Namespace):
    setup_cfg(args.config_file, args.opts)  # fail on a bad config before starting any process
    if args.num_gpus * args.num_machines <= 1:
        return run(args)
    launch(run, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,))
