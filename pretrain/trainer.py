"""``Trainer(cfg)``: build -> resume -> loop -> checkpoint -> export. The same object runs local and SLURM jobs."""
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed as du
from .backbones import get_spec
from .checkpoint import Checkpointer, export_encoder, load_strict, load_teacher
from .config import CfgNode, save_cfg
from .data import ImageFolder, MultiViewDataset, ResumableSampler, moco_v2_transform
from .engine import train_step
from .model import DisCo, MoCoV2, build_encoder

logger = logging.getLogger("pretrain")


def setup_logging(output_dir: str, rank: int) -> None:
    log = logging.getLogger()
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_pretrain", False):
            log.removeHandler(h)
    fmt = logging.Formatter(f"[%(asctime)s r{rank}] %(name)s %(levelname)s: %(message)s", "%m/%d %H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(output_dir, "log.txt" if rank == 0 else f"log.rank{rank}.txt"))]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h._pretrain = True
        log.addHandler(h)


def truncate_metrics(output_dir: str, key: str, last: int) -> None:
    """Drop the ``metrics.jsonl`` lines whose ``key`` (iter / epoch) is past the checkpoint a run resumed from:
    the resumed run writes them again."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get(key, 0) <= last]
    with open(path, "w") as f:
        f.writelines(keep)


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM / SIGUSR2) and has written its checkpoint."""


def amp_dtype(cfg: CfgNode, enabled: bool) -> Optional[torch.dtype]:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.TRAIN.AMP.DTYPE] if enabled else None


def build_student_encoder(cfg: CfgNode):
    s = cfg.MODEL.STUDENT
    return build_encoder(s.ARCH, s.HEAD.HIDDEN_DIM, s.HEAD.OUT_DIM, s.HEAD.NUM_LAYERS, s.HEAD.BN)


def build_model(cfg: CfgNode) -> DisCo:
    s = cfg.MODEL.STUDENT
    m = cfg.MODEL.MOCO
    student = MoCoV2(build_student_encoder(cfg), m.QUEUE_SIZE, m.MOMENTUM, m.SHUFFLE_BN, m.BN_SPLITS)
    if s.WEIGHTS:
        sd = torch.load(s.WEIGHTS, map_location="cpu", weights_only=True)
        load_strict(student.encoder_q.backbone, sd.get("state_dict", sd), f"student weights {s.WEIGHTS}")
        student.encoder_k.load_state_dict(student.encoder_q.state_dict())
    teacher = None
    if cfg.METHOD == "disco":
        teacher, info = load_teacher(cfg.MODEL.TEACHER.WEIGHTS, cfg.MODEL.TEACHER.ARCH)
        logger.info("teacher %s from %s (%s format, head %s; ignored %d keys: %s)", cfg.MODEL.TEACHER.ARCH,
                    cfg.MODEL.TEACHER.WEIGHTS, info["format"], info["head"], len(info["ignored_keys"]),
                    info["ignored_keys"][:6])
        if info["head"]["out_dim"] != s.HEAD.OUT_DIM:
            raise ValueError(f"teacher embeddings are {info['head']['out_dim']}-d but MODEL.STUDENT.HEAD.OUT_DIM is "
                             f"{s.HEAD.OUT_DIM}; set it to {info['head']['out_dim']}")
    return DisCo(student, teacher, cfg.MODEL.TEACHER.BN_TRAIN, amp_dtype(cfg, cfg.TRAIN.AMP.TEACHER))


