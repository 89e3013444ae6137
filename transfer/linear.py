"""Linear evaluation of a frozen backbone (ImageNet, semi-supervised subsets, CIFAR): MoCo's ``main_lincls`` protocol.

The backbone is loaded strictly, put in eval mode (BatchNorm running statistics are never updated) and never receives
gradients; one ``nn.Linear`` on its pooled features (init N(0, 0.01), bias 0) is trained with SGD (momentum 0.9, no
weight decay) under a multistep or cosine schedule, and top-1 / top-5 are measured on the validation split.

Features (``MODEL.FEATURES``, :func:`transfer.common.build_feature_extractor`): the backbone's pooled output by
default; for ViTs, DINO's linear protocol (``eval_linear.py``) instead concatenates the normed class tokens of the
last ``N_LAST_BLOCKS`` blocks (DINO: 4 for ViT-S/16), optionally with the mean patch token of the last block
(``AVGPOOL_PATCH_TOKENS``; DINO: with 1 block for ViT-B); the classifier's input dim follows. XCiT is evaluated on its
own output, as DINO does (``configs/eval/linear_dino_vit.yaml``, ``linear_dino_xcit.yaml``). Classifier checkpoints
record the feature mode and resume only under the same one.

Fast path (``SOLVER.CACHE_FEATURES``, only when ``DATA.TRAIN_AUGMENT`` is off, as in the CIFAR protocol): the frozen
features of every training and validation image are extracted once, and the classifier trains on them in exactly the
order of the uncached path (the same seeded sampler cut into the same batches), so both give the same classifier up
to floating-point summation order. The cache is held in this process's memory only, extracted by this run's feature
extractor (``MODEL.FEATURES`` included): it is never written to disk, so no other run or feature mode can reuse it.

Runs are resumable (an atomic checkpoint of classifier, optimizer, scheduler, epoch and RNG after every epoch; a run
always continues from the newest one in OUTPUT_DIR) and DDP-ready (each process takes its share of every batch; only
the classifier is wrapped in DDP; metrics are summed across processes).

Progress: every epoch, evaluation pass and feature extraction longer than a few seconds shows a tqdm bar with an ETA
on rank 0's stderr (the epoch's bar carries the running mean loss and the lr); each epoch also logs one line.

Loss explosion: an epoch whose mean training loss exceeds LOSS_EXPLOSION_FACTOR (10) times ln(number of classes),
the loss of a uniform guess, has diverged (a healthy probe starts near ln(classes), at its N(0, 0.01) init, and goes
down). That is warned once per run (logged, kept in the checkpoints and listed in results.json ``warnings``) with the
SOLVER.BASE_LR to try instead: the paper's lr 30 (ResNets) / 3 (EfficientNet, MobileNet) was tuned on ImageNet
(1.28 M images, 1000 classes) with the features of BatchNorm-trained backbones, and on small data it often diverges.
A non-finite loss stops the run with an error.

Knowledge distillation (``KD.TEACHER_CLASSIFIER`` set; paper §4.4, Table 2 "KD" and "KD + DisCo"): the classifier
trains with :func:`pretrain.losses.kd.kd_loss` (ALPHA * T^2 * KL to the teacher's softened outputs + (1 - ALPHA) *
cross-entropy) instead of the cross-entropy. The teacher is a finished linear evaluation of its own: its backbone
(frozen, eval mode, loaded like the student's) and its trained classifier, read weights-only from the classifier
checkpoint its run wrote; it sees the same (augmented) images as the student, batch by batch, or, with cached
features, its logits of the training split are cached once in the order of the student's cache. It is never
checkpointed: it is rebuilt from the config on every (resumed) run. Without KD nothing changes (the same classifier,
bit for bit); semi-supervised subsets and CIFAR go through this evaluator and get KD the same way. With KD the
logged / recorded training loss is the KD loss.

Information plane (``INFO_PLANE.ENABLED``; paper Figure 7): before the first epoch and after every epoch, rank 0 adds
``mi_xt`` = I(X;T) and ``mi_ty`` = I(T;Y) (bits, with their upper bounds ``mi_xt_max`` = log2 N and ``mi_ty_max`` =
H(Y)) of the classifier's softmax output on a fixed class-balanced subset of INFO_PLANE.MAX_IMAGES training images
(evaluation transform) to metrics.jsonl, estimated by binning as the official code (:mod:`transfer.infoplane`; the
first record, ``epoch`` 0, is the initial classifier). ``tools/plot_curves.py`` draws the paths of several runs.
The classifier trains exactly as without it.

The toolkit shared with the other evaluators (frozen backbone, datasets, transforms, sampler) is :mod:`transfer.common`.
"""
import argparse
import json
import logging
import math
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
import yaml

