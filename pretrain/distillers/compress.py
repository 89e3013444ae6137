"""CompRess (Koohpayegani et al., NeurIPS 2020): the student matches the teacher's similarity distribution over a
memory bank of past samples (KL divergence)."""
import copy

import torch
import torch.nn.functional as F

from ..cfgnode import CN, check_ranges
from ..distributed import concat_all_gather
from ..losses import compress_loss
from ..losses.compress import compress_queue_init
from ..methods import DISTILLERS, Distiller
from .queue import enqueue_columns

FEATURES = ("backbone", "embedding")


@DISTILLERS.register()
class CompRess(Distiller):
    """One view (the query view v). Teacher side: the teacher's L2-normalised features of the view against the
    teacher's queue of past teacher features; student side: the student's normalised features against

    * ``QUEUES 2`` (CompRess-2q, its ``train_student.py``): the student's own queue, filled with the keys of a
      momentum copy of the student (momentum ``MOMENTUM``, BatchNorm in train mode, the same images);
    * ``QUEUES 1`` (CompRess-1q, ``train_student_one_queue.py``): the teacher's queue (the student's features must
      then have the teacher's dimension: its code puts one linear layer from the student's features to the teacher's,
      here ``MODEL.STUDENT.HEAD.NUM_LAYERS 1``, ``OUT_DIM`` = the teacher's feature dim, ``STUDENT_FEATURES
      embedding``).

    Loss: KL(teacher || student) of the two softmax distributions at one temperature (:func:`compress_loss`). The
    queues are updated after the step with the whole (global) batch, wrapping around (K need not be a multiple of the
    batch), and start as CompRess's memory banks (uniform, not normalised). ``backbone`` features are the pooled
    backbone output (what CompRess distils: its teacher has its fc removed); ``embedding`` the projection head's."""

    name = "compress"
    student_views = (0,)
    teacher_views = (0,)

    def __init__(self, student, student_dim: int, teacher_dim: int, queues: int = 2, queue_size: int = 128000,
                 temperature: float = 0.04, momentum: float = 0.999, student_features: str = "backbone",
                 teacher_features: str = "backbone", weight: float = 1.0):
        super().__init__()
        self.queues, self.temperature, self.momentum, self.weight = queues, temperature, momentum, weight
        self.student_features, self.teacher_features = student_features, teacher_features
        self.student_head = student_features == "embedding"  # instance attribute: read by Method
        self.teacher_embedding = teacher_features == "embedding"  # read by the teacher health check
        self.register_buffer("teacher_queue", compress_queue_init(teacher_dim, queue_size))
        self.register_buffer("teacher_ptr", torch.zeros(1, dtype=torch.long))
        if queues == 2:
            self.register_buffer("student_queue", compress_queue_init(student_dim, queue_size))
            self.register_buffer("student_ptr", torch.zeros(1, dtype=torch.long))
            self.encoder_k = copy.deepcopy(student)
            self.encoder_k.requires_grad_(False)

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.COMPRESS = CN()
        cfg.LOSS.COMPRESS.WEIGHT = 1.0  # weight of the KL term
        cfg.LOSS.COMPRESS.QUEUES = 2  # 2: CompRess-2q (each network its own queue); 1: CompRess-1q (the teacher's)
        cfg.LOSS.COMPRESS.QUEUE_SIZE = 128000  # K, entries per queue (CompRess: 128000)
        cfg.LOSS.COMPRESS.TEMPERATURE = 0.04  # T of both similarity distributions (CompRess: 0.04)
        cfg.LOSS.COMPRESS.MOMENTUM = 0.999  # 2q: momentum of the student's key encoder that fills its queue
        cfg.LOSS.COMPRESS.STUDENT_FEATURES = "backbone"  # "backbone" (pooled, CompRess-2q) or "embedding" (head, 1q)
        cfg.LOSS.COMPRESS.TEACHER_FEATURES = "backbone"  # "backbone" (pooled, as CompRess) or "embedding" (its head)

    @staticmethod
    def check_config(cfg) -> None:
        c = cfg.LOSS.COMPRESS
        check_ranges(cfg, (("LOSS.COMPRESS.WEIGHT", "> 0", 0), ("LOSS.COMPRESS.QUEUE_SIZE", ">= 1", 0),
                           ("LOSS.COMPRESS.TEMPERATURE", "> 0", 0), ("LOSS.COMPRESS.MOMENTUM", "[0, 1]", 0)))
        if c.QUEUES not in (1, 2):
            raise ValueError(f"LOSS.COMPRESS.QUEUES must be 2 (CompRess-2q) or 1 (CompRess-1q), got {c.QUEUES!r}")
        for key in ("STUDENT_FEATURES", "TEACHER_FEATURES"):
            if c[key] not in FEATURES:
                raise ValueError(f"LOSS.COMPRESS.{key} must be one of {', '.join(FEATURES)}, got {c[key]!r}")
        if c.QUEUE_SIZE < cfg.SOLVER.IMS_PER_BATCH:
            raise ValueError(f"LOSS.COMPRESS.QUEUE_SIZE {c.QUEUE_SIZE} is smaller than one batch (SOLVER.IMS_PER_BATCH "
                             f"{cfg.SOLVER.IMS_PER_BATCH})")

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "CompRess":
        c = cfg.LOSS.COMPRESS
        student_dim = _dim(student, c.STUDENT_FEATURES)
        teacher_dim = _dim(teacher, c.TEACHER_FEATURES)
        if c.QUEUES == 1 and student_dim != teacher_dim:
            hint = ("MODEL.STUDENT.HEAD.NUM_LAYERS 1, MODEL.STUDENT.HEAD.OUT_DIM "
                    f"{teacher_dim} and LOSS.COMPRESS.STUDENT_FEATURES embedding (CompRess-1q's linear layer)")
            raise ValueError(f"CompRess-1q compares the student's {c.STUDENT_FEATURES} features ({student_dim}-d) "
                             f"with the teacher's queue of {teacher_dim}-d {c.TEACHER_FEATURES} features; set {hint}")
        return cls(student, student_dim, teacher_dim, c.QUEUES, c.QUEUE_SIZE, c.TEMPERATURE, c.MOMENTUM,
                   c.STUDENT_FEATURES, c.TEACHER_FEATURES, c.WEIGHT)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, student, views, teacher):
        out = {"t": F.normalize(_pick(teacher[0], self.teacher_features), dim=1), "teacher_queue": self.teacher_queue}
        if self.queues == 2:
            for p_q, p_k in zip(student.parameters(), self.encoder_k.parameters()):
                p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)
            key = self.encoder_k.embed(views[0])
            out.update(k=F.normalize(_pick(key, self.student_features), dim=1).float(),
                       student_queue=self.student_queue)
        return out

    def losses(self, view, out, targets):
        s = F.normalize(_pick(out, self.student_features), dim=1)
        queue = targets["student_queue"] if self.queues == 2 else targets["teacher_queue"]
        return {"loss_compress": self.weight * compress_loss(s, queue, targets["t"], targets["teacher_queue"],
                                                             self.temperature)}

    @torch.no_grad()
    def after_step(self, student, targets) -> None:
        enqueue_columns(self.teacher_queue, self.teacher_ptr, concat_all_gather(targets["t"]))
        if self.queues == 2:
            enqueue_columns(self.student_queue, self.student_ptr, concat_all_gather(targets["k"]))


def _pick(out: dict, features: str) -> torch.Tensor:
    return out["features"] if features == "backbone" else out["embedding"]


def _dim(encoder, features: str) -> int:
    """The dimension of an encoder's ``backbone`` (pooled, the head's input) or ``embedding`` features."""
    if features == "embedding":
        return encoder.out_dim
    return [m for m in encoder.head.modules() if isinstance(m, torch.nn.Linear)][0].in_features
