"""DisCo (Gao et al., ECCV 2022): pull the student's final embedding of every view onto the frozen teacher's."""
import torch.nn.functional as F
from torch import nn

from ..cfgnode import CN, check_ranges
from ..data import view_sizes
from ..losses import disco_loss
from ..methods import DISTILLERS, Distiller


@DISTILLERS.register()
class DisCo(Distiller):
    """L_dis (paper eq. 1) = w_dis * sum over the views of mean_i ||E_s[i] - E_t[i]||^2, on L2-normalised
    embeddings; each view's term is back-propagated with that view's forward. The views: both MoCo-v2 views, or
    every multi-crop view (the official SwAV + DisCo script distils all crops).

    LOSS.DISCO.EMBEDDING says which embedding is "final": ``head`` (the default, the paper's: the projection head's
    L2-normalised output of student and teacher, whose dims must agree) or ``backbone`` (the teacher's L2-normalised
    pooled backbone feature, for a ViT its CLS token, as the target of a linear map of the student's backbone feature
    (a distiller parameter, trained with the student), also normalised). The DINO testbed's configs name theirs."""

    name = "disco"
    teacher_embedding = True

    def __init__(self, weight: float = 32.0, num_views: int = 2, embedding: str = "head", student_dim: int = 0,
                 teacher_dim: int = 0):
        super().__init__()
        self.weight, self.embedding = weight, embedding
        self.student_views = self.teacher_views = tuple(range(num_views))
        self.student_head = embedding == "head"
        self.teacher_embedding = embedding == "head"
        # backbone: the student's pooled feature mapped to the teacher's feature dim (Linear, as a FitNets regressor)
        self.projector = nn.Linear(student_dim, teacher_dim) if embedding == "backbone" else None

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.DISCO = CN()
        # w_dis, weight of L_dis = w_dis * sum_views mean_over_batch(||E_s - E_t||^2) on L2-normalised embeddings. The
        # official code sums the MSE over its per-GPU batch (32 in the paper's 8x32 setting) and over the 128 dims,
        # i.e. 32 * mean_over_batch(...): WEIGHT 32 reproduces that whatever the per-GPU batch. Its SwAV script
        # takes the MEAN over batch, dims and its 8 crops, then halves it with the SwAV loss: WEIGHT 1 / (2 * 8 * 128)
        cfg.LOSS.DISCO.WEIGHT = 32.0
        # which embedding is distilled: head (projection head output, the paper's) | backbone (pooled backbone
        # feature / ViT CLS token of the teacher, the student's through a learned linear map)
        cfg.LOSS.DISCO.EMBEDDING = "head"
        cfg.set_choices("LOSS.DISCO.EMBEDDING", ("head", "backbone"))
        # the views distilled: 0 = every view (both MoCo-v2 views; every multi-crop view, as the official SwAV
        # script); n = the first n (e.g. 2: the global crops only, the two views of the paper's eq. 1)
        cfg.LOSS.DISCO.VIEWS = 0

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("LOSS.DISCO.WEIGHT", ">= 0", 0), ("LOSS.DISCO.VIEWS", ">= 0", 0)))
        if cfg.LOSS.DISCO.VIEWS > len(view_sizes(cfg)):
            raise ValueError(f"LOSS.DISCO.VIEWS {cfg.LOSS.DISCO.VIEWS}: there are {len(view_sizes(cfg))} views; use "
                             f"0 (all) or at most that many")
        if cfg.LOSS.DISCO.WEIGHT == 0 and cfg.METHOD.TESTBED == "none" and list(cfg.METHOD.DISTILLERS) == ["disco"]:
            raise ValueError("METHOD.TESTBED none with only the disco distiller and LOSS.DISCO.WEIGHT 0 trains nothing")

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "DisCo":
        embedding = cfg.LOSS.DISCO.EMBEDDING
        num_views = cfg.LOSS.DISCO.VIEWS or len(view_sizes(cfg))
        if embedding == "backbone":
            return cls(cfg.LOSS.DISCO.WEIGHT, num_views, embedding, student.backbone_dim, teacher.backbone_dim)
        theirs, ours = teacher.out_dim, student.out_dim
        if theirs != ours:
            raise ValueError(f"teacher embeddings are {theirs}-d but MODEL.STUDENT.HEAD.OUT_DIM is {ours}; set it to "
                             f"{theirs} (or distil the backbone features: LOSS.DISCO.EMBEDDING backbone)")
        return cls(cfg.LOSS.DISCO.WEIGHT, num_views)

    def targets(self, student, views, teacher):
        if self.embedding == "backbone":
            return {"t": [F.normalize(teacher[v]["features"], dim=1) for v in self.teacher_views]}
        return {"t": [teacher[v]["embedding"] for v in self.teacher_views]}  # E_t, E'_t (, every crop's)

    def losses(self, view, out, targets):
        if self.embedding == "backbone":
            mine = F.normalize(self.projector(out["features"].float()), dim=1)
        else:
            mine = out["embedding"]
        return {"loss_disco": disco_loss([mine], [targets["t"][view]], self.weight)}
