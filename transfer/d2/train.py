"""detectron2 training / evaluation of converted students: what ``tools/train_net.py`` runs.

The shape of detectron2's own ``train_net.py``: :func:`setup` (get_cfg with our keys -> the project's one config path,
:func:`pretrain.cfgnode.merge_and_freeze`: merge file, merge opts, CPU fallback and datasets as its validate, freeze ->
default_setup) and a ``DefaultTrainer`` with VOC / COCO evaluators. Launching goes through the project's one
mechanism (``pretrain.distributed``: ``env://`` processes locally, ``pretrain.slurm`` on SLURM), so
detection jobs get the same ``--slurm`` flags and preemption handling as pretraining: on SIGTERM / SIGUSR2 every
process agrees to stop, rank 0 writes ``model_{iter}.pth`` at that iteration, and a requeued (or re-run, with
``--resume``) job continues from it.

``--eval-only`` checks and needs only DATASETS.TEST (and NUM_CLASSES against its classes). Progress: a training line
with the ETA every SOLVER.LOG_PERIOD iterations (detectron2's CommonMetricPrinter), inference every 5 s after
warm-up (detectron2's ``inference_on_dataset``), precise BN and the VOC AP per class every :data:`PROGRESS_SECONDS`.
OUTPUT_DIR/log.txt holds the console's lines without terminal colour codes.
"""
import argparse
import datetime
import itertools
import json
import logging
import os
import re
import sys
import time

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, default_setup, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import update_bn_stats

import transfer.d2  # noqa: F401  (registers our ROI heads and backbones)
from pretrain import distributed as du
from pretrain.cfgnode import check_ranges, merge_and_freeze
from pretrain.launch import launch_main
from pretrain.preemption import Preempted, StopRequest
from pretrain.runlock import OutputDirLock, lock_output_dir
from transfer.d2.config import get_cfg
from transfer.d2.datasets import check_datasets, register_synthetic
from transfer.d2.weights import SafeDetectionCheckpointer


class PreemptionHook(HookBase):
    """The project's preemption protocol (:mod:`pretrain.preemption`) in detectron2's trainer: on SIGTERM / SIGUSR2
    every process agrees to stop after the iteration that just finished, rank 0 saves ``model_{iter}.pth``, and
    :class:`Preempted` is raised (a SLURM task requeues the job)."""

    def __init__(self):
        self.stop = StopRequest()

    def before_train(self):
        self.stop.install()

    def after_train(self):
        self.stop.restore()

    def after_step(self):
        if not self.stop.agreed(next(self.trainer.model.parameters()).device):
            return
        it = self.trainer.iter
        if comm.is_main_process():
            self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()
        raise Preempted(f"stopped on request after iteration {it}; checkpoint model_{it:07d}.pth in "
                        f"{self.trainer.cfg.OUTPUT_DIR}; rerun the command with --resume to continue (a SLURM job "
                        f"requeues itself)")


# The logger of this module's progress lines: under "detectron2", so detectron2's setup_logger handlers (console of
# rank 0, OUTPUT_DIR/log.txt) show them.
LOGGER = "detectron2.transfer"
PROGRESS_SECONDS = 5.0  # seconds between progress lines of a long phase (detectron2's inference logs every 5 s too)


class Progress:
    """Progress lines of a phase of ``total`` steps (``unit``: what they are, plural): after the first step, then
    at most every :data:`PROGRESS_SECONDS` seconds, with the time per step and the ETA; :meth:`finish` logs the
    total time."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.logger = logging.getLogger(LOGGER)
        self.start = time.perf_counter()
        self.last = None

    def step(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if self.last is not None and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        per = (now - self.start) / max(done, 1)
        eta = datetime.timedelta(seconds=int(per * (self.total - done)))
        self.logger.info("%s: %d/%d %s%s, %.3f s each, ETA %s", self.what, done, self.total, self.unit,
                         f" (last: {detail})" if detail else "", per, eta)

    def finish(self) -> None:
        self.logger.info("%s: done, %d %s in %.1f s", self.what, self.total, self.unit,
                         time.perf_counter() - self.start)


class PreciseBNWithProgress(hooks.PreciseBN):
    """detectron2's PreciseBN hook (TEST.PRECISE_BN: BatchNorm statistics recomputed on NUM_ITER training batches
    before each evaluation) with :class:`Progress` lines; detectron2's logs only its start and every 100 batches."""

    @classmethod
    def replacing(cls, hook: hooks.PreciseBN) -> hooks.PreciseBN:
        """The same hook (period, model, data loader, number of batches) as ``hook``, with progress."""
        if getattr(hook, "_disabled", True):
            return hook
        return cls(hook._period, hook._model, hook._data_loader, hook._num_iter)

    def update_stats(self):
        if self._disabled:
            return
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        progress = Progress("precise-BN", self._num_iter, "batches")

        def batches():
            for done in itertools.count():
                if done:  # batch `done` went through the model
                    progress.step(done)
                yield next(self._data_iter)

        with EventStorage():  # as detectron2's: the forward passes' events are discarded
            progress.logger.info("precise-BN: recomputing the BatchNorm statistics on %d training batches "
                                 "(TEST.PRECISE_BN.NUM_ITER)", self._num_iter)
            update_bn_stats(self._model, batches(), self._num_iter)
        progress.finish()


