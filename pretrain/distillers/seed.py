"""SEED (Fang et al., ICLR 2021): the student matches the teacher's similarity distribution over a queue of teacher
embeddings."""
import torch
import torch.nn.functional as F

from ..cfgnode import CN, check_ranges
from ..distributed import concat_all_gather
from ..losses import seed_loss
from ..methods import DISTILLERS, Distiller
from .queue import enqueue_columns


@DISTILLERS.register()
class SEED(Distiller):
    """One view (the query view v). For each image, the student's logits ``[s.t, s.queue] / T_s`` against the
    teacher's soft targets ``softmax([t.t, t.queue] / T_t)``, soft cross-entropy (:func:`pretrain.losses.seed_loss`);
    after the step the queue (CxK) receives the teacher embeddings of the whole (global) batch. The queue starts as
    random unit vectors, as SEED's. SEED has no contrastive term of its own: it runs with ``METHOD.TESTBED none``."""

    name = "seed"
    student_views = (0,)
    teacher_views = (0,)
    teacher_embedding = True

    def __init__(self, dim: int, queue_size: int = 65536, student_temperature: float = 0.2,
                 teacher_temperature: float = 1e-4, weight: float = 1.0):
        super().__init__()
        self.student_temperature, self.teacher_temperature, self.weight = (student_temperature, teacher_temperature,
                                                                            weight)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # CxK teacher embeddings
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.SEED = CN()
        cfg.LOSS.SEED.WEIGHT = 1.0  # weight of SEED's soft cross-entropy
        cfg.LOSS.SEED.QUEUE_SIZE = 65536  # K, teacher embeddings in the queue (SEED: 65536); a multiple of the batch
        cfg.LOSS.SEED.STUDENT_TEMPERATURE = 0.2  # T_s of the student's logits (SEED's --temp 0.2)
        cfg.LOSS.SEED.TEACHER_TEMPERATURE = 1e-4  # T_t of the teacher's soft targets (SEED's --distill-t 1e-4)

    @staticmethod
    def check_config(cfg) -> None:
        s = cfg.LOSS.SEED
        check_ranges(cfg, (("LOSS.SEED.WEIGHT", "> 0", 0), ("LOSS.SEED.QUEUE_SIZE", ">= 1", 0),
                           ("LOSS.SEED.STUDENT_TEMPERATURE", "> 0", 0), ("LOSS.SEED.TEACHER_TEMPERATURE", "> 0", 0)))
        if s.QUEUE_SIZE % cfg.SOLVER.IMS_PER_BATCH:
            raise ValueError(f"LOSS.SEED.QUEUE_SIZE {s.QUEUE_SIZE} must be a multiple of SOLVER.IMS_PER_BATCH "
                             f"{cfg.SOLVER.IMS_PER_BATCH} (the queue advances one global batch per step)")

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "SEED":
        theirs, ours = teacher.out_dim, student.out_dim
        if theirs != ours:
            raise ValueError(f"teacher embeddings are {theirs}-d but MODEL.STUDENT.HEAD.OUT_DIM is {ours}; set it to "
                             f"{theirs} (SEED compares the student's embedding with the teacher's)")
        s = cfg.LOSS.SEED
        return cls(ours, s.QUEUE_SIZE, s.STUDENT_TEMPERATURE, s.TEACHER_TEMPERATURE, s.WEIGHT)

    def targets(self, student, views, teacher):
        return {"t": teacher[0]["embedding"], "queue": self.queue}

    def losses(self, view, out, targets):
        return {"loss_seed": self.weight * seed_loss(out["embedding"], targets["t"], targets["queue"],
                                                     self.student_temperature, self.teacher_temperature)}

    @torch.no_grad()
    def after_step(self, student, targets) -> None:
        enqueue_columns(self.queue, self.queue_ptr, concat_all_gather(targets["t"]))
