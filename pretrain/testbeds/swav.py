"""SwAV (Caron et al. 2020): online clustering of the multi-crop views onto learned prototypes, Sinkhorn-Knopp codes
of the assignment crops, swapped prediction. The testbed of the paper's Table 5 (SwAV + DisCo)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cfgnode import CN, check_ranges
from ..data import view_sizes
from ..distributed import concat_all_gather, get_rank, get_world_size
from ..losses import sinkhorn, swapped_prediction
from ..methods import TESTBEDS, Testbed


@TESTBEDS.register()
class SwAV(Testbed):
    """The student (backbone -> SwAV head -> L2 normalisation: MODEL.STUDENT.HEAD 2048, BN, 128) is SwAV's network
    without its prototypes; this part holds the prototypes (K x C, no bias) and the feature queue.

    targets: L2-normalise the prototypes (every step, before the forward, as SwAV). observe (the one forward of all
    crops): the scores of each assignment crop, preceded by the queue's when it is full, give its codes by
    Sinkhorn-Knopp; then the crop's embeddings enter the queue. losses: each view's share of the
    swapped prediction (:func:`pretrain.losses.swapped_prediction`). adjust_gradients: no prototype gradient for the
    first MODEL.SWAV.FREEZE_PROTOTYPES_ITERS iterations.

    The queue (MODEL.SWAV.QUEUE_LENGTH, used from epoch MODEL.SWAV.QUEUE_START_EPOCH once full) is SwAV's
    per-process queue: process r codes its batch against its own QUEUE_LENGTH / world most recent embeddings. Here
    all processes hold all slices (the embeddings are gathered), so the checkpoint keeps every process's queue and
    a resumed run continues it exactly; the official script saves each process's queue only at the end of an epoch.
    """

    name = "swav"

    def __init__(self, student, num_views: int, crops_for_assign=(0, 1), num_prototypes: int = 3000,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 queue_length: int = 0, queue_start_epoch: int = 15, freeze_prototypes_iters: int = 5005,
                 weight: float = 1.0, world_size: int = 1):
        super().__init__()
        self.num_views, self.assign = num_views, tuple(crops_for_assign)
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.queue_start_epoch, self.freeze_iters, self.weight = queue_start_epoch, freeze_prototypes_iters, weight
        self.student_views = tuple(range(num_views))
        self.prototypes = nn.Linear(student.out_dim, num_prototypes, bias=False)
        # (assignment crops, processes, per-process length, C); length 0: no queue
        self.world = world_size
        self.register_buffer("queue", torch.zeros(len(self.assign), world_size, queue_length // world_size,
                                                  student.out_dim))

    @staticmethod
    def add_config(cfg) -> None:
        cfg.MODEL.SWAV = CN()
        cfg.MODEL.SWAV.NUM_PROTOTYPES = 3000  # K, prototypes (cluster centres) on the unit sphere
        cfg.MODEL.SWAV.TEMPERATURE = 0.1  # softmax temperature of the swapped prediction
        cfg.MODEL.SWAV.EPSILON = 0.05  # entropy regularisation of Sinkhorn-Knopp (codes exp(scores / epsilon))
        cfg.MODEL.SWAV.SINKHORN_ITERATIONS = 3  # Sinkhorn-Knopp normalisation rounds
        cfg.MODEL.SWAV.CROPS_FOR_ASSIGN = (0, 1)  # views whose codes are predicted (the two global crops)
        # feature queue over all processes (SwAV ImageNet 3840 at batch 8 x 64 = 512); 0 = none. Rounded down to a
        # multiple of SOLVER.IMS_PER_BATCH as SwAV does
        cfg.MODEL.SWAV.QUEUE_LENGTH = 0
        cfg.MODEL.SWAV.QUEUE_START_EPOCH = 15  # the queue is filled (and, once full, used) from this epoch on
        cfg.MODEL.SWAV.FREEZE_PROTOTYPES_ITERS = 5005  # iterations at the start without prototype updates
        cfg.LOSS.SWAV = CN()
        cfg.LOSS.SWAV.WEIGHT = 1.0  # weight of the SwAV loss

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("MODEL.SWAV.NUM_PROTOTYPES", ">= 1", 0), ("MODEL.SWAV.TEMPERATURE", "> 0", 0),
                           ("MODEL.SWAV.EPSILON", "> 0", 0), ("MODEL.SWAV.SINKHORN_ITERATIONS", ">= 1", 0),
                           ("MODEL.SWAV.QUEUE_LENGTH", ">= 0", 0), ("MODEL.SWAV.QUEUE_START_EPOCH", ">= 0", 0),
                           ("MODEL.SWAV.FREEZE_PROTOTYPES_ITERS", ">= 0", 0), ("LOSS.SWAV.WEIGHT", "> 0", 0)))
        if cfg.DATA.AUGMENTATION == "mocov2":
            raise ValueError("METHOD.TESTBED swav trains on multi-crop views: set DATA.AUGMENTATION swav (and "
                             "DATA.MULTI_CROP)")
        first = cfg.DATA.MULTI_CROP.NUM[0]
        assign = list(cfg.MODEL.SWAV.CROPS_FOR_ASSIGN)
        if not assign or len(set(assign)) != len(assign) or not all(0 <= c < first for c in assign):
            raise ValueError(f"MODEL.SWAV.CROPS_FOR_ASSIGN {tuple(assign)} must name distinct views of the first "
                             f"crop group (0 .. {first - 1}: DATA.MULTI_CROP.NUM[0] is {first})")
        queue = cfg.MODEL.SWAV.QUEUE_LENGTH - cfg.MODEL.SWAV.QUEUE_LENGTH % cfg.SOLVER.IMS_PER_BATCH
        if cfg.MODEL.SWAV.QUEUE_LENGTH and not queue:
            raise ValueError(f"MODEL.SWAV.QUEUE_LENGTH {cfg.MODEL.SWAV.QUEUE_LENGTH} is shorter than one batch "
                             f"(SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}): use 0 or a multiple of the batch")

    @classmethod
    def from_config(cls, cfg, student) -> "SwAV":
        s = cfg.MODEL.SWAV
        return cls(student, len(view_sizes(cfg)), s.CROPS_FOR_ASSIGN, s.NUM_PROTOTYPES, s.TEMPERATURE, s.EPSILON,
                   s.SINKHORN_ITERATIONS, s.QUEUE_LENGTH - s.QUEUE_LENGTH % cfg.SOLVER.IMS_PER_BATCH,
                   s.QUEUE_START_EPOCH, s.FREEZE_PROTOTYPES_ITERS, cfg.LOSS.SWAV.WEIGHT, get_world_size())

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, student, views, teacher):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        return {"codes": {}}

    @torch.no_grad()
    def observe(self, views, outs, targets):
        queue_on = self.queue.shape[2] > 0 and self.progress.epoch >= self.queue_start_epoch
        for v, out in zip(views, outs):
            if v not in self.assign:
                continue
            i = self.assign.index(v)
            embedding = out["embedding"].detach().float()
            scores = embedding @ self.prototypes.weight.t()
            batch = scores.shape[0]
            if queue_on:
                mine = self.queue[i, get_rank() if self.world > 1 else 0]
                if not torch.all(mine[-1] == 0):  # full: SwAV uses the queue once its last slot is filled
                    scores = torch.cat([mine @ self.prototypes.weight.t(), scores])
                self._enqueue(i, embedding)
            targets["codes"][v] = sinkhorn(scores, self.epsilon, self.iterations)[-batch:]

    def losses(self, view, out, targets):
        scores = self.prototypes(out["embedding"].float())
        return {"loss_swav": self.weight * swapped_prediction(scores, targets["codes"], view, self.num_views,
                                                              len(self.assign), self.temperature)}

    def adjust_gradients(self) -> None:
        if self.progress.iteration < self.freeze_iters:
            self.prototypes.weight.grad = None

    def chance_losses(self):
        """Codes and predictions both uniform over the K prototypes: each cross-entropy is ln K, and the views'
        shares sum to SwAV's loss, weight * ln K."""
        return {"loss_swav": self.weight * math.log(self.prototypes.out_features)}

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _enqueue(self, i: int, embedding: torch.Tensor) -> None:
        """Every process's newest embeddings of assignment crop ``i`` at the front of its own slice (SwAV's
        shift: ``queue[bs:] = queue[:-bs]; queue[:bs] = new``)."""
        new = concat_all_gather(embedding).view(self.world, -1, embedding.shape[1]).to(self.queue.dtype)
        batch = new.shape[1]
        if batch > self.queue.shape[2]:
            return
        self.queue[i] = torch.cat([new, self.queue[i, :, :-batch]], dim=1)
