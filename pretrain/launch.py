"""The entry point every launch goes through: local (one or several processes), torchrun, and SLURM.

``run(args)`` is what one process executes, wherever it runs. ``main`` starts the local processes, or
submits ``run`` as a SLURM job (``pretrain.slurm``) whose tasks export their distributed environment first.
"""
import argparse
import contextlib
import logging
import sys
from typing import Any, Callable, Iterator

import torch.multiprocessing as mp
from torch.multiprocessing import ProcessExitedException

from .cli import (USER_ERROR_STATUS, argument_parser, failed_output_note,  # noqa: F401  (argument_parser: the CLIs')
                  format_user_error, user_errors)
from .config import setup_cfg
from .distributed import launch
from .preemption import Preempted
from .trainer import Trainer

logger = logging.getLogger("pretrain")


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


def _local_process(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str, reported):
    """One of the ``--num-gpus`` local processes: a user's mistake ends it with exit status 2, which the launching
    process passes on; the first process to fail prints its ``error:`` line (``reported``, a shared flag, keeps the
    others, which usually fail the same way, quiet)."""
    try:
        return _run_until_signal(run_fn, args)
    except Exception as e:
        text = format_user_error(e, name)
        if text is None:
            raise
        with reported.get_lock():
            first, reported.value = not reported.value, True
        if first:
            print(text, file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None


@contextlib.contextmanager
def _noting_failed_output(output_dir: str) -> Iterator[None]:
    """A run that fails before it wrote a checkpoint or result says that OUTPUT_DIR holds nothing worth keeping
    (:func:`pretrain.cli.failed_output_note`), after the error or its traceback."""
    try:
        yield
    except SystemExit as e:  # a local process reported a user's mistake and ended
        note = failed_output_note(output_dir) if e.code == USER_ERROR_STATUS else None
        if note:
            print(note, file=sys.stderr)
        raise
    except Exception as e:
        note = failed_output_note(output_dir)
        if note:
            e.add_note(note)
        raise


def launch_main(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str,
                check_config: Callable[[argparse.Namespace], Any]):
    """What every CLI of the project does with its parsed arguments: ``check_config(args)`` (a bad config fails
    here, before any process or job starts; it returns the config), then ``run_fn(args)`` here, in ``--num-gpus``
    local processes (gloo CPU processes without GPUs), or as a SLURM job named ``name`` with ``--slurm`` (``--wait``
    follows it). A user's mistake (:func:`pretrain.cli.user_errors`: a config key that does not exist, a value out of
    range, a missing file, ...) ends the process with one ``error:`` line and exit status 2; any other exception
    keeps its traceback. Either way a run that failed before writing a checkpoint or result says so."""
    with user_errors(name):
        cfg = check_config(args)
        with _noting_failed_output(getattr(cfg, "OUTPUT_DIR", "")):
            return _launch(run_fn, args, name)


def _launch(run_fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str):
    if args.slurm:
        from .slurm import follow, submit

        job = submit(run_fn, args, name=name)
        return follow(job) if args.wait else job
    if args.num_gpus * args.num_machines <= 1:
        return _run_until_signal(run_fn, args)
    reported = mp.get_context("spawn").Value("b", False)
    try:
        launch(_local_process, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url,
               args=(run_fn, args, name, reported))
    except ProcessExitedException as e:
        if e.exit_code != USER_ERROR_STATUS:
            raise
        raise SystemExit(USER_ERROR_STATUS) from None  # the process printed its error line
    return None


def main(args: argparse.Namespace):
    """What tools/pretrain.py does: submit to SLURM with ``--slurm``, else run here."""
    return launch_main(run, args, "pretrain", lambda a: setup_cfg(a.config_file, a.opts))
