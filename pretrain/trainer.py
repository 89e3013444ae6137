"""``Trainer(cfg)``: build -> resume -> loop (+ hooks) -> export. The same object runs local and SLURM jobs.

The trainer knows no method: it builds :class:`pretrain.model.Method` from the config, optimises its trainable
parameters with :func:`pretrain.engine.train_step`, and leaves metrics, preemption, checkpoints and the kNN monitor
to the hooks of :mod:`pretrain.hooks`.
"""
import logging
import math
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed as du
from .cfgdiff import check_resume, record_changes
from .cfgnode import CfgNode, save_cfg
from .checkpoint import Checkpointer, remove_orphaned_temp_files
from .config import SAFE_ON_RESUME, current_form
from .loader import build_train_loader
from .engine import train_step
from .export import export_student
from .hooks import (ChanceLevelMonitor, HookBase, KnnMonitor, MetricsWriter, PeriodicCheckpointer, PreemptionHook,
                    TeacherHealthCheck)
from .knn import KnnData
from .model import Method, build_method
from .optim import build_optimizer
from .precision import amp_dtype, resolve_cfg
from .preemption import Preempted, StopRequest
from .runlock import lock_output_dir
from .runlog import setup_logging, truncate_metrics

logger = logging.getLogger("pretrain")

CHECKPOINT_FORMAT = "disco-transfer/pretrain-v2"  # "model": the Method's state (student.*, testbed.*, distillers.*)