class Trainer:
    """Pretrain with ``cfg``. A run always continues from the newest readable checkpoint in OUTPUT_DIR (so a requeued
    or restarted job never overwrites its own progress); ``require_checkpoint`` makes a missing one an error."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # what SLURM / schedulers send before killing a job

    def __init__(self, cfg: CfgNode, require_checkpoint: bool = False):
        self.cfg, self.require_checkpoint = cfg, require_checkpoint
        self.stop_requested = False  # set by request_stop(), e.g. from a signal handler
        self.stopped_by_request = False

    def request_stop(self, signum=None, frame=None) -> None:
        """Ask the run to checkpoint and stop at the next iteration boundary. Safe to call from a signal handler:
        it only sets a flag; the loop (all processes together) saves a consistent checkpoint and returns."""
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal that reached any process stops all of them
        return flag.item() > 0

    # ------------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = du.init_distributed()
        self.rank, self.world = du.get_rank(), du.get_world_size()
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        setup_logging(cfg.OUTPUT_DIR, self.rank)
        if self.rank == 0:
            save_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
        if cfg.TRAIN.DETERMINISTIC:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.SEED)  # identical initial weights on every process
        np.random.seed(cfg.SEED)
        random.seed(cfg.SEED)

        self.amp_dtype = amp_dtype(cfg, cfg.TRAIN.AMP.ENABLED)
        if cfg.TRAIN.AMP.DTYPE == "float16" and self.device.type != "cuda" and (cfg.TRAIN.AMP.ENABLED or
                                                                              cfg.TRAIN.AMP.TEACHER):
            raise ValueError("TRAIN.AMP.DTYPE float16 needs a GPU; use bfloat16 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        base = ImageFolder(cfg.DATA.TRAIN_DIR)
        total_batch = cfg.SOLVER.IMS_PER_BATCH
        if cfg.MODEL.MOCO.QUEUE_SIZE % total_batch:
            raise ValueError(f"MODEL.MOCO.QUEUE_SIZE {cfg.MODEL.MOCO.QUEUE_SIZE} must be a multiple of "
                             f"SOLVER.IMS_PER_BATCH {total_batch} (the queue advances one global batch per step)")
        self.sampler = ResumableSampler(len(base), total_batch, self.rank, self.world, cfg.SEED)
        d = cfg.DATA
        transform = moco_v2_transform(d.IMAGE_SIZE, d.CROP_SCALE, d.BLUR_SIGMA, d.MEAN, d.STD, d.COLOR_JITTER,
                                      d.GRAYSCALE_P)
        dataset = MultiViewDataset(base, transform, cfg.SEED, skip_corrupt=d.SKIP_CORRUPT)
        self.loader = DataLoader(dataset, batch_size=self.sampler.local_batch, sampler=self.sampler, drop_last=True,
                                 num_workers=d.NUM_WORKERS, pin_memory=self.device.type == "cuda",
                                 persistent_workers=d.NUM_WORKERS > 0,
                                 # its own generator: creating an iterator must not draw from the global RNG, whose
                                 # state the checkpoint restores (augmentations are seeded per sample anyway)
                                 generator=torch.Generator().manual_seed(cfg.SEED))
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.max_iter = self.iters_per_epoch * cfg.SOLVER.EPOCHS

        self.model = build_model(cfg).to(self.device)
        if cfg.MODEL.CHANNELS_LAST:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type ==
                                                  "cuda" else None) if self.world > 1 else self.model)
        lr = cfg.SOLVER.BASE_LR * total_batch / cfg.SOLVER.REFERENCE_BATCH
        params = self.model.student.encoder_q.parameters()  # the teacher and the key encoder are never optimised
        if cfg.SOLVER.OPTIMIZER == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.SOLVER.MOMENTUM,
                                             weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.SOLVER.MOMENTUM, 0.999),
                                               weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.checkpointer = Checkpointer(cfg.OUTPUT_DIR, cfg.TRAIN.MAX_TO_KEEP)
        self.iter, self.skipped_images = 0, 0
        self.knn_data = self.build_knn_data() if d.VAL_DIR and cfg.TEST.KNN.PERIOD >= 0 else None
        amp = (cfg.TRAIN.AMP.DTYPE if self.amp_dtype else "off") + (
            f" (teacher {cfg.TRAIN.AMP.DTYPE})" if cfg.TRAIN.AMP.TEACHER else "")
        logger.info("%s: %s student%s, %d images, %d processes x %d, %d iters/epoch, %d epochs, lr %.4g, AMP %s",
                    cfg.METHOD, cfg.MODEL.STUDENT.ARCH, f" <- {cfg.MODEL.TEACHER.ARCH} teacher"
                    if cfg.METHOD == "disco" else "", len(base), self.world, self.sampler.local_batch,
                    self.iters_per_epoch, cfg.SOLVER.EPOCHS, lr, amp)

    def lr_factor(self, it: int) -> float:
        """Linear warm-up then cosine decay (per epoch as MoCo-v2, or per iteration)."""
        s = self.cfg.SOLVER
        warm = s.WARMUP_EPOCHS * self.iters_per_epoch
        if it < warm:
            return (it + 1) / warm
        t = it if s.COSINE_PER_ITER else (it // self.iters_per_epoch) * self.iters_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, self.max_iter - warm)))

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        teacher = self.model.teacher
        return {
            "student": self.model.student.state_dict(),  # query + momentum encoders, queue, queue_ptr
            # the frozen teacher is reloaded from MODEL.TEACHER.WEIGHTS; only BN_TRAIN changes its buffers
            "teacher_buffers": {k: v for k, v in teacher.named_buffers()} if teacher is not None else {},
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
        self.model.student.load_state_dict(state["student"])  # the resumed queue wins; teacher loading never touches it
        if self.model.teacher is not None and state["teacher_buffers"]:
            self.model.teacher.load_state_dict(state["teacher_buffers"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
        state, path = self.checkpointer.load_latest()
        if state is None:
            if self.require_checkpoint:
                raise FileNotFoundError(f"--resume: no readable checkpoint in {self.checkpointer.dir}")
            logger.info("no checkpoint in %s: starting from iteration 0", self.checkpointer.dir)
            return
        self.load_state_dict(state)
        logger.info("resumed from %s at iteration %d (epoch %d)", path, self.iter, self.iter // self.iters_per_epoch)
        if self.rank == 0:
            truncate_metrics(self.cfg.OUTPUT_DIR, "iter", self.iter)

    # ------------------------------------------------------------------------------------------------------------
    def _finite_check(self, losses: Dict[str, torch.Tensor]) -> None:
        values = torch.stack([losses["loss"], losses["loss_dis"], losses["loss_co"]]).detach().float()
        if self.world > 1:  # every process must stop together, not hang in the next all-reduce
            flag = (~torch.isfinite(values)).any().float().reshape(1)
            dist.all_reduce(flag)
            bad = flag.item() > 0
        else:
            bad = not torch.isfinite(values).all().item()
        if bad:
            last = self.checkpointer.list()
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iter} (loss={values[0].item()}, loss_dis={values[1].item()}, "
                f"loss_co={values[2].item()}); stopping without saving. The last good checkpoint is "
                f"{last[0] if last else '(none yet)'}. Lower SOLVER.BASE_LR, or turn off TRAIN.AMP.ENABLED.")

    def run(self) -> Optional[Dict[str, str]]:
        self.setup()
        self.resume_or_start()
        cfg = self.cfg
        stop_at = cfg.TRAIN.STOP_AT_ITER if cfg.TRAIN.STOP_AT_ITER >= 0 else self.max_iter
        writer = metrics = bar = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            writer = SummaryWriter(os.path.join(cfg.OUTPUT_DIR, "tb"), purge_step=self.iter)
            metrics = open(os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl"), "a")
            bar = tqdm(total=self.max_iter, initial=self.iter, desc=f"{cfg.METHOD} {cfg.MODEL.STUDENT.ARCH}",
                       unit="it", dynamic_ncols=True, mininterval=1.0 if sys.stdout.isatty() else 30.0)
        self.model_ddp.train()
        dis_w = cfg.LOSS.DISCO.WEIGHT if cfg.METHOD == "disco" else 0.0
        previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.STOP_SIGNALS:
                previous_handlers[sig] = signal.signal(sig, self.request_stop)
        t_last, n_last = time.perf_counter(), 0
        try:
            while self.iter < min(stop_at, self.max_iter):
                epoch = self.iter // self.iters_per_epoch
                self.sampler.set_epoch(epoch, self.iter % self.iters_per_epoch)
                for views, _, skipped in self.loader:
                    views = [v.to(self.device, non_blocking=True) for v in views]
                    if cfg.MODEL.CHANNELS_LAST:
                        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                    losses = train_step(self.model_ddp, views, self.optimizer, self.scaler, dis_weight=dis_w,
                                        co_weight=cfg.LOSS.CONTRASTIVE.WEIGHT,
                                        temperature=cfg.MODEL.MOCO.TEMPERATURE, amp_dtype=self.amp_dtype,
                                        finite_check=self._finite_check)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step()
                    self.iter += 1
                    self.skipped_images += int(skipped.sum())
                    n_last += views[0].shape[0] * self.world
                    if self.iter % cfg.TRAIN.LOG_PERIOD == 0 or self.iter == self.max_iter:
                        t_now = time.perf_counter()
                        self._log(writer, metrics, bar, losses, lr, epoch, n_last / (t_now - t_last))
                        t_last, n_last = t_now, 0
                    elif bar is not None:
                        bar.update(1)
                    end_of_epoch = self.iter % self.iters_per_epoch == 0
                    if self._stop_agreed():
                        self.stopped_by_request = True
                        stop_at = self.iter
                        logger.info("stop requested (signal): checkpointing at iteration %d", self.iter)
                    if self.iter % cfg.TRAIN.CHECKPOINT_PERIOD == 0 or end_of_epoch or self.iter == stop_at:
                        self.save_checkpoint()
                    if self.iter >= stop_at and not end_of_epoch:
                        break  # mid-epoch stop; at an epoch end the loader is exhausted anyway
                else:  # a full epoch
                    self._maybe_knn(epoch + 1, writer, metrics)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
                metrics.close()
        # DDP keeps the replicas' parameters identical (BN running statistics stay per process, as in MoCo)
        checksum = sum(p.double().sum().item() for p in self.model.student.encoder_q.parameters())
        logger.info("iteration %d: student parameter checksum %r", self.iter, checksum)
        if self.iter < self.max_iter:
            logger.info("stopped at iteration %d of %d (%s); run again to continue", self.iter, self.max_iter,
                        "on request" if self.stopped_by_request else "TRAIN.STOP_AT_ITER")
            if self.stopped_by_request:
                raise Preempted(f"stopped on request at iteration {self.iter}; "
                                f"checkpoint {self.checkpointer.list()[0]}")
            return None
        return self.export()

    def _log(self, writer, metrics, bar, losses, lr, epoch, images_per_s) -> None:
        values = torch.stack([losses["loss"], losses["loss_dis"], losses["loss_co"],
                              torch.tensor(float(self.skipped_images), device=losses["loss"].device)]).float()
        if self.world > 1:
            dist.all_reduce(values)
            values[:3] /= self.world
        if self.rank != 0:
            return
        rec = {"iter": self.iter, "epoch": epoch, "lr": lr, "loss": values[0].item(), "loss_dis": values[1].item(),
               "loss_co": values[2].item(), "images_per_s": round(images_per_s, 2),
               "skipped_images": int(values[3].item())}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        for k in ("lr", "loss", "loss_dis", "loss_co", "images_per_s"):
            writer.add_scalar(f"train/{k}", rec[k], self.iter)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.1f}", refresh=False)
        bar.update(self.iter - bar.n)

    # ------------------------------------------------------------------------------------------------------------
    def build_knn_data(self):
        from transfer.knn import build_knn_loaders

        cfg, d = self.cfg, self.cfg.DATA
        return build_knn_loaders(d.TRAIN_DIR, d.VAL_DIR, cfg.TEST.KNN.IMAGE_SIZE, cfg.TEST.KNN.MAX_TRAIN_IMAGES,
                                 max(1, self.sampler.local_batch), d.NUM_WORKERS, cfg.SEED, d.MEAN, d.STD)

    def knn_eval(self) -> Dict[str, float]:
        from transfer.knn import knn_evaluate

        return knn_evaluate(self.model.student.encoder_q.backbone, self.knn_data, self.device, self.cfg.TEST.KNN.K,
                            self.cfg.TEST.KNN.TEMPERATURE, self.amp_dtype, self.cfg.MODEL.CHANNELS_LAST)

    def _maybe_knn(self, epochs_done: int, writer, metrics) -> None:
        period = self.cfg.TEST.KNN.PERIOD
        last = epochs_done == self.cfg.SOLVER.EPOCHS
        if self.knn_data is None or not (last or (period > 0 and epochs_done % period == 0)):
            return
        if self.rank == 0:
            acc = self.knn_eval()
            logger.info("epoch %d: kNN top-1 %.2f top-5 %.2f", epochs_done, acc["top1"], acc["top5"])
            metrics.write(json.dumps({"iter": self.iter, "epoch": epochs_done, "knn_top1": acc["top1"],
                                      "knn_top5": acc["top5"]}) + "\n")
            metrics.flush()
            writer.add_scalar("knn/top1", acc["top1"], self.iter)
        du.barrier()

    def evaluate(self) -> Dict[str, float]:
        """kNN accuracy of the newest checkpoint in OUTPUT_DIR (``--eval-only``)."""
        self.require_checkpoint = True
        self.setup()
        self.resume_or_start()
        if self.knn_data is None:
            raise ValueError("--eval-only runs the kNN monitor: set DATA.VAL_DIR")
        acc = self.knn_eval() if self.rank == 0 else {}
        if acc:
            logger.info("iteration %d: kNN top-1 %.2f top-5 %.2f", self.iter, acc["top1"], acc["top5"])
        du.barrier()
        return acc

    def export(self) -> Dict[str, str]:
        paths = export_student(self.model.student.encoder_q, self.cfg, self.iter, self.iter // self.iters_per_epoch)
        du.barrier()
        return paths


def export_student(encoder, cfg: CfgNode, iteration: int, epoch: int, out_dir: str = "") -> Dict[str, str]:
    """Write the student's backbone (timm keys) and head to ``out_dir`` (default ``OUTPUT_DIR/export``)."""
    paths = {}
    if du.is_main_process():
        arch = cfg.MODEL.STUDENT.ARCH
        meta = {"method": cfg.METHOD, "epoch": epoch, "iteration": iteration,
                "feature_dim": get_spec(arch).feature_dim, "config": cfg.dump(),
                "teacher": {"arch": cfg.MODEL.TEACHER.ARCH, "weights": cfg.MODEL.TEACHER.WEIGHTS}
                if cfg.METHOD == "disco" else None}
        paths = export_encoder(encoder, arch, out_dir or os.path.join(cfg.OUTPUT_DIR, "export"), arch, meta)
        logger.info("exported %s", paths)
    return paths


def export_from_checkpoint(checkpoint: str, out_dir: str) -> Dict[str, str]:
    """Export the student of an iteration checkpoint; its config travels inside the checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "student" not in state or "cfg" not in state:
        raise ValueError(f"{checkpoint} is not a pretraining checkpoint of this project (no 'student' / 'cfg')")
    cfg = CfgNode.load_cfg(state["cfg"])
    encoder = build_student_encoder(cfg)
    prefix = "encoder_q."
    load_strict(encoder, {k[len(prefix):]: v for k, v in state["student"].items() if k.startswith(prefix)},
                f"student of {checkpoint}")
    return export_student(encoder, cfg, state["iter"], state["epoch"], out_dir)