from pretrain import distributed as du
from pretrain.backbones import build_backbone
from pretrain.cfgdiff import check_resume, flatten, record_changes
from pretrain.checkpoint import Checkpointer, load_strict, verify_checkpoint
from pretrain.data import balanced_sample
from pretrain.formats import read_backbone
from pretrain.knn import backbone_features, extract_features
from pretrain.losses.kd import kd_loss
from pretrain.runlog import progress_bar
from pretrain.precision import amp_dtype
from pretrain.runlog import truncate_metrics
from pretrain.safeload import load_torch

from .common import (POOLED, EpochSampler, TransformedDataset, build_datasets, build_feature_extractor, dataset_name,
                     describe_features, end_run, eval_transform_from_cfg, feature_dim_of, feature_mode, freeze,
                     load_backbone, start_run, topk_correct, train_transform)
from .config import SAFE_ON_RESUME, CfgNode, setup_eval_cfg
from .infoplane import info_plane_record

logger = logging.getLogger("transfer")

LOSS_EXPLOSION_FACTOR = 10.0  # warn when an epoch's mean loss > this x ln(classes), the loss of a uniform guess

# ----------------------------------------------------------------------------------------------------------------
# The classifier and its schedule


def build_classifier(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """MoCo's lincls initialisation: weight ~ N(0, 0.01), bias 0; the same on every process (seeded)."""
    clf = nn.Linear(feature_dim, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=g) * 0.01)
        clf.bias.zero_()
    return clf


def lr_factor(cfg: CfgNode, epoch: int) -> float:
    """Learning-rate multiplier of ``epoch`` (0-based): GAMMA ** (steps passed), or a per-epoch cosine."""
    s = cfg.SOLVER
    if s.SCHEDULER == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / s.EPOCHS))
    return s.GAMMA ** sum(epoch >= step for step in s.STEPS)


# ----------------------------------------------------------------------------------------------------------------
# The knowledge-distillation teacher: a backbone and its own linear classifier

CLASSIFIER_KEYS = ("classifier", "arch", "weights", "num_classes", "feature_dim")  # what LinearEvaluator saves


def read_classifier_checkpoint(path: str, key: str = "KD.TEACHER_CLASSIFIER") -> Tuple[dict, str]:
    """(state, absolute file) of a linear classifier checkpoint written by this evaluator: ``path`` is a linear
    evaluation's OUTPUT_DIR (its newest readable ``checkpoints/model_*.pth``), its ``checkpoints`` folder, or one
    such file. Read weights-only (:func:`pretrain.safeload.load_torch`: nothing in the file can run code). ``key``
    names the config key in errors."""
    fix = (f"set {key} to the teacher's linear-evaluation OUTPUT_DIR (the folder where tools/eval_linear.py wrote "
           f"checkpoints/ and results.json for the teacher backbone) or a checkpoints/model_*.pth file in it")
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist: {fix}")
    if os.path.isdir(path):
        folder = os.path.normpath(path)
        if os.path.basename(folder) == "checkpoints" and not os.path.isdir(os.path.join(folder, "checkpoints")):
            folder = os.path.dirname(folder)  # the checkpoints/ folder itself
        state, file = Checkpointer(folder).load_latest()
        if state is None:
            raise FileNotFoundError(f"{key} {path} has no readable classifier checkpoint (checkpoints/model_*.pth): "
                                    f"run the teacher's linear evaluation first (tools/eval_linear.py ... "
                                    f"MODEL.WEIGHTS <teacher backbone> OUTPUT_DIR {path}), or {fix}")
    else:
        verify_checkpoint(path)
        state, file = load_torch(path, key), path
    missing = [k for k in CLASSIFIER_KEYS if k not in state] if isinstance(state, dict) else list(CLASSIFIER_KEYS)
    if missing:
        raise ValueError(f"{key} {file} is not a linear classifier checkpoint of tools/eval_linear.py (it has no "
                         f"{missing} entries; a backbone export or a pretraining checkpoint is not one): {fix}")
    return state, os.path.abspath(file)


def _saved_cfg(state: dict) -> dict:
    """The resolved config a classifier checkpoint carries (``cfg``, yaml), as plain data; {} if unreadable."""
    try:
        out = yaml.safe_load(state.get("cfg") or "")
    except yaml.YAMLError:
        return {}
    return out if isinstance(out, dict) else {}


