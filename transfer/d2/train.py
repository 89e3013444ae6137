"""detectron2 training / evaluation of converted students: what ``tools/train_net.py`` runs.

The shape of detectron2's own ``train_net.py``: :func:`setup` (get_cfg with our keys -> the project's one config path,
:func:`pretrain.cfgnode.merge_and_freeze`: merge file, merge opts, CPU fallback and datasets as its validate, freeze ->
default_setup) and a ``DefaultTrainer`` with VOC / COCO evaluators. Launching goes through the project's one
mechanism (``pretrain.distributed``: ``env://`` processes locally, ``pretrain.slurm`` on SLURM), so
detection jobs get the same ``--slurm`` flags and preemption handling as pretraining: on SIGTERM / SIGUSR2 every
process agrees to stop, rank 0 writes ``model_{iter}.pth`` at that iteration, and a requeued (or re-run, with
``--resume``) job continues from it.
"""
import argparse
import json
import logging
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

import transfer.d2  # noqa: F401  (registers our ROI heads and backbones)
from pretrain import distributed as du
from pretrain.cfgnode import merge_and_freeze
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


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the VOC / COCO evaluators, the preemption hook and
    :class:`~transfer.d2.weights.SafeDetectionCheckpointer` (MODEL.WEIGHTS and resumed checkpoints are read without
    running code from them; weights that fill no pretrained parameter are an error)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        raise NotImplementedError(f"no evaluator for dataset {dataset_name!r} (evaluator_type {evaluator_type!r}); "
                                  f"VOC and COCO are supported")

    def build_hooks(self):
        # DefaultTrainer.__init__ builds its DetectionCheckpointer, then the hooks (the periodic checkpointer holds
        # it): swap in the safe one first, so every load and save goes through a single checkpointer
        if not isinstance(self.checkpointer, SafeDetectionCheckpointer):
            self.checkpointer = SafeDetectionCheckpointer.replacing(self.checkpointer)
        return super().build_hooks() + [PreemptionHook()]


def check_num_classes(cfg) -> None:
    """MODEL.ROI_HEADS.NUM_CLASSES against the class list of every dataset of the run whose metadata is registered
    (reads the catalog only: a dataset not registered yet is left to :func:`prepare_datasets`)."""
    registered = set(MetadataCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes", None) if name in registered else None
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                             f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set it to {len(classes)}")


def prepare_datasets(cfg) -> None:
    """The validate of :func:`setup` (before freezing, with side effects): MODEL.DEVICE falls back to the CPU without
    CUDA, the synthetic sets of DATASETS.SYNTHETIC_ROOT are registered, and every dataset of the run is checked (known,
    files present, NUM_CLASSES matching its classes)."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.DATASETS.SYNTHETIC_ROOT:
        register_synthetic(cfg.DATASETS.SYNTHETIC_ROOT)
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    check_num_classes(cfg)


def setup(args: argparse.Namespace):
    """The frozen config of a run, with its datasets registered and checked, and OUTPUT_DIR locked for this run
    (one run per folder, :mod:`pretrain.runlock`; released by :func:`run`) before detectron2 writes there."""
    cfg = merge_and_freeze(get_cfg(), args.config_file, args.opts, prepare_datasets)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lock_output_dir(cfg.OUTPUT_DIR, "detection", device)
    default_setup(cfg, args)
    return cfg


def _summary(results) -> str:
    parts = []
    for dataset, res in results.items():
        for task, metrics in res.items():
            shown = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k in ("AP", "AP50", "AP75"))
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
    return merge_and_freeze(get_cfg(), args.config_file, args.opts, check_num_classes)


def main(args: argparse.Namespace):
    """What tools/train_net.py does: submit to SLURM with ``--slurm``, else run here (``--num-gpus`` processes)."""
    if args.slurm:
        args.resume = True  # a requeued job must continue from its own last checkpoint
    elif args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        # detectron2's DefaultTrainer wraps the model in DDP with device_ids=[local rank], which only GPUs accept
        raise ValueError(f"--num-gpus {args.num_gpus} needs CUDA devices; on the CPU run one process (--num-gpus 1)")
    return launch_main(run, args, "train_net", load_cfg)
