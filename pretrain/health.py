"""Is the teacher's embedding worth distilling, and is the student's InfoNCE learning anything?

Two failures that look like a normal run from the outside (a loss curve, a finished export), seen with a MoCo-v2
teacher pretrained on a small dataset: its backbone features were good but its projection embedding had nearly
collapsed (every image mapped to almost the same 128-d vector: mean pairwise cosine 0.997). DisCo then taught the
student that constant vector, the student's key encoder filled the MoCo queue with one direction, and the student's
InfoNCE sat at exactly ln(K + 1), the loss of a uniform guess among the K + 1 keys, for the whole run.

* :func:`embedding_health`: pure numbers of an N x C embedding matrix (mean pairwise cosine, effective rank,
  per-dimension spread) and a ``collapsed`` verdict (:data:`MAX_MEAN_COSINE`, :data:`MIN_EFFECTIVE_RANK`).
* :func:`check_teacher`: those numbers for the frozen teacher on a deterministic class-balanced subset of the
  training images (the evaluation transform), with a message naming the remedies when it is collapsed. The
  pretrainer runs it once at the start of a fresh distillation run (:class:`pretrain.hooks.TeacherHealthCheck`;
  ``TEST.TEACHER_HEALTH.IMAGES``); ``tools/teacher_health.py`` runs it on its own.
* :class:`ChanceLevel`: whether a loss term stayed at its chance level for a whole window of logged steps (the
  pretrainer's :class:`pretrain.hooks.ChanceLevelMonitor` feeds it the testbed's InfoNCE, ``loss_mocov2``).
"""
import logging
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger("pretrain")

# ---------------------------------------------------------------------------------------------------------------
# The verdict's thresholds.
#
# MAX_MEAN_COSINE: embeddings trained with InfoNCE spread over the unit sphere (its "uniformity" term, Wang & Isola
# 2020): independent random unit vectors in C dims have mean cosine 0 +- 1/sqrt(C); the demo's MoCo-v2 teacher
# (configs/pretrain/quickstart_teacher.yaml, 15 epochs on the synthetic data) measures 0.06 on 250 training images,
# while a randomly initialised network measures ~0.95 (random ReLU networks map all images close together).
# Since ||e_i - e_j||^2 = 2 - 2 cos(e_i, e_j), a mean cosine above 0.9 means the average squared distance between
# two images' targets is under 0.2, a tenth of that of spread-out embeddings: DisCo's MSE then mostly teaches one
# shared vector, and what tells images apart is a small residue (the collapsed teacher of the report had 0.997: a
# 1/300th residue).
MAX_MEAN_COSINE = 0.9
# MIN_EFFECTIVE_RANK: the effective rank (Roy & Vetterli 2007) of the centred embeddings counts the directions in
# which the images differ. Below 2 they differ along (at most) a single direction: dimensional collapse (Jing et al.
# 2022, "Understanding dimensional collapse in contrastive self-supervised learning"), whatever the mean cosine (a
# teacher mapping images to +-v has mean cosine ~0 but tells the student one bit per image). The demo's teacher
# measures 20 (of 128); isotropic Gaussian embeddings close to C. It cannot catch a near-constant embedding on its
# own (the small residue around the shared vector may spread over many directions): the mean cosine does.
MIN_EFFECTIVE_RANK = 2.0
# Relative tolerance of "the loss is at its chance level": a key encoder whose keys all point one way gives every
# logit the same value, so InfoNCE equals ln(K + 1) up to rounding; healthy students stay clearly below from the
# start (the demo-scale comparison of tools/compare_distillers.py, 18 runs with the mocov2 testbed: every logged
# loss_mocov2 at least 3.4 % below ln(1025)). Early in a run a randomly initialised student can sit near chance for
# a while, hence a window of at least an epoch.
CHANCE_REL_TOL = 0.01
CHANCE_MIN_LOGS = 5  # a pinned window is at least this many logged steps long (and at least one epoch)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions


@torch.no_grad()
def effective_rank(x: torch.Tensor, scale: Optional[float] = None) -> float:
    """exp(entropy of the singular values of ``x`` divided by their sum) (Roy & Vetterli 2007): between 1 and
    min(N, C), equal to k for k equal non-zero singular values. Singular values below float32 rounding noise of a
    matrix of norm ``scale`` (default: ``x``'s largest singular value; numpy's ``matrix_rank`` tolerance) count as
    zero; a matrix with none left (no spread at all) has effective rank 0. A centred matrix passes the norm of the
    uncentred one: what is left of identical rows after subtracting their mean is rounding, not spread."""
    x = x.double()
    s = torch.linalg.svdvals(x)
    if s.numel() == 0:
        return 0.0
    scale = float(s.max()) if scale is None else scale
    tol = max(x.shape) * torch.finfo(torch.float32).eps * scale
    s = s[s > tol]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embedding_health(emb: torch.Tensor) -> Dict[str, object]:
    """Health of an N x C embedding matrix (N >= 2 rows, e.g. a teacher's projection embeddings of N images):

    * ``mean_cosine``: the mean cosine similarity of the L2-normalised rows over all pairs i != j (1: one direction
      for all; 0: orthogonal or spread over the sphere);
    * ``effective_rank``: :func:`effective_rank` of the centred L2-normalised rows (in how many directions the
      images differ; 0 when they are all identical);
    * ``std``: the per-dimension standard deviation over the images of the L2-normalised rows, averaged over the C
      dimensions: the spread a student copying them is asked to reproduce; ``std_uniform`` = 1/sqrt(C), what unit
      vectors spread evenly over the sphere give, for scale;
    * ``collapsed``: mean cosine > :data:`MAX_MEAN_COSINE` or effective rank < :data:`MIN_EFFECTIVE_RANK`;
    * ``images``, ``dim``: N and C.
    """
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"embedding_health needs an N x C matrix with N >= 2 rows, got shape {tuple(emb.shape)}")
    z = F.normalize(emb.double(), dim=1)
    n, c = z.shape
    total = z.sum(0)
    # sum over i != j of <z_i, z_j> = ||sum_i z_i||^2 - sum_i ||z_i||^2 (rows of norm 1, or 0 for a zero row)
    off_diagonal = float(total @ total) - float((z * z).sum())
    mean_cosine = off_diagonal / (n * (n - 1))
    erank = effective_rank(z - z.mean(0, keepdim=True), scale=float(torch.linalg.matrix_norm(z)))
    std = float(z.std(0, unbiased=False).mean())
    return {"images": n, "dim": c, "mean_cosine": mean_cosine, "effective_rank": erank, "std": std,
            "std_uniform": 1.0 / math.sqrt(c),
            "collapsed": bool(mean_cosine > MAX_MEAN_COSINE or erank < MIN_EFFECTIVE_RANK)}


class ChanceLevel:
    """Whether a loss stays at its chance level: :meth:`update` with each logged value returns True (once) when the
    last logged values, spanning at least ``window_iters`` iterations and ``min_logs`` logged steps, were all within
    ``rel_tol`` x chance of ``chance`` (e.g. InfoNCE at ln(K + 1): the student tells its positive key from the K
    negatives no better than a uniform guess)."""

    def __init__(self, chance: float, window_iters: int, rel_tol: float = CHANCE_REL_TOL,
                 min_logs: int = CHANCE_MIN_LOGS):
        self.chance, self.window_iters, self.rel_tol, self.min_logs = chance, window_iters, rel_tol, min_logs
        self.first: Optional[int] = None  # iteration of the first logged value of the current pinned stretch
        self.logs = 0
        self.warned = False

    def pinned(self, value: float) -> bool:
        return abs(value - self.chance) < self.rel_tol * abs(self.chance)

    def update(self, iteration: int, value: float) -> bool:
        if not self.pinned(value):
            self.first, self.logs = None, 0
            return False
        if self.first is None:
            self.first = iteration
        self.logs += 1
        if self.warned or self.logs < self.min_logs or iteration - self.first < self.window_iters:
            return False
        self.warned = True
        return True


# ---------------------------------------------------------------------------------------------------------------
# The teacher check


def reads_teacher_embedding(distillers) -> List[str]:
    """Names of the distillers (``name -> Distiller``) whose targets are the teacher's projection embedding."""
    return [name for name, d in distillers.items() if getattr(d, "teacher_embedding", False)]


def weight_keys(cfg, distillers: List[str]) -> List[str]:
    """``KEY value`` of every ``LOSS.<DISTILLER>.*WEIGHT`` key of ``distillers`` (what "lower the weight" means)."""
    out = []
    for name in distillers:
        node = cfg.LOSS.get(name.upper())
        for key in sorted(node or {}):
            if key.endswith("WEIGHT"):
                out.append(f"LOSS.{name.upper()}.{key} {node[key]:g}")
    return out


def training_images(cfg, max_images: int):
    """A deterministic class-balanced subset (:func:`pretrain.data.balanced_sample`, seeded with SEED) of at most ``max_images``
    images of DATA.TRAIN_DIR with the evaluation transform (resize DATA.IMAGE_SIZE / 0.875, centre crop
    DATA.IMAGE_SIZE): a list of 3 x S x S tensors. Unreadable images are left out."""
    from .data import CorruptImageError, ImageFolder, balanced_sample, eval_transform

    d = cfg.DATA
    base = ImageFolder(d.TRAIN_DIR)
    tf = eval_transform(d.IMAGE_SIZE, mean=d.MEAN, std=d.STD)
    images = []
    for i in balanced_sample(base.targets, max_images, cfg.SEED):
        try:
            images.append(tf(base.load(i)))
        except CorruptImageError as e:
            logger.info("teacher health: leaving out %s", e)
    return images


