"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as the official DisCo code's ``loss.py`` computes it: the
student's spatial attention maps are pulled onto the frozen teacher's, stage by stage."""
from typing import List, Sequence, Tuple

from ..backbones import stage_info
from ..cfgnode import CN, check_ranges
from ..losses import attention_loss
from ..methods import DISTILLERS, Distiller


@DISTILLERS.register()
class AttentionTransfer(Distiller):
    """On the query view v: for each paired stage, the attention map ``normalize(mean_c(F^2))`` (one value per
    position, unit L2 norm per image) of the student and of the teacher, MSE averaged over images and positions,
    summed over the stages, times ``LOSS.ATTENTION.WEIGHT`` (:func:`pretrain.losses.attention_loss`).

    Stages pair up by stride (``reduction`` in :func:`pretrain.backbones.stage_info`): for each stride in
    ``LOSS.ATTENTION.STRIDES`` (default: every stride of at least 4 that both networks have), the deepest stage of
    that stride in each network. R-50 -> R-18 / R-34: layer1..layer4 of both (strides 4, 8, 16, 32; the stems, at
    stride 2, are left out as in AT's ResNet experiments); R-50 -> EfficientNet / MobileNetV3: layer1..4 against the
    last block of strides 4..32. Channel counts may differ (the map averages over channels). At equal strides the
    maps have equal sizes; if padding makes them differ by a pixel, the larger map's energy is average-pooled to the
    smaller size before normalising. The query view only, as the official code's relational terms."""

    name = "attention"
    student_views = (0,)
    teacher_views = (0,)
    student_maps = True
    teacher_maps = True
    student_head = False  # reads feature maps only

    def __init__(self, pairs: Sequence[Tuple[int, int]], weight: float = 1.0):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]  # (student stage index, teacher stage index)
        self.weight = weight

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.ATTENTION = CN()
        # weight of the summed per-stage MSE. 1.0: the official DisCo code's AttentionTransfer returns the plain mean
        # (unweighted, as its relational terms are added); the AT paper uses beta/2 = 500 on the same mean
        cfg.LOSS.ATTENTION.WEIGHT = 1.0
        cfg.LOSS.ATTENTION.STRIDES = []  # strides of the paired stages; [] = every stride >= 4 both networks have

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("LOSS.ATTENTION.WEIGHT", "> 0", 0),))
        stage_pairs(cfg.MODEL.STUDENT.ARCH, cfg.MODEL.TEACHER.ARCH, cfg.LOSS.ATTENTION.STRIDES)  # raises if unpaired

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "AttentionTransfer":
        pairs = stage_pairs(cfg.MODEL.STUDENT.ARCH, cfg.MODEL.TEACHER.ARCH, cfg.LOSS.ATTENTION.STRIDES)
        return cls([(s, t) for _, s, t in pairs], cfg.LOSS.ATTENTION.WEIGHT)

    def targets(self, student, views, teacher):
        return {"maps": [teacher[0]["maps"][t] for _, t in self.pairs]}

    def losses(self, view, out, targets):
        student_maps = [out["maps"][s] for s, _ in self.pairs]
        return {"loss_attention": self.weight * attention_loss(student_maps, targets["maps"])}


def stage_pairs(student_arch: str, teacher_arch: str, strides: Sequence[int] = ()) -> List[Tuple[int, int, int]]:
    """``(stride, student stage index, teacher stage index)`` for each stride, shallow to deep: the deepest stage of
    that stride in each network. ``strides`` empty: every stride >= 4 both have. Raises ``ValueError`` naming
    LOSS.ATTENTION.STRIDES and each network's strides when a stride is missing or none is shared."""
    def deepest(arch):
        out = {}
        for i, f in enumerate(stage_info(arch)):
            out[f["reduction"]] = i
        return out

    s, t = deepest(student_arch), deepest(teacher_arch)
    have = (f"the student {student_arch} has stages at strides {sorted(s)}, the teacher {teacher_arch} at "
            f"{sorted(t)}")
    if strides:
        missing = [x for x in strides if x not in s or x not in t]
        if missing:
            raise ValueError(f"LOSS.ATTENTION.STRIDES {list(strides)}: no stage of stride {missing} in both networks: "
                             f"{have}")
        chosen = sorted(set(int(x) for x in strides))
    else:
        chosen = sorted(x for x in set(s) & set(t) if x >= 4)
        if not chosen:
            raise ValueError(f"attention transfer: no stride >= 4 is shared by both networks ({have}); set "
                             f"LOSS.ATTENTION.STRIDES to strides both have")
    return [(x, s[x], t[x]) for x in chosen]