class VOCEvaluatorWithProgress(PascalVOCDetectionEvaluator):
    """detectron2's PascalVOCDetectionEvaluator, unchanged, with a line before its AP computation (10 ``voc_eval``
    calls per class, 200 for VOC, silent until the end) and one after it with the time it took."""

    def evaluate(self):
        logger = logging.getLogger(LOGGER)
        start = time.perf_counter()
        if comm.is_main_process():
            logger.info("VOC AP of %s: %d classes x 10 IoU thresholds (0.50:0.95), computing", self._dataset_name,
                        len(self._class_names))
        results = super().evaluate()
        if comm.is_main_process():
            logger.info("VOC AP of %s: done in %.1f s", self._dataset_name, time.perf_counter() - start)
        return results


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the VOC / COCO evaluators, the preemption hook and
    :class:`~transfer.d2.weights.SafeDetectionCheckpointer` (MODEL.WEIGHTS and resumed checkpoints are read without
    running code from them; weights that fill no pretrained parameter are an error)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "pascal_voc":
            return VOCEvaluatorWithProgress(dataset_name)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        raise NotImplementedError(f"no evaluator for dataset {dataset_name!r} (evaluator_type {evaluator_type!r}); "
                                  f"VOC and COCO are supported")

    def build_hooks(self):
        # DefaultTrainer.__init__ builds its DetectionCheckpointer, then the hooks (the periodic checkpointer holds
        # it): swap in the safe one first, so every load and save goes through a single checkpointer
        if not isinstance(self.checkpointer, SafeDetectionCheckpointer):
            self.checkpointer = SafeDetectionCheckpointer.replacing(self.checkpointer)
        built = super().build_hooks()
        for i, hook in enumerate(built):
            if isinstance(hook, hooks.PeriodicWriter):  # detectron2 hard-codes period=20
                hook._period = self.cfg.SOLVER.LOG_PERIOD
            elif isinstance(hook, hooks.PreciseBN) and not isinstance(hook, PreciseBNWithProgress):
                built[i] = PreciseBNWithProgress.replacing(hook)
        return built + [PreemptionHook()]


def run_datasets(cfg, eval_only: bool = False) -> dict:
    """The datasets a run uses, by config key: training DATASETS.TRAIN and DATASETS.TEST (evaluated after
    training), ``--eval-only`` DATASETS.TEST alone."""
    if eval_only:
        return {"DATASETS.TEST": list(cfg.DATASETS.TEST)}
    return {"DATASETS.TRAIN": list(cfg.DATASETS.TRAIN), "DATASETS.TEST": list(cfg.DATASETS.TEST)}


def check_values(cfg, eval_only: bool = False) -> None:
    """Values detectron2 would only trip over later (or never report)."""
    check_ranges(cfg, [("SOLVER.LOG_PERIOD", ">= 1", 0)])
    if eval_only and not cfg.DATASETS.TEST:
        raise ValueError("--eval-only evaluates the datasets of DATASETS.TEST, which is empty; set it, e.g. "
                         "DATASETS.TEST '(\"voc_2007_test\",)'")


def check_num_classes(cfg, eval_only: bool = False) -> None:
    """MODEL.ROI_HEADS.NUM_CLASSES against the class list of every dataset of the run (:func:`run_datasets`: with
    ``eval_only`` the test sets only) whose metadata is registered (reads the catalog only: a dataset not registered
    yet is left to :func:`prepare_datasets`)."""
    registered = set(MetadataCatalog.list())
    for name in itertools.chain(*run_datasets(cfg, eval_only).values()):
        classes = MetadataCatalog.get(name).get("thing_classes", None) if name in registered else None
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                             f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set it to {len(classes)}")