@torch.no_grad()
def teacher_embeddings(teacher, images: List[torch.Tensor], device, amp_dtype=None, batch_size: int = 64):
    """(embeddings N x C, backbone features N x D), float32 on the CPU, of the frozen ``teacher`` (an
    :class:`pretrain.encoder.Encoder`) on ``images``, in eval mode (its mode is restored after). Runs the encoder's
    eager ``forward`` (a compiled teacher is not recompiled for these shapes)."""
    was_training = teacher.training
    teacher.eval()
    emb, feats = [], []
    try:
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            for start in range(0, len(images), batch_size):
                x = torch.stack(images[start:start + batch_size]).to(device)
                out = teacher.forward(x, embed=True)
                emb.append(out["embedding"].float().cpu())
                feats.append(out["features"].float().flatten(1).cpu())
    finally:
        teacher.train(was_training)
    return torch.cat(emb), torch.cat(feats)


def check_teacher(cfg, teacher, device="cpu", amp_dtype=None, max_images: Optional[int] = None,
                  distillers: Optional[List[str]] = None) -> Dict[str, object]:
    """The teacher's health on at most ``max_images`` (default TEST.TEACHER_HEALTH.IMAGES) training images: the
    numbers of :func:`embedding_health` for its projection embedding (``teacher_*`` keys) and the effective rank /
    mean cosine of its backbone features (``teacher_features_*``), ``teacher_collapsed``, and ``message``: one line
    with the numbers and the verdict, followed, when collapsed, by what to do (naming the weight keys of
    ``distillers``, default METHOD.DISTILLERS)."""
    n = cfg.TEST.TEACHER_HEALTH.IMAGES if max_images is None else max_images
    images = training_images(cfg, n)
    if len(images) < 2:
        raise ValueError(f"the teacher health check needs at least 2 readable training images in "
                         f"{cfg.DATA.TRAIN_DIR}, found {len(images)}")
    # the global RNG is left untouched (nothing here draws from it); a run is the same with the check on or off
    emb, feats = teacher_embeddings(teacher, images, device, amp_dtype)
    h = embedding_health(emb)
    f = embedding_health(feats)
    rec = {"teacher_images": h["images"], "teacher_dim": h["dim"], "teacher_mean_cosine": h["mean_cosine"],
           "teacher_effective_rank": h["effective_rank"], "teacher_std": h["std"],
           "teacher_std_uniform": h["std_uniform"], "teacher_collapsed": h["collapsed"],
           "teacher_features_mean_cosine": f["mean_cosine"], "teacher_features_effective_rank": f["effective_rank"]}
    rec["message"] = health_message(rec, cfg, list(cfg.METHOD.DISTILLERS) if distillers is None else distillers)
    return rec


def health_message(rec: dict, cfg, distillers: List[str]) -> str:
    """The log line of :func:`check_teacher`'s record ``rec`` and, when the embedding is collapsed, the remedies."""
    line = (f"teacher health ({cfg.MODEL.TEACHER.ARCH}, {rec['teacher_images']} training images): projection "
            f"embedding mean pairwise cosine {rec['teacher_mean_cosine']:.4f} (collapsed above {MAX_MEAN_COSINE:g}), "
            f"effective rank {rec['teacher_effective_rank']:.2f} of {rec['teacher_dim']} (collapsed below "
            f"{MIN_EFFECTIVE_RANK:g}), per-dimension std {rec['teacher_std']:.3g} (spread evenly over the sphere: "
            f"{rec['teacher_std_uniform']:.3g}); backbone features effective rank "
            f"{rec['teacher_features_effective_rank']:.2f}: ")
    if not rec["teacher_collapsed"]:
        return line + "healthy"
    weights = weight_keys(cfg, distillers)
    what = ("maps (nearly) every image to the same embedding, so distilling it teaches the student a constant "
            "vector: the student's head grows to reproduce it, its MoCo-v2 key encoder fills the queue with one "
            "direction and its InfoNCE sits at chance, ln(K + 1)"
            if rec["teacher_mean_cosine"] > MAX_MEAN_COSINE else
            "embeds the images along fewer than 2 directions (dimensional collapse), so distilling it teaches the "
            "student at most one bit per image")
    return line + (
        f"COLLAPSED. The teacher {what}. What to do: (1) train the teacher differently (a longer schedule, more data "
        "or stronger augmentation, another temperature or queue size: a MoCo-v2 head pretrained on a small dataset "
        "can collapse while its backbone stays good) and check it again with tools/teacher_health.py; (2) distil "
        f"another layer: its backbone features (effective rank {rec['teacher_features_effective_rank']:.1f} here) "
        "are what CompRess distils (METHOD.DISTILLERS [compress], LOSS.COMPRESS.TEACHER_FEATURES backbone), or "
        "transfer its feature maps (METHOD.DISTILLERS [attention]); (3) lower the distillation weight so the "
        f"student's own objective dominates ({', '.join(weights) if weights else 'its LOSS.<DISTILLER>.WEIGHT'} "
        "now).")


def record_summary(rec: dict) -> Dict[str, object]:
    """:func:`check_teacher`'s record without its message, numbers rounded for metrics.jsonl."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items() if k != "message"}