class Trainer:
    """Pretrain with ``cfg``. A run always continues from the newest readable checkpoint in OUTPUT_DIR (so a requeued
    or restarted job never overwrites its own progress); ``require_checkpoint`` makes a missing one an error."""

    def __init__(self, cfg: CfgNode, require_checkpoint: bool = False):
        self.cfg, self.require_checkpoint = cfg, require_checkpoint
        self.stop = StopRequest()  # raised by SIGTERM / SIGUSR2 during run(), or by request_stop()
        self.stopped_by_request = False
        self.hooks: List[HookBase] = []

    def request_stop(self, signum=None, frame=None) -> None:
        """Ask the run to checkpoint and stop at the next iteration boundary (safe in a signal handler)."""
        self.stop.request()

    # ------------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = du.init_distributed()
        self.rank, self.world = du.get_rank(), du.get_world_size()
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        self.lock = lock_output_dir(cfg.OUTPUT_DIR, "pretraining", self.device)
        try:
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        setup_logging(self.cfg.OUTPUT_DIR, self.rank)
        # TRAIN.AMP.ENABLED / TEACHER and MODEL.CHANNELS_LAST "auto" -> True / False for this device, once: from here
        # on self.cfg (config.yaml, the checkpoints, the hooks) holds the resolved values
        self.cfg, self.auto_keys, precision = resolve_cfg(self.cfg, self.device)
        logger.info(precision)
        cfg = self.cfg
        if cfg.TRAIN.DETERMINISTIC:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.SEED)  # identical initial weights on every process
        np.random.seed(cfg.SEED)
        random.seed(cfg.SEED)

        self.amp_dtype = amp_dtype(cfg.TRAIN.AMP.DTYPE if cfg.TRAIN.AMP.ENABLED else "")
        if cfg.TRAIN.AMP.DTYPE == "float16" and self.device.type != "cuda" and (cfg.TRAIN.AMP.ENABLED or
                                                                              cfg.TRAIN.AMP.TEACHER):
            raise ValueError("TRAIN.AMP.DTYPE float16 needs a GPU; use bfloat16 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        total_batch, d = cfg.SOLVER.IMS_PER_BATCH, cfg.DATA
        # DATA.BACKEND's loader (a DataLoader for torchvision) and the run's ResumableSampler
        self.loader, self.sampler, num_images = build_train_loader(cfg, self.rank, self.world, self.device)
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.max_iter = self.iters_per_epoch * cfg.SOLVER.EPOCHS

        self.model: Method = build_method(cfg).to(self.device)
        if cfg.MODEL.STUDENT.SYNC_BN and self.world > 1:  # SwAV: BN statistics over the global batch
            self.model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model.student)
        if cfg.MODEL.CHANNELS_LAST:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.TRAIN.COMPILE:  # in place, after the layout (compiled for it), inside DDP
            logger.info("TRAIN.COMPILE: torch.compile of %s (in place: the state-dict keys do not change); the first "
                        "steps compile", ", ".join(self.model.compile_encoders()))
        self.model_ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type ==
                                                  "cuda" else None) if self.world > 1 else self.model)
        self.base_lr = lr = cfg.SOLVER.BASE_LR * total_batch / cfg.SOLVER.REFERENCE_BATCH
        # never the teacher or a momentum encoder
        self.optimizer = build_optimizer(cfg, self.model.named_trainable_parameters(), lr)
        # the groups SOLVER.WEIGHT_DECAY_END schedules: those that decay (not DINO's biases and norms)
        self.decay_groups = [i for i, g in enumerate(self.optimizer.param_groups) if g["weight_decay"] > 0]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.checkpointer = Checkpointer(cfg.OUTPUT_DIR, cfg.TRAIN.MAX_TO_KEEP)
        if self.rank == 0:  # this run holds the folder: temp files of a killed save / export are orphans
            remove_orphaned_temp_files(self.checkpointer.dir, os.path.join(cfg.OUTPUT_DIR, "export"))
        self.iter, self.epoch, self.skipped_images = 0, 0, 0

        metrics = MetricsWriter(cfg.TRAIN.LOG_PERIOD)
        self.hooks = [metrics, PreemptionHook(self.stop), PeriodicCheckpointer(cfg.TRAIN.CHECKPOINT_PERIOD)]
        self.knn = None
        if d.VAL_DIR and cfg.TEST.KNN.PERIOD >= 0:
            data = KnnData(d.TRAIN_DIR, d.VAL_DIR, cfg.TEST.KNN.IMAGE_SIZE, cfg.TEST.KNN.MAX_TRAIN_IMAGES, cfg.SEED,
                           d.MEAN, d.STD)
            self.knn = KnnMonitor(data, cfg.TEST.KNN.PERIOD, metrics)
            self.hooks.append(self.knn)
        self.hooks += [TeacherHealthCheck(metrics), ChanceLevelMonitor()]  # pretrain.health: collapse warnings
        for hook in self.hooks:
            hook.trainer = self
        amp = (cfg.TRAIN.AMP.DTYPE if self.amp_dtype else "off") + (
            f" (teacher {cfg.TRAIN.AMP.DTYPE})" if cfg.TRAIN.AMP.TEACHER else "")
        logger.info("%s: %s student%s, %d images, %d processes x %d, %d iters/epoch, %d epochs, lr %.4g, AMP %s",
                    self.model.description, cfg.MODEL.STUDENT.ARCH, f" <- {cfg.MODEL.TEACHER.ARCH} teacher"
                    if self.model.teacher is not None else "", num_images, self.world, self.sampler.local_batch,
                    self.iters_per_epoch, cfg.SOLVER.EPOCHS, lr, amp)

    def lr_factor(self, it: int) -> float:
        """Linear warm-up then cosine decay (per epoch as MoCo-v2, or per iteration) from 1 to
        SOLVER.FINAL_LR_FACTOR."""
        s = self.cfg.SOLVER
        warm = s.WARMUP_EPOCHS * self.iters_per_epoch
        if it < warm:
            return (it + 1) / warm
        t = it if s.COSINE_PER_ITER else (it // self.iters_per_epoch) * self.iters_per_epoch
        end = s.FINAL_LR_FACTOR
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, self.max_iter - warm)))

    def weight_decay(self, it: int) -> float:
        """SOLVER.WEIGHT_DECAY, or with SOLVER.WEIGHT_DECAY_END >= 0 a per-iteration cosine from it to the end
        value (DINO: 0.04 -> 0.4)."""
        s = self.cfg.SOLVER
        if s.WEIGHT_DECAY_END < 0:
            return s.WEIGHT_DECAY
        return s.WEIGHT_DECAY_END + 0.5 * (s.WEIGHT_DECAY - s.WEIGHT_DECAY_END) * (
            1.0 + math.cos(math.pi * it / self.max_iter))

    def _before_step(self) -> None:
        """The schedules that are a function of the iteration, besides the lr: the weight decay of the groups that
        decay, and the parts' progress (pretrain.methods.Progress)."""
        if self.cfg.SOLVER.WEIGHT_DECAY_END >= 0:
            for i in self.decay_groups:
                self.optimizer.param_groups[i]["weight_decay"] = self.weight_decay(self.iter)
        self.model.set_progress(self.iter, self.iters_per_epoch, self.max_iter)

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        teacher = self.model.teacher
        return {
            "format": CHECKPOINT_FORMAT,
            # the method's state: student, testbed (momentum encoder, queue ...), distillers; not the frozen teacher,
            # which is reloaded from MODEL.TEACHER.WEIGHTS (only BN_TRAIN changes its buffers, kept below)
            "model": {k: v for k, v in self.model.state_dict().items() if not k.startswith("teacher.")},
            "teacher_buffers": dict(teacher.named_buffers()) if teacher is not None else {},
            # the module of "model" that the run exports (pretrain.formats reads it: the student, DINO's teacher)
            "exported": next(n for n, m in self.model.named_modules() if m is self.model.exported()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iter": self.iter,  # global iterations done; epoch and sampler position follow from it
            "epoch": self.iter // self.iters_per_epoch,
            "skipped_images": self.skipped_images,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "cfg": self.cfg.dump(),
        }

    def load_state_dict(self, state: dict) -> None:
        model_state = state["model"] if "model" in state else _model_state_from_v1(state, self.cfg)
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise KeyError(f"the checkpoint's method state does not match {self.model.description}: missing "
                           f"{missing[:8]}, unexpected {unexpected[:8]}. Was it written with another METHOD? Use a "
                           f"new OUTPUT_DIR for another method.")
        if self.model.teacher is not None and state["teacher_buffers"]:
            self.model.teacher.load_state_dict(state["teacher_buffers"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule follows this config's SOLVER.BASE_LR (the loaded states carry the checkpoint's): identical
        # values when it is unchanged, the new lr when a resume changes it on purpose (TRAIN.RESUME_CHANGED_CONFIG)
        self.scheduler.base_lrs = [self.base_lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.base_lr
            group["lr"] = self.base_lr * self.lr_factor(self.scheduler.last_epoch)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.iter, self.skipped_images = state["iter"], state["skipped_images"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self) -> Optional[str]:
        path = self.checkpointer.save(self.state_dict(), self.iter) if self.rank == 0 else None
        du.barrier()
        if path:
            logger.info("saved %s", path)
        return path

    def resume_or_start(self) -> None:
        """Continue from the newest readable checkpoint (unreadable ones are moved aside) if its config is this run's
        (:mod:`pretrain.cfgdiff`), else start at iteration 0; then write ``config.yaml`` (what runs now) and drop
        the ``metrics.jsonl`` records past the starting iteration."""
        state, path = self.checkpointer.load_latest(quarantine=self.rank == 0)
        if state is None:
            if self.require_checkpoint:
                raise FileNotFoundError(f"--resume: no readable checkpoint in {self.checkpointer.dir}")
            logger.info("no checkpoint in %s: starting from iteration 0", self.checkpointer.dir)
        else:
            # a key left to "auto" may resolve otherwise than in the checkpoint on other hardware (a bf16 run
            # continued on a CPU without native bf16): allowed, since auto asks for this machine's choice, and recorded
            # in config_changes.jsonl; a value set explicitly that differs still stops the resume
            changes = check_resume(current_form(state["cfg"]), self.cfg, SAFE_ON_RESUME + tuple(self.auto_keys),
                                   "TRAIN.RESUME_CHANGED_CONFIG", path)
            self.load_state_dict(state)
            logger.info("resumed from %s at iteration %d (epoch %d)", path, self.iter,
                        self.iter // self.iters_per_epoch)
            if changes:
                logger.warning("resumed with config changes: %s", {k: list(v) for k, v in changes.items()})
                if self.rank == 0:
                    record_changes(self.cfg.OUTPUT_DIR, self.iter, changes)
        if self.rank == 0:
            save_cfg(self.cfg, os.path.join(self.cfg.OUTPUT_DIR, "config.yaml"))
            truncate_metrics(self.cfg.OUTPUT_DIR, "iter", self.iter)

    # ------------------------------------------------------------------------------------------------------------
    def _finite_check(self, losses: Dict[str, torch.Tensor]) -> None:
        keys = sorted(losses)
        values = torch.stack([losses[k].float() for k in keys]).detach()
        # every process must stop together, not hang in the next all-reduce
        if du.any_process(not torch.isfinite(values).all().item(), self.device):
            shown = ", ".join(f"{k}={v.item()}" for k, v in zip(keys, values))
            good = self.checkpointer.quarantine_nonfinite(self.iter) if self.rank == 0 else None
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iter + 1} ({shown}); stopping without saving. "
                + (f"The newest checkpoint whose weights have not diverged is {good} (newer ones were moved aside "
                   f"as *.nonfinite); continue "
                   f"from it with a lower SOLVER.BASE_LR (or TRAIN.AMP.ENABLED False) and "
                   f"TRAIN.RESUME_CHANGED_CONFIG True, or start a new OUTPUT_DIR." if good else
                   "No checkpoint before it is usable (the diverged ones were moved aside as *.nonfinite): rerun "
                   "with a lower SOLVER.BASE_LR (or TRAIN.AMP.ENABLED False); the run starts over."))

    def run(self) -> Optional[Dict[str, str]]:
        self.setup()
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> Optional[Dict[str, str]]:
        self.resume_or_start()
        cfg = self.cfg
        self.stop_at = min(cfg.TRAIN.STOP_AT_ITER if cfg.TRAIN.STOP_AT_ITER >= 0 else self.max_iter, self.max_iter)
        self.model_ddp.train()
        try:
            for hook in self.hooks:
                hook.before_train()
            while self.iter < self.stop_at:
                self.epoch = self.iter // self.iters_per_epoch
                self.sampler.set_epoch(self.epoch, self.iter % self.iters_per_epoch)
                for views, _, skipped in self.loader:
                    views = [v.to(self.device, non_blocking=True) for v in views]
                    if cfg.MODEL.CHANNELS_LAST:
                        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                    self._before_step()
                    self.losses = train_step(self.model_ddp, views, self.optimizer, self.scaler,
                                             amp_dtype=self.amp_dtype, finite_check=self._finite_check,
                                             clip_grad=cfg.SOLVER.CLIP_GRAD)
                    self.lr = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step()
                    self.iter += 1
                    self.skipped_images += int(skipped.sum())
                    for hook in self.hooks:
                        hook.after_step()
                    if self.iter >= self.stop_at and self.iter % self.iters_per_epoch:
                        break  # mid-epoch stop; at an epoch end the loader is exhausted anyway
                else:  # a full epoch
                    for hook in self.hooks:
                        hook.after_epoch()
        finally:
            for hook in self.hooks:
                hook.after_train()
        # DDP keeps the replicas' parameters identical (BN running statistics stay per process, as in MoCo)
        checksum = sum(p.double().sum().item() for p in self.model.student.parameters())
        logger.info("iteration %d: student parameter checksum %r", self.iter, checksum)
        if self.iter < self.max_iter:
            logger.info("stopped at iteration %d of %d (%s); run again to continue", self.iter, self.max_iter,
                        "on request" if self.stopped_by_request else "TRAIN.STOP_AT_ITER")
            if self.stopped_by_request:
                raise Preempted(f"stopped on request at iteration {self.iter}; "
                                f"checkpoint {self.checkpointer.list()[0]}")
            return None
        return self.export()

    def evaluate(self) -> Dict[str, float]:
        """kNN accuracy of the newest checkpoint in OUTPUT_DIR (``--eval-only``)."""
        self.require_checkpoint = True
        self.setup()
        try:
            self.resume_or_start()
            if self.knn is None:
                raise ValueError("--eval-only runs the kNN monitor: set DATA.VAL_DIR")
            acc = self.knn.evaluate()
            if self.rank == 0:
                logger.info("iteration %d: kNN top-1 %.2f top-5 %.2f", self.iter, acc["top1"], acc["top5"])
            du.barrier()
            return acc
        finally:
            self.lock.release()

    def export(self) -> Dict[str, str]:
        paths = export_student(self.model.exported(), self.cfg, self.iter, self.iter // self.iters_per_epoch)
        du.barrier()
        return paths


def _model_state_from_v1(state: dict, cfg: CfgNode) -> dict:
    """The method state of a checkpoint written before methods were plug-ins (``student``: MoCo's ``encoder_q.*``,
    ``encoder_k.*``, ``queue``, ``queue_ptr``): the same tensors under the MoCo-v2 testbed's names."""
    if "student" not in state or cfg.METHOD.TESTBED != "mocov2":
        raise KeyError("the checkpoint has no method state ('model'), and is not a MoCo-v2 checkpoint of an earlier "
                       "version either; use a new OUTPUT_DIR")
    out = {}
    for k, v in state["student"].items():
        out[("student." + k[len("encoder_q."):]) if k.startswith("encoder_q.") else f"testbed.{k}"] = v
    return out
