"""DINO (Caron et al. 2021, "Emerging properties in self-supervised vision transformers"): self-distillation with no
labels. An EMA teacher's centred, sharpened softmax over K output dimensions on the two global crops is the target
of the student's softmax on every crop. The testbed of the paper's Table 6 (ViT-tiny and XCiT-tiny students)."""
import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..cfgnode import CN, check_ranges
from ..data import view_sizes
from ..distributed import concat_all_gather, get_world_size
from ..losses import dino_center, dino_loss, dino_pairs, dino_teacher_probs
from ..methods import TESTBEDS, Testbed

logger = logging.getLogger(__name__)

# DINO's projection head (DINOHead): 3 linear layers, GELU, hidden 2048, bottleneck 256, no BatchNorm; the student's
# head (MODEL.STUDENT.HEAD) is that MLP, its L2-normalised output DINO's normalised bottleneck
DINO_HEAD = {"NUM_LAYERS": 3, "HIDDEN_DIM": 2048, "OUT_DIM": 256, "BN": False, "ACT": "gelu"}
TEACHER_CROPS = 2  # the teacher sees the two global crops, views 0 and 1 (DINO's ``teacher(images[:2])``)


class WeightNormLinear(nn.Module):
    """DINO's last layer: ``nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))`` with ``weight_g`` filled
    with 1, written out so the state-dict keys are DINO's (``last_layer.weight_g`` out x 1, ``last_layer.weight_v``
    out x in) and no deprecated parametrisation is involved. weight = g * v / ||v|| row by row (each output
    dimension's weight vector has norm g). ``weight_v`` starts as ``nn.Linear``'s default initialisation (the same
    draws); ``norm``: weight_g is not trained (DINO's ``norm_last_layer``): every row stays unit-norm, so the
    logits are cosines between the normalised bottleneck and K directions."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = True):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm)  # out x 1
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))  # out x in
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters' weight init

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # NxK

    def extra_repr(self) -> str:
        return f"in_dim={self.weight_v.shape[1]}, out_dim={self.weight_v.shape[0]}, " \
               f"norm={not self.weight_g.requires_grad}"


def teacher_temperature(epoch: int, warmup_temperature: float, temperature: float, warmup_epochs: int) -> float:
    """tau_t of ``epoch``: DINO's ``np.linspace(warmup, final, warmup_epochs)`` indexed by the epoch during the
    warm-up (so the last warm-up epoch already has the final value), then constant. A warm-up longer than the run
    is simply cut short (DINO's schedule array would fail to build)."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temperature, temperature, warmup_epochs)[epoch])
    return float(temperature)


def teacher_momentum(iteration: int, max_iter: int, base: float) -> float:
    """The EMA momentum of ``iteration`` (0-based): DINO's ``cosine_scheduler(base, 1, epochs, iters_per_epoch)``,
    1 + (base - 1) * (1 + cos(pi * it / max_iter)) / 2, from ``base`` at iteration 0 towards 1."""
    return 1.0 + 0.5 * (base - 1.0) * (1.0 + math.cos(math.pi * iteration / max_iter))


@TESTBEDS.register()
class DINO(Testbed):
    """The student (backbone -> MODEL.STUDENT.HEAD -> L2 normalisation) is DINO's student up to its normalised
    bottleneck; this part holds the rest of DINO: the student's last layer, the EMA teacher and the centre.

    The student's head must be DINO's MLP for DINO's recipe (:data:`DINO_HEAD`: 3 linear layers, GELU, hidden 2048,
    bottleneck 256, no BN; configs/pretrain/dino/Base-DINO.yaml sets it). Another head (ReLU, other widths) trains,
    it is only not DINO's; it is logged. :meth:`from_config` re-initialises the student head's linear layers as
    DINO's ``DINOHead._init_weights`` does (truncated normal, std 0.02, bias 0), drawing from the torch RNG, so one
    SEED gives one set of weights.

    Parts: ``last_layer`` (the student's :class:`WeightNormLinear` bottleneck -> MODEL.DINO.OUT_DIM, trained with
    the student); ``teacher`` (an :class:`pretrain.encoder.Encoder`: a deep copy of the student with every DropPath
    probability set to 0, DINO's teacher being built without stochastic depth; its BatchNorms, if any, become
    SyncBatchNorm like the student's under MODEL.STUDENT.SYNC_BN with several processes) and ``teacher_last_layer``
    (a copy of ``last_layer``), both never trained, starting as the student's initial weights; ``center`` (1 x
    OUT_DIM, zeros).

    Step: targets (no gradient): the teacher on the two global crops (views 0 and 1, one batch), in the mode the
    student is in (train: DINO never puts its teacher in eval mode; a ViT has nothing that differs, XCiT's and a
    ConvNet's BatchNorms use the batch statistics of the global crops), its logits ``teacher_last_layer(embedding)``
    (float32) and their softmax((t - center) / tau_t) (:func:`teacher_temperature` of the epoch). losses(v): the
    student logits ``last_layer(embedding_v)`` (float32) against each teacher crop but v's own
    (:func:`pretrain.losses.dino_loss`), each view's share of the loss averaged over all 2V - 2 pairs, so the views'
    terms sum to DINO's loss; ``loss_dino`` = LOSS.DINO.WEIGHT x that. adjust_gradients: no last-layer gradient
    during the first MODEL.DINO.FREEZE_LAST_LAYER epochs. after_step: the centre update with this step's teacher
    logits (averaged over every process's global crops), then the EMA of every teacher parameter (backbone, head,
    last layer) towards the student's, momentum :func:`teacher_momentum` of the iteration.

    Exported and monitored (kNN): the EMA teacher's encoder, the network DINO evaluates.
    """

    name = "dino"

    def __init__(self, student, num_views: int, out_dim: int = 65536, norm_last_layer: bool = True,
                 momentum: float = 0.996, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 freeze_last_layer: int = 1, weight: float = 1.0, sync_bn: bool = False):
        super().__init__()
        if num_views < TEACHER_CROPS:
            raise ValueError(f"DINO needs at least {TEACHER_CROPS} views (the teacher's global crops), got {num_views}")
        self.momentum, self.teacher_temp, self.warmup_teacher_temp = momentum, teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_epochs, self.student_temp = warmup_teacher_temp_epochs, student_temp
        self.center_momentum, self.freeze_last_layer, self.weight = center_momentum, freeze_last_layer, weight
        self.student_views = tuple(range(num_views))
        self.pairs = dino_pairs(TEACHER_CROPS, num_views)
        self.last_layer = WeightNormLinear(student.out_dim, out_dim, norm_last_layer)
        if weight <= 0:  # no loss reads it (a distiller alone trains the student): not optimised, no DDP gradient
            self.last_layer.requires_grad_(False)
        # the EMA teacher: the student's weights, no stochastic depth (DINO builds its teacher without drop_path_rate;
        # a DropPath of probability 0 is the identity, and has no state, so the keys are the student's)
        teacher = copy.deepcopy(student)
        for module in teacher.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0
        if sync_bn:
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        self.teacher = teacher.requires_grad_(False)
        self.teacher_last_layer = copy.deepcopy(self.last_layer).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))  # 1xK

    @staticmethod
    def add_config(cfg) -> None:
        cfg.MODEL.DINO = CN()
        cfg.MODEL.DINO.OUT_DIM = 65536  # K, output dims of the weight-normalised last layer (the softmax's size)
        # True: the last layer's weight_g is frozen at 1 (unit-norm rows; DINO's default, stable); False trains it
        # (DINO's README: better, "only safe with vit_small")
        cfg.MODEL.DINO.NORM_LAST_LAYER = True
        cfg.MODEL.DINO.MOMENTUM = 0.996  # teacher EMA momentum at iteration 0, cosine to 1 at the end (DINO: 0.996)
        cfg.MODEL.DINO.TEACHER_TEMP = 0.07  # tau_t after the warm-up (DINO's ViT recipe: 0.07)
        cfg.MODEL.DINO.WARMUP_TEACHER_TEMP = 0.04  # tau_t at epoch 0, linear to TEACHER_TEMP (DINO: 0.04)
        cfg.MODEL.DINO.WARMUP_TEACHER_TEMP_EPOCHS = 30  # epochs of that warm-up (DINO: 30); 0 = TEACHER_TEMP from start
        cfg.MODEL.DINO.STUDENT_TEMP = 0.1  # tau_s, the student's softmax temperature (DINO: 0.1)
        cfg.MODEL.DINO.CENTER_MOMENTUM = 0.9  # m of the centre's EMA over the teacher's outputs (DINO: 0.9)
        cfg.MODEL.DINO.FREEZE_LAST_LAYER = 1  # epochs at the start without last-layer updates (DINO: 1)
        cfg.LOSS.DINO = CN()
        cfg.LOSS.DINO.WEIGHT = 1.0  # weight of DINO's loss (the student's own term, like DisCo's lambda for L_co)

    @staticmethod
    def check_config(cfg) -> None:
        check_ranges(cfg, (("MODEL.DINO.OUT_DIM", ">= 1", 0), ("MODEL.DINO.MOMENTUM", "[0, 1]", 0),
                           ("MODEL.DINO.TEACHER_TEMP", "> 0", 0), ("MODEL.DINO.WARMUP_TEACHER_TEMP", "> 0", 0),
                           ("MODEL.DINO.WARMUP_TEACHER_TEMP_EPOCHS", ">= 0", 0), ("MODEL.DINO.STUDENT_TEMP", "> 0", 0),
                           ("MODEL.DINO.CENTER_MOMENTUM", "[0, 1]", 0), ("MODEL.DINO.FREEZE_LAST_LAYER", ">= 0", 0),
                           ("LOSS.DINO.WEIGHT", ">= 0", 0)))
        if cfg.DATA.AUGMENTATION != "mocov2" and cfg.DATA.MULTI_CROP.NUM[0] != TEACHER_CROPS:
            raise ValueError(f"METHOD.TESTBED dino: the teacher sees the first {TEACHER_CROPS} views, DINO's two "
                             f"global crops; set DATA.MULTI_CROP.NUM[0] to {TEACHER_CROPS} (got "
                             f"{tuple(cfg.DATA.MULTI_CROP.NUM)}; DINO: (2, 10))")
        if cfg.LOSS.DINO.WEIGHT == 0 and not cfg.METHOD.DISTILLERS:
            raise ValueError("METHOD.TESTBED dino with LOSS.DINO.WEIGHT 0 and no distiller trains nothing")

    @classmethod
    def from_config(cls, cfg, student) -> "DINO":
        head = {k: cfg.MODEL.STUDENT.HEAD[k] for k in DINO_HEAD}
        if head != DINO_HEAD:
            logger.info("METHOD.TESTBED dino with MODEL.STUDENT.HEAD %s; DINO's head is %s", head, DINO_HEAD)
        init_dino_head(student.head)
        m = cfg.MODEL.DINO
        return cls(student, len(view_sizes(cfg)), m.OUT_DIM, m.NORM_LAST_LAYER, m.MOMENTUM, m.TEACHER_TEMP,
                   m.WARMUP_TEACHER_TEMP, m.WARMUP_TEACHER_TEMP_EPOCHS, m.STUDENT_TEMP, m.CENTER_MOMENTUM,
                   m.FREEZE_LAST_LAYER, cfg.LOSS.DINO.WEIGHT,
                   sync_bn=cfg.MODEL.STUDENT.SYNC_BN and get_world_size() > 1)  # as the trainer converts the student

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def targets(self, student, views, teacher):
        """``logits`` (2N x K float32, crop 0's rows then crop 1's) and ``probs`` (per teacher crop, N x K)."""
        images = torch.cat([views[v] for v in range(TEACHER_CROPS)])
        self.teacher.train(student.training)  # the student's mode (the Method's train() sets it already)
        embedding = self.teacher(images)  # 2N x C, L2-normalised (under the step's autocast)
        with torch.autocast(images.device.type, enabled=False):
            logits = self.teacher_last_layer(embedding.float())  # 2N x K
        temperature = teacher_temperature(self.progress.epoch, self.warmup_teacher_temp, self.teacher_temp,
                                          self.warmup_teacher_temp_epochs)
        probs = dino_teacher_probs(logits, self.center, temperature).chunk(TEACHER_CROPS)
        return {"logits": logits, "probs": list(probs), "temperature": temperature}

    def losses(self, view, out, targets):
        if self.weight <= 0:
            return {}
        return {"loss_dino": self.weight * dino_loss({view: self.student_logits(out["embedding"])}, targets["probs"],
                                                     self.pairs, self.student_temp)}

    def student_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """The student's last layer on its normalised bottleneck (NxC -> NxK), in float32 (outside autocast)."""
        with torch.autocast(embedding.device.type, enabled=False):
            return self.last_layer(embedding.float())

    def adjust_gradients(self) -> None:
        if self.progress.epoch < self.freeze_last_layer:  # DINO's cancel_gradients_last_layer: AdamW skips it
            for p in self.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, student, targets) -> None:
        self.update_center(targets["logits"])
        m = teacher_momentum(self.progress.iteration, self.progress.max_iter, self.momentum)
        for p_s, p_t in zip(list(student.parameters()) + list(self.last_layer.parameters()),
                            list(self.teacher.parameters()) + list(self.teacher_last_layer.parameters())):
            p_t.mul_(m).add_(p_s.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """The centre's EMA with the mean of ``teacher_logits`` (2N x K, this process's) over all processes' rows
        (DINO: all-reduced sum / (rows x processes); every process has the same batch)."""
        local = teacher_logits.float().sum(dim=0, keepdim=True)  # 1xK
        batch_center = concat_all_gather(local).sum(dim=0, keepdim=True) / (teacher_logits.shape[0] *
                                                                            get_world_size())
        self.center.copy_(dino_center(self.center, batch_center, self.center_momentum))

    def exported(self, student):
        return self.teacher

    def chance_losses(self):
        """A student whose outputs carry no information (a uniform softmax) has cross-entropy ln(K) against any
        teacher distribution, in every pair: ``loss_dino`` (its views' shares summed) = weight * ln(OUT_DIM). It is
        also where DINO's uniform collapse ends (the teacher's output uniform, the student matching it: DINO paper
        sec. 5.3). A freshly initialised run starts a little below it (ln(65536) = 11.09; about 2 % below for a
        random ViT-tiny) and must leave it within its first epochs."""
        if self.weight <= 0:
            return {}
        return {"loss_dino": self.weight * math.log(self.last_layer.weight_v.shape[0])}


@torch.no_grad()
def init_dino_head(head: nn.Module) -> None:
    """DINO's ``DINOHead._init_weights`` on a projection MLP: every Linear's weight from a normal of std 0.02
    truncated at +-2 (absolute, i.e. +-100 std: ``torch.nn.init.trunc_normal_``'s defaults, as DINO's), bias 0;
    draws from the torch RNG in module order."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
