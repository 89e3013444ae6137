"""Relational knowledge distillation (Park et al., CVPR 2019), as the official DisCo code's
``main_moco_distill_rkd.py`` uses it: distance-wise and angle-wise relations of the query view's final embeddings."""
from ..cfgnode import CN, check_ranges
from ..losses import rkd_angle_loss, rkd_distance_loss
from ..methods import DISTILLERS, Distiller


@DISTILLERS.register()
class RKD(Distiller):
    """On the query view v, among the images of the per-process batch: the pairwise distances of the student's
    L2-normalised embeddings E_s, each divided by their mean, against the teacher's E_t (smooth-L1), and the cosines
    of every triplet's angle (smooth-L1): ``DISTANCE_WEIGHT * L_dist + ANGLE_WEIGHT * L_angle``
    (:mod:`pretrain.losses.rkd`). The official script adds both with weight 1 and computes them per GPU (32 images
    in the paper's 8x32 setting); the RKD paper weights them 25 and 50."""

    name = "rkd"
    student_views = (0,)
    teacher_views = (0,)
    teacher_embedding = True

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 1.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.RKD = CN()
        cfg.LOSS.RKD.DISTANCE_WEIGHT = 1.0  # weight of the distance-wise term (official DisCo code: 1; RKD paper: 25)
        cfg.LOSS.RKD.ANGLE_WEIGHT = 1.0  # weight of the angle-wise term (official DisCo code: 1; RKD paper: 50)

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("LOSS.RKD.DISTANCE_WEIGHT", ">= 0", 0), ("LOSS.RKD.ANGLE_WEIGHT", ">= 0", 0)))
        if cfg.LOSS.RKD.DISTANCE_WEIGHT == 0 and cfg.LOSS.RKD.ANGLE_WEIGHT == 0:
            raise ValueError("LOSS.RKD.DISTANCE_WEIGHT and LOSS.RKD.ANGLE_WEIGHT are both 0: the rkd distiller would "
                             "add nothing; remove it from METHOD.DISTILLERS or set a weight")

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "RKD":
        return cls(cfg.LOSS.RKD.DISTANCE_WEIGHT, cfg.LOSS.RKD.ANGLE_WEIGHT)  # relations: the dims need not match

    def targets(self, student, views, teacher):
        return {"t": teacher[0]["embedding"]}

    def losses(self, view, out, targets):
        terms = {}
        if self.distance_weight > 0:
            terms["loss_rkd_distance"] = self.distance_weight * rkd_distance_loss(out["embedding"], targets["t"])
        if self.angle_weight > 0:
            terms["loss_rkd_angle"] = self.angle_weight * rkd_angle_loss(out["embedding"], targets["t"])
        return terms