def _absent_keys(saved: dict, cfg: CfgNode) -> Tuple[str, ...]:
    """The keys of ``cfg`` that a checkpoint's config ``saved`` does not have: written before they existed, so not
    compared on resume."""
    have = flatten(saved)
    return tuple(k for k in flatten(cfg) if k not in have)


class TeacherClassifier(nn.Module):
    """The KD teacher: a frozen backbone (its feature extractor, :func:`transfer.common.build_feature_extractor`) and
    its own trained linear classifier; ``forward(images)`` -> logits. The classifier runs in float32 outside autocast,
    as the student's does."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear):
        super().__init__()
        self.backbone, self.fc = backbone, fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.fc(feats.float())


class LinearEvaluator:
    """Train and evaluate a linear classifier on ``cfg.MODEL.WEIGHTS``' frozen features (see the module doc)."""

    def __init__(self, cfg: CfgNode, require_checkpoint: bool = False):
        self.cfg, self.require_checkpoint = cfg, require_checkpoint

    # ------------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.device = start_run(cfg, "linear evaluation")
        self.rank, self.world = du.get_rank(), du.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % self.world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                             f"{self.world} processes")
        self.t0 = time.perf_counter()
        self.amp_dtype = amp_dtype(cfg.MODEL.AMP_DTYPE)
        self.backbone, self.info = load_backbone(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH, cfg.SEED)
        self.backbone.to(self.device)
        if cfg.MODEL.CHANNELS_LAST:
            self.backbone.to(memory_format=torch.channels_last)
        self.arch = self.info["arch"]
        self.features_mode = feature_mode(cfg)
        # what the classifier reads: self.backbone itself (pooled output) or DINO's ViT block features around it
        self.features, self.feature_dim = build_feature_extractor(self.backbone, self.arch, self.features_mode)
        train, val, self.subset = build_datasets(cfg, "linear evaluation")
        self.train_set = TransformedDataset(train, train_transform(cfg), cfg.SEED)
        self.val_set = TransformedDataset(val, eval_transform_from_cfg(cfg), cfg.SEED)
        self.num_classes = len(train.classes)
        self.local_batch = cfg.SOLVER.IMS_PER_BATCH // self.world
        self.sampler = EpochSampler(len(train), self.rank, self.world, cfg.SEED)

        self.classifier = build_classifier(self.feature_dim, self.num_classes, cfg.SEED).to(self.device)
        self.classifier_ddp = (DistributedDataParallel(self.classifier, device_ids=[self.device.index]
                                                       if self.device.type == "cuda" else None)
                               if self.world > 1 else self.classifier)
        s = cfg.SOLVER
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=s.BASE_LR, momentum=s.MOMENTUM,
                                         weight_decay=s.WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.checkpointer = Checkpointer(cfg.OUTPUT_DIR, s.MAX_TO_KEEP)
        self.epoch = 0
        self.cache: Optional[Dict[str, torch.Tensor]] = None  # split -> N x D frozen features (CACHE_FEATURES)
        self.cache_seconds = 0.0
        self.warnings: List[str] = []  # once-per-run warnings (loss explosion), kept in checkpoints and results.json
        logger.info("linear evaluation of %s (%s, %s format; features: %s, %d-d) on %s%s: %d training / %d evaluation "
                    "images, %d classes, %d processes x %d, %d epochs, lr %g (%s), %s", self.arch,
                    self.info["weights"], self.info["format"], describe_features(self.features_mode),
                    self.feature_dim, dataset_name(cfg), f" ({self.subset})" if self.subset else "", len(train),
                    len(val), self.num_classes, self.world, self.local_batch, s.EPOCHS, s.BASE_LR, s.SCHEDULER,
                    "cached features" if s.CACHE_FEATURES else "backbone run on every batch")
        self.kd: Optional[dict] = None  # results.json "kd": the teacher and the KD settings; None = plain CE
        self.teacher: Optional[TeacherClassifier] = None  # built when first needed (not for --eval-only)
        self.teacher_cache: Optional[torch.Tensor] = None  # N x classes teacher logits of the train split (cached)
        self.info_plane: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # INFO_PLANE: (features N x D, labels N)
        if cfg.KD.TEACHER_CLASSIFIER:
            self._setup_kd()

    def _setup_kd(self) -> None:
        """Read and check the teacher's classifier checkpoint and find its backbone (built later, in
        :meth:`_teacher_net`): every mistake of the KD keys is reported here, before anything trains."""
        k = self.cfg.KD
        state, file = read_classifier_checkpoint(k.TEACHER_CLASSIFIER)
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"KD.TEACHER_CLASSIFIER {file} is a classifier for {state['num_classes']} classes, but "
                             f"{dataset_name(self.cfg)} has {self.num_classes}: the teacher's linear evaluation must "
                             f"be on the same classes (the same dataset / class folders); point KD.TEACHER_CLASSIFIER "
                             f"at the teacher's linear evaluation on this dataset")
        saved = _saved_cfg(state)
        weights = k.TEACHER_WEIGHTS or state["weights"]
        arch = k.TEACHER_ARCH or state["arch"]
        source = "KD.TEACHER_WEIGHTS" if k.TEACHER_WEIGHTS else (f"KD.TEACHER_WEIGHTS is empty, so the backbone "
                                                                 f"named by the classifier checkpoint {file}")
        if weights != "random" and not os.path.isfile(weights):
            raise FileNotFoundError(f"the KD teacher backbone {weights!r} does not exist ({source}): set "
                                    f"KD.TEACHER_WEIGHTS to the teacher backbone's file (the MODEL.WEIGHTS of the "
                                    f"teacher's linear evaluation)")
        # the teacher's features are those its classifier was trained on (checkpoints before MODEL.FEATURES: pooled)
        features = state.get("features") or POOLED
        try:
            dim = feature_dim_of(arch, features, f"KD.TEACHER_CLASSIFIER {file}")
        except KeyError as e:
            raise ValueError(f"KD.TEACHER_ARCH: {e.args[0]}") from None
        except ValueError:  # the teacher's mode is its checkpoint's, so the fix is the architecture, not ours
            raise ValueError(f"KD.TEACHER_CLASSIFIER {file} was trained on the {describe_features(features)} of "
                             f"{state['arch']} (its MODEL.FEATURES {features}), which the teacher architecture "
                             f"{arch} cannot give; clear KD.TEACHER_ARCH (the checkpoint's architecture is "
                             f"used) or set it to that of the teacher's linear evaluation") from None
        if dim != state["feature_dim"]:
            raise ValueError(f"KD.TEACHER_CLASSIFIER {file} is a classifier on {state['feature_dim']}-d features of "
                             f"{state['arch']} ({describe_features(features)}), but the teacher architecture {arch} "
                             f"has {dim}-d features: clear KD.TEACHER_ARCH (the checkpoint's architecture is used) or "
                             f"set it to that of the teacher's linear evaluation")
        if k.TEACHER_WEIGHTS and os.path.abspath(weights) != state["weights"] and weights != state["weights"]:
            logger.warning("KD: the teacher classifier %s was trained on the features of %s, now using %s "
                           "(KD.TEACHER_WEIGHTS)", file, state["weights"], weights)
        planned = (saved.get("SOLVER") or {}).get("EPOCHS")
        if isinstance(planned, int) and state.get("epoch", planned) < planned:
            logger.warning("KD: the teacher classifier %s is from epoch %s of %d: its linear evaluation has not "
                           "finished", file, state.get("epoch"), planned)
        self._teacher_src = {"state": state["classifier"], "file": file, "arch": arch, "weights": weights,
                             "seed": saved.get("SEED", 0), "features": features}
        self.kd = {"teacher_classifier": file, "teacher_classifier_epoch": state.get("epoch"),
                   "teacher_weights": weights if weights == "random" else os.path.abspath(weights),
                   "teacher_arch": arch, "alpha": k.ALPHA, "temperature": k.TEMPERATURE, "reduction": k.REDUCTION}
        logger.info("knowledge distillation on: teacher %s (%s; features: %s) with its linear classifier %s (epoch "
                    "%s); loss = %g * T^2 * KL + %g * cross-entropy, T %g, KL reduction %s%s", arch,
                    self.kd["teacher_weights"], describe_features(features), file, state.get("epoch"), k.ALPHA,
                    1 - k.ALPHA, k.TEMPERATURE, k.REDUCTION,
                    " (the official kd_ce_loss.py: also averaged over the classes)" if k.REDUCTION == "mean"
                    else " (Hinton's KL)")

    def _teacher_net(self) -> TeacherClassifier:
        """The teacher, built (once) from :meth:`_setup_kd`'s findings: frozen, in eval mode, on this device."""
        if self.teacher is not None:
            return self.teacher
        src = self._teacher_src
        weights, arch = src["weights"], src["arch"]
        # building networks draws random initial weights: keep the run's RNG stream exactly as it is without KD
        with torch.random.fork_rng(devices=[]):
            if weights == "random":  # as that linear evaluation built it: seeded with its SEED
                backbone, _ = load_backbone("random", arch, src["seed"])
            else:
                ckpt = read_backbone(weights, arch=arch, what="KD teacher backbone (KD.TEACHER_WEIGHTS)")
                backbone = build_backbone(ckpt.arch)
                load_strict(backbone, ckpt.state_dict, f"KD teacher backbone {weights} ({ckpt.format} format, arch "
                                                       f"{ckpt.arch}; KD.TEACHER_WEIGHTS / KD.TEACHER_ARCH)")
            features, dim = build_feature_extractor(freeze(backbone), arch, src["features"],
                                                    f"KD.TEACHER_CLASSIFIER {src['file']}")
            fc = nn.Linear(dim, self.num_classes)
        load_strict(fc, src["state"], f"the classifier of KD.TEACHER_CLASSIFIER {src['file']}")
        teacher = freeze(TeacherClassifier(features, fc)).to(self.device)
        if self.cfg.MODEL.CHANNELS_LAST:
            teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher
        return teacher

    def _lr_factor(self, epoch: int) -> float:
        return lr_factor(self.cfg, epoch)

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "rng": torch.get_rng_state(),
                 "arch": self.arch, "weights": self.info["weights"], "num_classes": self.num_classes,
                 "feature_dim": self.feature_dim, "features": dict(self.features_mode), "warnings": list(self.warnings),
                 "cfg": self.cfg.dump()}
        if self.kd is not None:  # what the classifier was distilled from (the teacher itself is not saved)
            state["kd"] = dict(self.kd)
        return state

    def resume_or_start(self) -> None:
        state, path = self.checkpointer.load_latest()
        if state is None:
            if self.require_checkpoint:
                raise FileNotFoundError(f"no readable classifier checkpoint in {self.checkpointer.dir}; train one "
                                        f"first (the same command without --eval-only / --resume)")
            return
        their_features = state.get("features") or POOLED  # written before MODEL.FEATURES existed: pooled
        if their_features != self.features_mode:
            raise ValueError(f"{path} is a classifier on the {describe_features(their_features)} of {state['arch']} "
                             f"(MODEL.FEATURES {their_features}), not on the {describe_features(self.features_mode)} "
                             f"(MODEL.FEATURES {self.features_mode}): another feature mode is another run; use "
                             f"another OUTPUT_DIR, or set MODEL.FEATURES as that run had it")
        theirs = (state["arch"], state["num_classes"], state["feature_dim"])
        if theirs != (self.arch, self.num_classes, self.feature_dim):
            raise ValueError(f"{path} is a classifier for {theirs[0]} ({theirs[2]}-d features, {theirs[1]} classes), "
                             f"not {self.arch} ({self.feature_dim}-d, {self.num_classes} classes); use another "
                             f"OUTPUT_DIR")
        changes = {}
        if state.get("cfg"):  # a key the checkpoint's config predates is not compared (it ran that key's default)
            changes = check_resume(state["cfg"], self.cfg, SAFE_ON_RESUME + _absent_keys(_saved_cfg(state), self.cfg),
                                   "SOLVER.RESUME_CHANGED_CONFIG", path)
        if state["weights"] != self.info["weights"]:
            logger.warning("%s was trained on the features of %s, now evaluating %s", path, state["weights"],
                           self.info["weights"])
        if state.get("kd") != self.kd:
            logger.warning("%s was trained with knowledge distillation %s, now continuing with %s", path,
                           state.get("kd") or "off", self.kd or "off")
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.warnings = list(state.get("warnings", []))  # checkpoints written before warnings existed have none
        torch.set_rng_state(state["rng"])
        logger.info("resumed from %s after epoch %d", path, self.epoch)
        if self.rank == 0:
            truncate_metrics(self.cfg.OUTPUT_DIR, "epoch", self.epoch)
            record_changes(self.cfg.OUTPUT_DIR, self.epoch, changes)

    # ------------------------------------------------------------------------------------------------------------
    def _build_cache(self, splits: Sequence[str]) -> None:
        """Frozen features of every image of ``splits`` ("train", "val"), computed once; every process holds all
        rows."""
        t = time.perf_counter()
        kw = dict(device=self.device, batch_size=self.cfg.TEST.IMS_PER_BATCH, num_workers=self.cfg.DATA.NUM_WORKERS,
                  amp_dtype=self.amp_dtype, channels_last=self.cfg.MODEL.CHANNELS_LAST)
        datasets = {"train": self.train_set, "val": self.val_set}
        self.cache = dict(self.cache or {}, **{s: extract_features(self.features, datasets[s], desc=f"{s} features",
                                                                   **kw) for s in splits})
        logger.info("cached the frozen features of %s in %.1f s", " and ".join(
            f"{len(datasets[s])} {s} images" for s in splits), time.perf_counter() - t)
        if self.kd is not None and "train" in splits:  # the teacher's logits of the same images, in the same order
            t_kd = time.perf_counter()
            self.teacher_cache = extract_features(self._teacher_net(), self.train_set, desc="train teacher logits",
                                                  **kw)
            logger.info("cached the KD teacher's logits of %d train images in %.1f s", len(self.train_set),
                        time.perf_counter() - t_kd)
        self.cache_seconds += time.perf_counter() - t

    def _setup_info_plane(self) -> None:
        """INFO_PLANE: the frozen features of the estimate's fixed images (:mod:`transfer.infoplane`): a
        class-balanced subset of at most MAX_IMAGES training images through the evaluation transform, taken from
        the feature cache when there is one. A collective call with several processes. The global RNG is left as it
        was: the classifier trains exactly as without INFO_PLANE."""
        cfg = self.cfg
        targets = self.train_set.base.targets
        idx = balanced_sample(targets, cfg.INFO_PLANE.MAX_IMAGES, cfg.SEED)
        if self.cache is not None and "train" in self.cache:  # cached: no augmentation, the evaluation transform
            feats = self.cache["train"][torch.tensor(idx, dtype=torch.long)]
        else:
            data = torch.utils.data.Subset(TransformedDataset(self.train_set.base, eval_transform_from_cfg(cfg),
                                                              cfg.SEED), idx)
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG
                feats = extract_features(self.features, data, self.device, cfg.TEST.IMS_PER_BATCH,
                                         cfg.DATA.NUM_WORKERS, self.amp_dtype, cfg.MODEL.CHANNELS_LAST,
                                         desc="information-plane features")
        self.info_plane = (feats, torch.as_tensor([targets[i] for i in idx]))
        logger.info("information plane (INFO_PLANE): I(X;T) and I(T;Y) of the softmax output on %d training images, "
                    "%d bins per probability, every epoch", len(idx), cfg.INFO_PLANE.BINS)

    @torch.no_grad()
    def _info_plane_record(self) -> Dict[str, float]:
        """``mi_xt``, ``mi_ty`` (bits) of the classifier as it is now, and their upper bounds (log2 N, H(Y))."""
        feats, labels = self.info_plane
        logits = self.classifier(feats.to(self.device)).float().cpu()
        return info_plane_record(logits, labels, self.cfg.INFO_PLANE.BINS)

    def _train_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """This epoch's (features, labels, teacher logits or None without KD) batches: the sampler's order cut into
        batches of ``local_batch``, from the cache or by running the backbone (and the teacher, on the same
        augmented images)."""
        if self.cache is not None:
            idx = torch.tensor(self.sampler.indices())
            labels = torch.as_tensor(self.train_set.base.targets)
            for start in range(0, len(idx), self.local_batch):
                b = idx[start:start + self.local_batch]
                teacher = self.teacher_cache[b].to(self.device) if self.kd is not None else None
                yield self.cache["train"][b].to(self.device), labels[b].to(self.device), teacher
            return
        loader = DataLoader(self.train_set, batch_size=self.local_batch, sampler=self.sampler,
                            num_workers=self.cfg.DATA.NUM_WORKERS, pin_memory=self.device.type == "cuda")
        teacher_net = self._teacher_net() if self.kd is not None else None
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            feats = backbone_features(self.features, images, self.amp_dtype, self.cfg.MODEL.CHANNELS_LAST)
            teacher = (backbone_features(teacher_net, images, self.amp_dtype, self.cfg.MODEL.CHANNELS_LAST)
                       if teacher_net is not None else None)
            yield feats, labels.to(self.device), teacher

    def _reduce(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_epoch(self) -> Dict[str, float]:
        """One epoch; rank 0 shows a bar of its batches with the running mean loss and the lr. Raises on a
        non-finite loss and warns (once per run) when the epoch's mean loss exploded (:meth:`_check_explosion`)."""
        self.sampler.set_epoch(self.epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        kd = self.cfg.KD
        loss_sum, hits, seen = 0.0, 0, 0
        self.classifier_ddp.train()
        batches = math.ceil(len(self.sampler) / self.local_batch)
        with progress_bar(batches, f"epoch {self.epoch + 1}/{self.cfg.SOLVER.EPOCHS}", unit="batch",
                          leave=False) as bar:  # the epoch's log line follows
            for feats, labels, teacher_logits in self._train_batches():
                logits = self.classifier_ddp(feats)
                if teacher_logits is None:
                    loss = F.cross_entropy(logits, labels)
                else:
                    loss = kd_loss(logits, teacher_logits, labels, kd.ALPHA, kd.TEMPERATURE, kd.REDUCTION)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += loss.item() * len(labels)
                hits += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
                bar.set_postfix(loss=f"{loss_sum / seen:.4g}", lr=f"{lr:.4g}", refresh=False)
                bar.update(1)
        self.scheduler.step()
        self.epoch += 1
        loss_sum, hits, seen = self._reduce([loss_sum, hits, seen])
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss in epoch {self.epoch}; lower SOLVER.BASE_LR (the classifier "
                                     f"of the previous epoch is the last checkpoint)")
        self._check_explosion(loss_sum / seen, lr)
        return {"epoch": self.epoch, "lr": lr, "loss": loss_sum / seen, "train_top1": 100.0 * hits / seen}

    def _check_explosion(self, loss: float, lr: float) -> None:
        """Warn once per run when the epoch's mean loss exceeds LOSS_EXPLOSION_FACTOR x ln(classes), the loss of a
        uniform guess: the classifier diverged (a healthy probe starts near ln(classes) and goes down)."""
        limit = LOSS_EXPLOSION_FACTOR * math.log(self.num_classes)
        if loss <= limit or any(w.startswith("training loss exploded") for w in self.warnings):
            return
        base = self.cfg.SOLVER.BASE_LR
        msg = (f"training loss exploded: the mean loss of epoch {self.epoch} is {loss:.4g}, more than "
               f"{LOSS_EXPLOSION_FACTOR:g} x ln({self.num_classes}) = {limit:.3g} ({LOSS_EXPLOSION_FACTOR:g} times "
               f"the loss of a uniform guess; lr {lr:.4g} this epoch). Lower SOLVER.BASE_LR (now {base:g}): try "
               f"SOLVER.BASE_LR {base / 10:g}, and lower again if this recurs. The paper's lr (30 for ResNets, 3 for "
               f"EfficientNet / MobileNet) assumes ImageNet-scale training on BatchNorm-normalised features; on "
               f"small datasets or other features it diverges and the accuracies are unreliable.")
        self.warnings.append(msg)
        logger.warning(msg)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Top-1 / top-5 (%) on the whole evaluation split (each process an interleaved share, no padding)."""
        self.classifier.eval()
        n = len(self.val_set)
        mine = list(range(self.rank, n, self.world))
        labels = torch.as_tensor(self.val_set.base.targets)
        if self.cache is not None and "val" in self.cache:
            idx = torch.tensor(mine, dtype=torch.long)
            batches = ((self.cache["val"][idx[s:s + 4096]], labels[idx[s:s + 4096]]) for s in range(0, len(idx), 4096))
        else:
            loader = DataLoader(torch.utils.data.Subset(self.val_set, mine), batch_size=self.cfg.TEST.IMS_PER_BATCH,
                                num_workers=self.cfg.DATA.NUM_WORKERS, pin_memory=self.device.type == "cuda")
            batches = ((backbone_features(self.features, x.to(self.device), self.amp_dtype,
                                          self.cfg.MODEL.CHANNELS_LAST), y) for x, y in loader)
        top1 = top5 = seen = 0
        with progress_bar(len(mine), "evaluate", unit="img") as bar:
            for feats, y in batches:
                h1, h5 = topk_correct(self.classifier(feats.to(self.device)), y.to(self.device))
                top1, top5, seen = top1 + h1, top5 + h5, seen + len(y)
                bar.update(len(y))
        top1, top5, seen = self._reduce([top1, top5, seen])
        self.classifier.train()
        return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "images": int(seen)}

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> Optional[dict]:
        """Train (continuing from OUTPUT_DIR's newest checkpoint), evaluate, write results.json. Returns the results,
        or None when stopped early by SOLVER.STOP_AT_EPOCH."""
        self.setup()
        self.resume_or_start()
        cfg = self.cfg
        epochs = cfg.SOLVER.EPOCHS
        stop = min(epochs, cfg.SOLVER.STOP_AT_EPOCH) if cfg.SOLVER.STOP_AT_EPOCH >= 0 else epochs
        if cfg.SOLVER.CACHE_FEATURES and self.epoch < stop:
            self._build_cache(("train", "val"))
        if cfg.INFO_PLANE.ENABLED and self.epoch < stop:
            self._setup_info_plane()
        metrics = open(os.path.join(cfg.OUTPUT_DIR, "metrics.jsonl"), "a") if self.rank == 0 else None
        try:
            if self.info_plane is not None and self.epoch == 0 and self.rank == 0:  # the path's start: the init
                metrics.write(json.dumps({"epoch": 0, **self._info_plane_record()}) + "\n")
            while self.epoch < stop:
                t = time.perf_counter()
                rec = self.train_epoch()
                period = cfg.TEST.EVAL_PERIOD
                if period > 0 and self.epoch % period == 0 and self.epoch < epochs:
                    acc = self.evaluate()
                    rec.update(val_top1=acc["top1"], val_top5=acc["top5"])
                rec["seconds"] = round(time.perf_counter() - t, 3)
                if self.info_plane is not None and self.rank == 0:
                    rec.update(self._info_plane_record())
                if self.rank == 0:
                    if self.epoch % cfg.SOLVER.CHECKPOINT_PERIOD == 0 or self.epoch == stop:
                        self.checkpointer.save(self.state_dict(), self.epoch)
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                du.barrier()
                logger.info("epoch %d/%d: lr %.4g loss %.4f train top-1 %.2f%s%s", self.epoch, epochs, rec["lr"],
                            rec["loss"], rec["train_top1"], f" val top-1 {rec['val_top1']:.2f}" if "val_top1" in rec
                            else "", f" I(X;T) {rec['mi_xt']:.3f} I(T;Y) {rec['mi_ty']:.3f} bits" if "mi_xt" in rec
                            else "")
        finally:
            if metrics is not None:
                metrics.close()
        if self.epoch < epochs:
            logger.info("stopped after epoch %d of %d (SOLVER.STOP_AT_EPOCH); run again to continue", self.epoch,
                        epochs)
            return None
        return self.finish()

    def eval_only(self) -> dict:
        """``--eval-only``: evaluate the classifier saved in OUTPUT_DIR (required) and write results.json."""
        self.require_checkpoint = True
        self.setup()
        self.resume_or_start()
        return self.finish()

    def finish(self) -> dict:
        if self.cfg.SOLVER.CACHE_FEATURES and not (self.cache and "val" in self.cache):
            self._build_cache(("val",))  # evaluate on the same cached features a cached run trains and tests on
        acc = self.evaluate()
        cfg = self.cfg
        name = dataset_name(cfg)
        results = {
            "eval": "semi" if self.subset else "linear", "arch": self.arch, "weights": self.info["weights"],
            "checkpoint_format": self.info["format"], "dataset": name, "subset": self.subset,
            "num_classes": self.num_classes, "train_images": len(self.train_set), "val_images": acc["images"],
            "epochs": self.epoch, "top1": round(acc["top1"], 3), "top5": round(acc["top5"], 3),
            "lr": cfg.SOLVER.BASE_LR, "scheduler": cfg.SOLVER.SCHEDULER,
            "steps": list(cfg.SOLVER.STEPS) if cfg.SOLVER.SCHEDULER == "multistep" else [],
            "gamma": cfg.SOLVER.GAMMA, "features": dict(self.features_mode), "feature_dim": self.feature_dim,
            "cached_features": bool(cfg.SOLVER.CACHE_FEATURES),
            "cache_seconds": round(self.cache_seconds, 3), "kd": dict(self.kd) if self.kd else None,
            "warnings": list(self.warnings),
            "seconds": round(time.perf_counter() - self.t0, 3), "output_dir": os.path.abspath(cfg.OUTPUT_DIR),
        }
        if self.rank == 0:
            with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
            print(summary_line(results), flush=True)
            for w in self.warnings:  # a reminder: the first warning may be far up the log, or in an earlier job's
                logger.warning("this run's results come with a warning (results.json 'warnings'): %s", w)
        du.barrier()
        return results


def summary_line(r: dict) -> str:
    """e.g. ``linear resnet18 cifar10: top-1 61.20 top-5 95.00 (100 epochs)``."""
    data = f"{r['dataset']} ({r['subset']}, {r['train_images']} images)" if r["subset"] else r["dataset"]
    return f"{r['eval']} {r['arch']} {data}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} ({r['epochs']} epochs)"


def run(args: argparse.Namespace) -> Optional[dict]:
    """One process of ``tools/eval_linear.py`` (local, one of ``--num-gpus`` processes, or a SLURM task)."""
    cfg = setup_eval_cfg(args.config_file, args.opts)
    evaluator = LinearEvaluator(cfg, require_checkpoint=args.resume)
    try:
        return evaluator.eval_only() if args.eval_only else evaluator.run()
    finally:
        end_run(cfg)


def run_linear_probe(cfg: CfgNode) -> dict:
    """In-process helper (demo, benchmark): a complete run of ``cfg``; raises if it stopped early."""
    try:
        out = LinearEvaluator(cfg).run()
    finally:
        end_run(cfg)
    if out is None:
        raise RuntimeError(f"linear evaluation in {cfg.OUTPUT_DIR} stopped before the last epoch")
    return out
