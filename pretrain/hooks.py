"""What the pretraining loop does besides stepping, as hooks (detectron2's ``HookBase`` shape): metrics,
preemption, periodic checkpoints, the online kNN monitor, the teacher health check and the chance-level monitor.
The loop calls, in the order the hooks are listed, ``before_train``, ``after_step`` after every iteration,
``after_epoch`` after every full epoch, ``after_train``."""
import json
import logging
import os
import sys
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import distributed as du
from .health import ChanceLevel, check_teacher, reads_teacher_embedding, record_summary
from .knn import KnnData, knn_evaluate
from .preemption import StopRequest

logger = logging.getLogger("pretrain")


class HookBase:
    trainer = None  # set by the trainer before before_train

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class MetricsWriter(HookBase):
    """Every ``period`` iterations (and at the last one): ``loss`` and every ``loss_*`` term the method returned,
    averaged over processes, with lr, throughput and skipped images, to ``metrics.jsonl`` (one JSON object per line),
    TensorBoard (``train/<key>``) and the progress bar. Other hooks write their records through :meth:`write`."""

    def __init__(self, period: int):
        self.period = period
        self.writer = self.file = self.bar = None

    def before_train(self) -> None:
        t = self.trainer
        if t.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(os.path.join(t.cfg.OUTPUT_DIR, "tb"), purge_step=t.iter)
            self.file = open(os.path.join(t.cfg.OUTPUT_DIR, "metrics.jsonl"), "a")
            self.bar = tqdm(total=t.max_iter, initial=t.iter, desc=f"{t.model.description} {t.cfg.MODEL.STUDENT.ARCH}",
                            unit="it", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self._t, self._iter = time.perf_counter(), t.iter

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period and t.iter != t.max_iter:
            if self.bar is not None:
                self.bar.update(1)
            return
        now = time.perf_counter()
        images_per_s = (t.iter - self._iter) * t.cfg.SOLVER.IMS_PER_BATCH / (now - self._t)
        self._t, self._iter = now, t.iter
        keys = ["loss"] + sorted(k for k in t.losses if k.startswith("loss_"))
        values = torch.stack([t.losses[k].float() for k in keys] +
                             [torch.tensor(float(t.skipped_images), device=t.losses["loss"].device)])
        if t.world > 1:
            dist.all_reduce(values)
            values[:len(keys)] /= t.world
        if t.rank != 0:
            return
        rec = {"iter": t.iter, "epoch": t.epoch, "lr": t.lr, **{k: values[i].item() for i, k in enumerate(keys)},
               "images_per_s": round(images_per_s, 2), "skipped_images": int(values[-1].item())}
        self.write(rec)
        for k in ("lr", *keys, "images_per_s"):
            self.writer.add_scalar(f"train/{k}", rec[k], t.iter)
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{t.lr:.3g}", img_s=f"{images_per_s:.1f}", refresh=False)
        self.bar.update(t.iter - self.bar.n)

    def write(self, rec: dict) -> None:
        """Append one record to metrics.jsonl (rank 0)."""
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.writer.close()
            self.file.close()


class PreemptionHook(HookBase):
    """SIGTERM / SIGUSR2 -> all processes agree after the iteration that just finished -> the trainer stops there
    (the checkpointer, next in line, writes that iteration) and raises ``Preempted`` (:mod:`pretrain.preemption`)."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def before_train(self) -> None:
        self.stop.install()

    def after_step(self) -> None:
        t = self.trainer
        if self.stop.agreed(t.device):
            t.stopped_by_request = True
            t.stop_at = t.iter
            logger.info("stop requested (signal): checkpointing at iteration %d", t.iter)

    def after_train(self) -> None:
        self.stop.restore()


class PeriodicCheckpointer(HookBase):
    """A checkpoint every ``period`` iterations, at the end of every epoch and where the run stops."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period == 0 or t.iter % t.iters_per_epoch == 0 or t.iter == t.stop_at:
            t.save_checkpoint()


class KnnMonitor(HookBase):
    """kNN top-1 / top-5 of the exported encoder's backbone on DATA.VAL_DIR every TEST.KNN.PERIOD epochs and after
    the last (``knn_top1`` / ``knn_top5`` records, TensorBoard ``knn/top1``)."""

    def __init__(self, data: KnnData, period: int, metrics: Optional[MetricsWriter]):
        self.data, self.period, self.metrics = data, period, metrics

    def evaluate(self) -> Dict[str, float]:
        t = self.trainer
        cfg = t.cfg
        return knn_evaluate(t.model.exported().backbone, self.data, t.device, cfg.TEST.KNN.K,
                            cfg.TEST.KNN.TEMPERATURE, max(1, t.sampler.local_batch), cfg.DATA.NUM_WORKERS,
                            t.amp_dtype, cfg.MODEL.CHANNELS_LAST)

    def after_epoch(self) -> None:
        t = self.trainer
        epochs_done = t.iter // t.iters_per_epoch
        if not (epochs_done == t.cfg.SOLVER.EPOCHS or (self.period > 0 and epochs_done % self.period == 0)):
            return
        acc = self.evaluate()
        if t.rank == 0:
            logger.info("epoch %d: kNN top-1 %.2f top-5 %.2f", epochs_done, acc["top1"], acc["top5"])
            self.metrics.write({"iter": t.iter, "epoch": epochs_done, "knn_top1": acc["top1"],
                                "knn_top5": acc["top5"]})
            self.metrics.writer.add_scalar("knn/top1", acc["top1"], t.iter)
        du.barrier()


class TeacherHealthCheck(HookBase):
    """Once, before the first step of a fresh run (not when resuming) that distils the teacher's projection embedding
    (some distiller's ``teacher_embedding``), on rank 0: the teacher's embedding health on TEST.TEACHER_HEALTH.IMAGES
    training images (0 = off; :func:`pretrain.health.check_teacher`), logged in one line, written to metrics.jsonl
    as one record (``iter`` 0, ``teacher_mean_cosine``, ``teacher_effective_rank``, ``teacher_std``,
    ``teacher_collapsed``, ...) and, when the embedding is collapsed, a WARNING naming what to do. The run goes on
    either way; the check draws nothing from the RNGs, so the run is the same with it on or off."""

    def __init__(self, metrics: Optional[MetricsWriter]):
        self.metrics = metrics
        self.result: Optional[dict] = None  # check_teacher's record, when the check ran

    def before_train(self) -> None:
        t = self.trainer
        model, images = t.model, t.cfg.TEST.TEACHER_HEALTH.IMAGES
        if images <= 0 or t.iter > 0 or t.rank != 0 or model.teacher is None:
            return
        distillers = reads_teacher_embedding(model.distillers)
        if not distillers:
            return
        self.result = check_teacher(t.cfg, model.teacher, t.device, model.teacher_amp_dtype, images, distillers)
        (logger.warning if self.result["teacher_collapsed"] else logger.info)(self.result["message"])
        if self.metrics is not None:
            self.metrics.write({"iter": t.iter, "epoch": 0, **record_summary(self.result)})


class ChanceLevelMonitor(HookBase):
    """The testbed's loss terms that have a chance level (``chance_losses``: MoCo-v2's InfoNCE ``loss_mocov2`` at
    w * ln(K + 1)) against it, on rank 0: every epoch one log line (the mean of the epoch's logged values and its
    ratio to chance), and one WARNING, naming what to do, when a term stayed within
    :data:`pretrain.health.CHANCE_REL_TOL` of chance at every logged step (TRAIN.LOG_PERIOD) for at least an epoch
    (:class:`pretrain.health.ChanceLevel`): the student then tells its positive key from the queue no better than a
    uniform guess, typically because its key encoder puts every image in one direction (a collapsed teacher
    distilled into it, or a collapsed run)."""

    def __init__(self) -> None:
        self.levels: Dict[str, ChanceLevel] = {}
        self.epoch_values: Dict[str, list] = {}

    def before_train(self) -> None:
        t = self.trainer
        if t.rank != 0:
            return
        chance = {}
        for part in t.model.parts():
            chance.update(part.chance_losses())
        self.levels = {k: ChanceLevel(v, t.iters_per_epoch) for k, v in chance.items()}
        self.epoch_values = {k: [] for k in chance}

    def after_step(self) -> None:
        t = self.trainer
        if not self.levels or (t.iter % t.cfg.TRAIN.LOG_PERIOD and t.iter != t.max_iter):
            return
        for key, level in self.levels.items():
            if key not in t.losses:
                continue
            value = float(t.losses[key])  # this process's value, at logged steps only (no extra synchronisation)
            self.epoch_values[key].append(value)
            if level.update(t.iter, value):
                logger.warning(
                    "%s has been at its chance level %.4f (its value when the student's outputs carry no "
                    "information, e.g. InfoNCE's ln(K + 1) times its weight) within %g %% at every logged step since "
                    "iteration %d (now %d, %.4f): the student does no better than chance, typically because its "
                    "outputs (or its key encoder's) map every image to one direction (for MoCo-v2 see the queue: "
                    "its entries barely differ). If the "
                    "run distils a teacher, check the teacher's embedding (the teacher health line at the start of "
                    "this log, or tools/teacher_health.py): distilling a collapsed one causes this; then train the "
                    "teacher differently, distil another layer or lower the distillation weight. Without a teacher "
                    "the student collapsed on its own: try a lower SOLVER.BASE_LR.", key, level.chance,
                    100 * level.rel_tol, level.first, t.iter, value)

    def after_epoch(self) -> None:
        t = self.trainer
        for key, values in self.epoch_values.items():
            if values:
                mean, chance = sum(values) / len(values), self.levels[key].chance
                logger.info("epoch %d: %s %.4f, %.3f x its chance level %.4f (outputs without information)",
                            t.iter // t.iters_per_epoch, key, mean, mean / chance, chance)
            values.clear()
