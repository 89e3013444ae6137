"""detectron2 training / evaluation of converted students: what ``tools/train_net.py`` runs.

The shape of detectron2's own ``train_net.py``: :func:`setup` (get_cfg -> our keys -> merge file -> merge opts ->
datasets -> freeze -> default_setup) and a ``DefaultTrainer`` with VOC / COCO evaluators. Launching goes through the
project's one mechanism (``pretrain.distributed``: ``env://`` processes locally, ``pretrain.slurm`` on SLURM), so
detection jobs get the same ``--slurm`` flags and preemption handling as pretraining: on SIGTERM / SIGUSR2 every
process agrees to stop, rank 0 writes ``model_{iter}.pth`` at that iteration, and a requeued (or re-run, with
``--resume``) job continues from it.
"""
import argparse
import json
import logging
import os
import signal
import threading

import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

import transfer.d2  # noqa: F401  (registers our ROI heads and backbones)
from pretrain import distributed as du
from pretrain.launch import launch_main
from pretrain.trainer import Preempted
from transfer.d2.config import get_cfg
from transfer.d2.datasets import check_datasets, register_synthetic

class PreemptionHook(HookBase):
    """SIGTERM / SIGUSR2 (what SLURM sends before preempting or at the time limit): checkpoint the iteration that
    just finished on every process's agreement, then raise :class:`Preempted` (the SLURM task requeues the job)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _request(self, signum=None, frame=None):
        self.requested = True

    def before_train(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}

    def after_train(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def after_step(self):
        flag = self.requested
        if comm.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=next(self.trainer.model.parameters()).device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a signal that reached any process stops all of them
            flag = t.item() > 0
        if not flag:
            return
        it = self.trainer.iter
        if comm.is_main_process():
            self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()
        raise Preempted(f"stopped on request after iteration {it}; checkpoint model_{it:07d}.pth in "
                        f"{self.trainer.cfg.OUTPUT_DIR}; rerun the command with --resume to continue (a SLURM job "
                        f"requeues itself)")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the VOC / COCO evaluators and the preemption hook."""

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
        return super().build_hooks() + [PreemptionHook()]


def setup(args: argparse.Namespace):
    """The frozen config of a run, with its datasets registered and checked."""
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.DATASETS.SYNTHETIC_ROOT:
        register_synthetic(cfg.DATASETS.SYNTHETIC_ROOT)
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(f"dataset {name!r} has {len(classes)} classes but MODEL.ROI_HEADS.NUM_CLASSES is "
                             f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; set it to {len(classes)}")
    cfg.freeze()
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
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return _finish(cfg, Trainer.test(cfg, model))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer keeps the final evaluation (its EvalHook runs one after the last iteration) here
    return _finish(cfg, getattr(trainer, "_last_eval_results", None))


def load_cfg(args: argparse.Namespace):
    """The merged config, without side effects (no datasets, no output folder): a bad config fails early."""
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def main(args: argparse.Namespace):
    """What tools/train_net.py does: submit to SLURM with ``--slurm``, else run here (``--num-gpus`` processes)."""
    if args.slurm:
        args.resume = True  # a requeued job must continue from its own last checkpoint
    elif args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        # detectron2's DefaultTrainer wraps the model in DDP with device_ids=[local rank], which only GPUs accept
        raise ValueError(f"--num-gpus {args.num_gpus} needs CUDA devices; on the CPU run one process (--num-gpus 1)")
    return launch_main(run, args, "train_net", load_cfg)
