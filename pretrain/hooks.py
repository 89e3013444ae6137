"""What the pretraining loop does besides stepping, as hooks (detectron2's ``HookBase`` shape): metrics,
preemption, periodic checkpoints, the online kNN monitor. The loop calls, in the order the hooks are listed,
``before_train``, ``after_step`` after every iteration, ``after_epoch`` after every full epoch, ``after_train``."""
import json
import logging
import os
import sys
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import distributed as du
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
