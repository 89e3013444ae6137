"""DisCo (Gao et al., ECCV 2022): pull the student's final embedding of both views onto the frozen teacher's."""
from ..cfgnode import CN, check_ranges
from ..losses import disco_loss
from ..methods import DISTILLERS, Distiller


@DISTILLERS.register()
class DisCo(Distiller):
    """L_dis (paper eq. 1) = w_dis * sum over the two views of mean_i ||E_s[i] - E_t[i]||^2, on L2-normalised
    embeddings; each view's term is back-propagated with that view's forward. The student head's output dim must
    equal the teacher head's (checked when the method is built)."""

    name = "disco"
    student_views = (0, 1)
    teacher_views = (0, 1)
    teacher_embedding = True

    def __init__(self, weight: float = 32.0):
        super().__init__()
        self.weight = weight

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.DISCO = CN()
        # w_dis, weight of L_dis = w_dis * mean_over_batch(||E_s - E_t||^2 + ||E'_s - E'_t||^2) on L2-normalised
        # embeddings. The official code sums the MSE over its per-GPU batch (32 in the paper's 8x32 setting) and over
        # the 128 dims, i.e. 32 * mean_over_batch(...). WEIGHT 32 reproduces that whatever the per-GPU batch.
        cfg.LOSS.DISCO.WEIGHT = 32.0

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("LOSS.DISCO.WEIGHT", ">= 0", 0),))
        if cfg.LOSS.DISCO.WEIGHT == 0 and cfg.METHOD.TESTBED == "none" and list(cfg.METHOD.DISTILLERS) == ["disco"]:
            raise ValueError("METHOD.TESTBED none with only the disco distiller and LOSS.DISCO.WEIGHT 0 trains nothing")

    @classmethod
    def from_config(cls, cfg, student, teacher) -> "DisCo":
        theirs, ours = teacher.out_dim, student.out_dim
        if theirs != ours:
            raise ValueError(f"teacher embeddings are {theirs}-d but MODEL.STUDENT.HEAD.OUT_DIM is {ours}; set it to "
                             f"{theirs}")
        return cls(cfg.LOSS.DISCO.WEIGHT)

    def targets(self, student, views, teacher):
        return {"t": [teacher[v]["embedding"] for v in range(2)]}  # E_t, E'_t

    def losses(self, view, out, targets):
        return {"loss_disco": disco_loss([out["embedding"]], [targets["t"][view]], self.weight)}
