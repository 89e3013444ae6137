"""MoCo-v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder, a queue of keys, shuffle-BN and InfoNCE.
DisCo's testbed (its L_co) and the recipe of the teachers and baselines."""
import copy
import math

import torch
import torch.nn.functional as F

from ..cfgnode import CN, check_ranges
from ..distributed import broadcast_, concat_all_gather, get_rank, get_world_size
from ..losses import infonce_loss
from ..methods import TESTBEDS, Testbed


@TESTBEDS.register()
class MoCoV2(Testbed):
    """The student is MoCo's query encoder; this part holds the key encoder and the queue.

    targets: momentum update, then ``k`` = key encoder on view 2 (E'_m, NxC) and ``queue`` (CxK, as it was before
    this batch). losses: InfoNCE of the student's view-1 embedding E_s against k and the queue (only q enters it, as
    in MoCo and the official DisCo code). after_step: enqueue the keys of all processes.
    """

    name = "mocov2"
    student_views = (0,)

    def __init__(self, student, queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
                 shuffle_bn: bool = True, bn_splits: int = 1, weight: float = 1.0):
        super().__init__()
        self.momentum, self.temperature, self.weight = momentum, temperature, weight
        self.shuffle_bn, self.bn_splits = shuffle_bn, bn_splits
        self.encoder_k = copy.deepcopy(student)
        self.encoder_k.requires_grad_(False)
        dim = student.head[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # CxK
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def add_config(cfg) -> None:
        cfg.MODEL.MOCO = CN()
        cfg.MODEL.MOCO.QUEUE_SIZE = 65536  # K, number of negative keys; must be a multiple of the total batch size
        cfg.MODEL.MOCO.MOMENTUM = 0.999  # m, momentum of the key encoder update
        cfg.MODEL.MOCO.TEMPERATURE = 0.2  # T, softmax temperature of InfoNCE (MoCo-v2: 0.2)
        cfg.MODEL.MOCO.SHUFFLE_BN = True  # shuffle the key batch before the momentum encoder (across processes)
        cfg.MODEL.MOCO.BN_SPLITS = 1  # BN groups per process for the shuffled keys; >1 emulates multi-GPU shuffle-BN
        cfg.LOSS.CONTRASTIVE = CN()
        cfg.LOSS.CONTRASTIVE.WEIGHT = 1.0  # lambda, weight of the student's own InfoNCE loss L_co (DisCo eq. 2)

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("MODEL.MOCO.QUEUE_SIZE", ">= 1", 0), ("MODEL.MOCO.MOMENTUM", "[0, 1]", 0),
                           ("MODEL.MOCO.TEMPERATURE", "> 0", 0), ("MODEL.MOCO.BN_SPLITS", ">= 1", 0),
                           ("LOSS.CONTRASTIVE.WEIGHT", ">= 0", 0)))
        if cfg.MODEL.MOCO.SHUFFLE_BN and cfg.SOLVER.IMS_PER_BATCH % cfg.MODEL.MOCO.BN_SPLITS:
            raise ValueError(f"MODEL.MOCO.BN_SPLITS {cfg.MODEL.MOCO.BN_SPLITS} must divide SOLVER.IMS_PER_BATCH "
                             f"{cfg.SOLVER.IMS_PER_BATCH} (and each process's share of it)")
        if cfg.MODEL.MOCO.QUEUE_SIZE % cfg.SOLVER.IMS_PER_BATCH:
            raise ValueError(f"MODEL.MOCO.QUEUE_SIZE {cfg.MODEL.MOCO.QUEUE_SIZE} must be a multiple of "
                             f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} (the queue advances one global batch "
                             f"per step)")
        if cfg.LOSS.CONTRASTIVE.WEIGHT == 0 and not cfg.METHOD.DISTILLERS:
            raise ValueError("METHOD.TESTBED mocov2 with LOSS.CONTRASTIVE.WEIGHT 0 and no distiller trains nothing")

    @classmethod
    def from_config(cls, cfg, student) -> "MoCoV2":
        m = cfg.MODEL.MOCO
        return cls(student, m.QUEUE_SIZE, m.MOMENTUM, m.TEMPERATURE, m.SHUFFLE_BN, m.BN_SPLITS,
                   cfg.LOSS.CONTRASTIVE.WEIGHT)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, student, views, teacher):
        self.momentum_update(student)
        return {"k": self.keys(views[1]).float(), "queue": self.queue}

    def losses(self, view, out, targets):
        if self.weight <= 0:
            return {}
        return {"loss_mocov2": self.weight * infonce_loss(out["embedding"], targets["k"], targets["queue"],
                                                          self.temperature)}

    @torch.no_grad()
    def after_step(self, student, targets) -> None:
        self.enqueue(concat_all_gather(targets["k"]))

    def chance_losses(self):
        """InfoNCE over the positive key and the K queued negatives is ln(K + 1) when all K + 1 logits are equal (a
        key encoder whose keys all point one way): ``loss_mocov2`` = weight * ln(K + 1) per student view."""
        if self.weight <= 0:
            return {}
        return {"loss_mocov2": self.weight * len(self.student_views) * math.log(self.queue.shape[1] + 1)}

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self, student) -> None:
        for p_q, p_k in zip(student.parameters(), self.encoder_k.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries of the queue with ``keys`` (NxC, all processes' keys)."""
        batch = keys.shape[0]
        size = self.queue.shape[1]
        if size % batch:
            raise ValueError(f"MODEL.MOCO.QUEUE_SIZE {size} is not a multiple of the total batch {batch}")
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch) % size

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Key embeddings (NxC) of the momentum encoder, with shuffle-BN: the key batch is shuffled (across
        processes when there are several, else locally) and forwarded in ``bn_splits`` groups per process, so the
        BatchNorm statistics of a key never come from the same group of images as its query's. Without it the
        model can "cheat" through BN statistics (MoCo, sec. 3.3); on one process use ``bn_splits`` > 1."""
        if not self.shuffle_bn:
            return self.encoder_k(images)
        if get_world_size() > 1:
            images, unshuffle = _shuffle_across_processes(images)
            return _unshuffle_across_processes(self._split_forward(images), unshuffle)
        perm = torch.randperm(images.shape[0], device=images.device)
        return self._split_forward(images[perm])[torch.argsort(perm)]

    def _split_forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.bn_splits <= 1:
            return self.encoder_k(images)
        if images.shape[0] % self.bn_splits:
            raise ValueError(f"the per-process batch {images.shape[0]} is not divisible by MODEL.MOCO.BN_SPLITS "
                             f"{self.bn_splits}")
        return torch.cat([self.encoder_k(chunk) for chunk in images.chunk(self.bn_splits)])


@torch.no_grad()
def _shuffle_across_processes(x: torch.Tensor):
    local = x.shape[0]
    x_all = concat_all_gather(x)
    perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device), src=0)
    unshuffle = torch.argsort(perm)
    mine = perm.view(get_world_size(), -1)[get_rank()]
    assert mine.numel() == local
    return x_all[mine], unshuffle


@torch.no_grad()
def _unshuffle_across_processes(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    x_all = concat_all_gather(x)
    return x_all[unshuffle.view(get_world_size(), -1)[get_rank()]]