def prepare_datasets(cfg, eval_only: bool = False) -> None:
    """The validate of :func:`setup` (before freezing, with side effects): MODEL.DEVICE falls back to the CPU without
    CUDA, the synthetic sets of DATASETS.SYNTHETIC_ROOT are registered, and every dataset the run uses
    (:func:`run_datasets`: ``--eval-only`` needs only DATASETS.TEST) is checked (known, files present, NUM_CLASSES
    matching its classes)."""
    check_values(cfg, eval_only)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.DATASETS.SYNTHETIC_ROOT:
        register_synthetic(cfg.DATASETS.SYNTHETIC_ROOT)
    for key, names in run_datasets(cfg, eval_only).items():
        check_datasets(names, key, cfg.DATASETS.SYNTHETIC_ROOT)
    check_num_classes(cfg, eval_only)


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences: colours (termcolor, pygments' Terminal256Formatter)


class PlainFileFormatter(logging.Formatter):
    """A log file's formatter without terminal colour codes: detectron2 logs the config highlighted for the terminal
    (``default_setup``'s ``_highlight``) and the same message goes to log.txt."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.inner.format(record))


def setup_file_logging(output_dir: str, rank: int) -> None:
    """detectron2's loggers as ``default_setup`` creates them (``setup_logger`` is cached on its arguments, so
    ``default_setup`` gets these same loggers and adds no handler), with :class:`PlainFileFormatter` on their
    file handlers (OUTPUT_DIR/log.txt, log.txt.rank<N>); the console keeps its colours."""
    for logger in (setup_logger(output_dir, distributed_rank=rank, name="fvcore"),
                   setup_logger(output_dir, distributed_rank=rank)):
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if (isinstance(handler, logging.StreamHandler) and stream not in (sys.stdout, sys.stderr)
                    and not isinstance(handler.formatter, PlainFileFormatter)):
                handler.setFormatter(PlainFileFormatter(handler.formatter or logging.Formatter()))


def setup(args: argparse.Namespace):
    """The frozen config of a run, with the datasets it uses registered and checked, and OUTPUT_DIR locked for this
    run (one run per folder, :mod:`pretrain.runlock`; released by :func:`run`) before detectron2 writes there."""
    eval_only = bool(getattr(args, "eval_only", False))
    cfg = merge_and_freeze(get_cfg(), args.config_file, args.opts, lambda c: prepare_datasets(c, eval_only))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lock_output_dir(cfg.OUTPUT_DIR, "detection", device)
    setup_file_logging(cfg.OUTPUT_DIR, comm.get_rank())
    default_setup(cfg, args)
    return cfg


def format_ap(value) -> str:
    """An AP (percent) for the summary line: 3 decimals, so toy-scale APs (0.031) do not print as 0.0."""
    return f"{value:.3f}"


def _summary(results) -> str:
    parts = []
    for dataset, res in results.items():
        for task, metrics in res.items():
            shown = ", ".join(f"{k} {format_ap(v)}" for k, v in metrics.items() if k in ("AP", "AP50", "AP75"))
            parts.append(f"{dataset} {task}: {shown}")
    return "; ".join(parts)


def _finish(cfg, results):
    if comm.is_main_process() and results:
        if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
            results = {cfg.DATASETS.TEST[0]: results}  # DefaultTrainer.test unwraps a single dataset's results
        results = {d: {t: dict(m) for t, m in r.items()} for d, r in results.items()}
        with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"detection {os.path.basename(cfg.OUTPUT_DIR.rstrip('/'))}: {_summary(results)}", flush=True)
    return results


def run(args: argparse.Namespace):
    """One process of a run (joins the ``env://`` group described by the environment when there are several)."""
    du.init_distributed()
    if du.is_dist() and comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", du.get_world_size())))
    cfg = setup(args)
    try:
        if args.eval_only:
            model = Trainer.build_model(cfg)
            checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            return _finish(cfg, Trainer.test(cfg, model))
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # DefaultTrainer keeps the final evaluation (its EvalHook runs one after the last iteration) here
        return _finish(cfg, getattr(trainer, "_last_eval_results", None))
    finally:
        OutputDirLock(cfg.OUTPUT_DIR).release()


def load_cfg(args: argparse.Namespace):
    """The merged, frozen config, without side effects (no datasets registered, no output folder): a bad config
    fails early. Only the checks that change nothing run here (:func:`check_num_classes` on the datasets already
    known); :func:`setup` does the rest in every process."""
    eval_only = bool(getattr(args, "eval_only", False))

    def check(cfg):
        check_values(cfg, eval_only)
        check_num_classes(cfg, eval_only)

    return merge_and_freeze(get_cfg(), args.config_file, args.opts, check)


def main(args: argparse.Namespace):
    """What tools/train_net.py does: submit to SLURM with ``--slurm``, else run here (``--num-gpus`` processes)."""
    if args.slurm:
        args.resume = True  # a requeued job must continue from its own last checkpoint
    elif args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        # detectron2's DefaultTrainer wraps the model in DDP with device_ids=[local rank], which only GPUs accept
        raise ValueError(f"--num-gpus {args.num_gpus} needs CUDA devices; on the CPU run one process (--num-gpus 1)")
    return launch_main(run, args, "train_net", load_cfg)
