"""The entry point every launch goes through: local (one or several processes), torchrun, and SLURM.

``run(args)`` is what one process executes, wherever it runs. ``main`` starts the local processes, or
submits ``run`` as a SLURM job (``pretrain.slurm``) whose tasks export their distributed environment first.
"""
import argparse
import logging
from typing import Any, Callable

from .config import setup_cfg
from .distributed import launch
from .preemption import Preempted
from .trainer import Trainer

logger = logging.getLogger("pretrain")


def argument_parser(description: str = "DisCo / MoCo-v2 pretraining") -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` (--config-file, --resume, --eval-only, --num-gpus, --num-machines,
    --machine-rank, --dist-url, trailing KEY VALUE opts) plus the SLURM flags of :mod:`pretrain.slurm`."""
    from detectron2.engine import default_argument_parser

    from .slurm import add_slurm_args

    parser = default_argument_parser()
    parser.description = description
    return add_slurm_args(parser)


def run(args: argparse.Namespace):
    """One process of a run. ``--num-gpus`` counts processes per machine (gloo CPU processes without GPUs).
    Runs always auto-resume from OUTPUT_DIR; ``--resume`` additionally insists that a checkpoint exists.
    Raises :class:`Preempted` after checkpointing when the process is signalled (SIGTERM / SIGUSR2)."""
    cfg = setup_cfg(args.config_file, args.opts)
    trainer = Trainer(cfg, require_checkpoint=args.resume)
    return trainer.evaluate() if args.eval_only else trainer.run()


def _run_until_signal(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace):
    try:
        return run_fn(args)
    except Preempted as e:  # a local run: the checkpoint is written; rerunning the command continues
        logger.info("%s", e)
        return None


def launch_main(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str,
                check_config: Callable[[argparse.Namespace], Any]):
    """What every CLI of the project does with its parsed arguments: ``check_config(args)`` (a bad config fails
    here, before any process or job starts), then ``run_fn(args)`` here, in ``--num-gpus`` local processes (gloo
    CPU processes without GPUs), or as a SLURM job named ``name`` with ``--slurm`` (``--wait`` follows it)."""
    check_config(args)
    if args.slurm:
        from .slurm import follow, submit

        job = submit(run_fn, args, name=name)
        return follow(job) if args.wait else job
    if args.num_gpus * args.num_machines <= 1:
        return _run_until_signal(run_fn, args)
    launch(_run_until_signal, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url,
           args=(run_fn, args))
    return None


def main(args: argparse.Namespace):
    """What tools/pretrain.py does: submit to SLURM with ``--slurm``, else run here."""
    return launch_main(run, args, "pretrain", lambda a: setup_cfg(a.config_file, a.opts))
