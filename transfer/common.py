"""The evaluators' shared toolkit: what the linear / semi-supervised / CIFAR evaluator (:mod:`transfer.linear`), the
kNN evaluator (:mod:`transfer.knn`) and t-SNE (:mod:`transfer.tsne`) all build on.

The frozen backbone (loaded strictly from any checkpoint format :func:`pretrain.formats.read_backbone` reads, in eval
mode, without gradients) and bitwise checks that it stays frozen; the datasets of ``DATA.*`` (ImageFolder or CIFAR,
optionally a semi-supervised subset) with their training / evaluation transforms; a seeded per-epoch sampler whose
augmentations depend on neither workers, processes nor resumption; what every evaluator process does first
(:func:`start_run`); and top-1 / top-5 counting.
"""
import logging
import math
import os
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from pretrain import distributed as du
from pretrain.backbones import build_backbone
from pretrain.cfgnode import CfgNode, save_cfg
from pretrain.checkpoint import load_strict
from pretrain.data import INTERPOLATIONS, ImageFolder, eval_transform, sample_seed
from pretrain.formats import read_backbone
from pretrain.runlock import OutputDirLock, lock_output_dir
from pretrain.runlog import setup_logging

logger = logging.getLogger("transfer")

# ----------------------------------------------------------------------------------------------------------------
# The frozen backbone


def freeze(backbone: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses and keeps its running statistics) and no gradients, for good."""
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


def load_backbone(weights: str, arch: str = "", seed: int = 0) -> Tuple[nn.Module, dict]:
    """A frozen backbone with ``weights`` loaded strictly (every backbone key must be in the checkpoint).

    ``weights``: our export, an official MoCo-v1/v2 ``.pth.tar``, SwAV or DisCo-pytorch checkpoint (read by
    :func:`pretrain.formats.read_backbone`), or ``"random"`` for an untrained baseline of ``arch``.
    ``arch`` "" takes the architecture the checkpoint names. Returns ``(backbone, info)`` with the arch, format and
    the checkpoint entries deliberately not loaded (projection heads, MoCo queues, ...).
    """
    if not weights:
        raise ValueError("MODEL.WEIGHTS is empty: point it at the backbone to evaluate (our export "
                         "OUTPUT_DIR/export/<arch>.pth, a MoCo .pth.tar, SwAV or DisCo-pytorch checkpoint), or set "
                         "MODEL.WEIGHTS random with MODEL.ARCH for an untrained baseline")
    if weights == "random":
        if not arch:
            raise ValueError("MODEL.WEIGHTS random needs MODEL.ARCH (which architecture to initialise)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = build_backbone(arch)
        return freeze(backbone), {"arch": arch, "format": "random", "weights": "random", "method": "",
                                  "skipped": {}}
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights!r} does not exist")
    ckpt = read_backbone(weights, arch=arch or None, what="MODEL.WEIGHTS")
    backbone = build_backbone(ckpt.arch)
    load_strict(backbone, ckpt.state_dict, f"backbone {weights} ({ckpt.format} format, arch {ckpt.arch})")
    info = {"arch": ckpt.arch, "format": ckpt.format, "weights": os.path.abspath(weights),
            "method": str(ckpt.metadata.get("method") or ""),
            "skipped": {k: str(v) for k, v in dict(ckpt.skipped).items()}}
    if info["skipped"]:
        logger.info("%s: %d checkpoint entries not part of the backbone were left out: %s", weights,
                    len(info["skipped"]), sorted(info["skipped"])[:8])
    return freeze(backbone), info


def frozen_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (BN running statistics, counters), for bitwise comparisons."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> List[str]:
    """Names whose tensors differ bitwise between two :func:`frozen_state` copies (or exist in only one)."""
    return sorted(k for k in set(before) | set(after)
                  if k not in before or k not in after or not torch.equal(before[k], after[k]))


# ----------------------------------------------------------------------------------------------------------------
# Data


def eval_transform_from_cfg(cfg: CfgNode):
    """:func:`pretrain.data.eval_transform` with DATA.VAL_RESIZE / IMAGE_SIZE / INTERPOLATION (ImageNet: 256 / 224
    bilinear; CIFAR: 224 / 224 bicubic, i.e. 32 -> 224)."""
    d = cfg.DATA
    return eval_transform(d.IMAGE_SIZE, d.VAL_RESIZE, d.INTERPOLATION, d.MEAN, d.STD)


def train_transform(cfg: CfgNode):
    """RandomResizedCrop + horizontal flip (MoCo's lincls), or the evaluation transform without augmentation."""
    d = cfg.DATA
    if not d.TRAIN_AUGMENT:
        return eval_transform_from_cfg(cfg)
    return T.Compose([T.RandomResizedCrop(d.IMAGE_SIZE, interpolation=INTERPOLATIONS[d.INTERPOLATION]),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(d.MEAN, d.STD)])


class TransformedDataset(Dataset):
    """``(transform(base.load(i)), label)``. Keys are ``i`` or ``(epoch, i)``; with an epoch, the transform runs
    under a torch RNG seeded from (seed, epoch, i), so augmentations do not depend on workers, processes or
    resumption."""

    def __init__(self, base, transform, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        img = self.base.load(index)
        if epoch is None:
            return self.transform(img), self.base.targets[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img), self.base.targets[index]


class EpochSampler(Sampler):
    """This process's share of one epoch as ``(epoch, index)`` keys.

    The epoch's permutation depends only on (seed, epoch); it is padded by wrapping around to a multiple of the
    number of processes (as ``DistributedSampler``), and process ``rank`` takes every ``world``-th entry, so all
    processes run the same number of batches.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> List[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        order = order.tolist()
        total = math.ceil(self.n / self.world) * self.world
        order += order[:total - self.n]
        return order[self.rank:total:self.world]

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices()])


def dataset_name(cfg: CfgNode) -> str:
    d = cfg.DATA
    if d.NAME:
        return d.NAME
    if d.DATASET != "imagefolder":
        return d.DATASET
    train = os.path.normpath(os.path.abspath(d.TRAIN_DIR))
    # /datasets/imagenet/train -> imagenet; a folder not called train names itself
    return os.path.basename(os.path.dirname(train)) if os.path.basename(train) == "train" else os.path.basename(train)


def build_datasets(cfg: CfgNode, evaluation: str = "") -> Tuple[object, object, str]:
    """(training split, possibly a subset; evaluation split; description of the training subset or "") without
    transforms; both offer ``load(i)``, ``targets`` and ``classes``. ``evaluation`` names the caller in errors
    (e.g. "kNN evaluation"; "" = "the evaluation")."""
    from .cifar import CIFAR
    from .semi import SubsetView, balanced_subset_indices, read_subset_list, subset_indices_from_list

    d = cfg.DATA
    if d.DATASET == "imagefolder":
        for key, path in (("DATA.TRAIN_DIR", d.TRAIN_DIR), ("DATA.VAL_DIR", d.VAL_DIR)):
            if not path:
                raise ValueError(f"{key} is empty: set it to an ImageFolder root (e.g. /datasets/imagenet/"
                                 f"{'train' if 'TRAIN' in key else 'val'})")
        train, val = ImageFolder(d.TRAIN_DIR), ImageFolder(d.VAL_DIR)
        if val.classes != train.classes:
            only_val = sorted(set(val.classes) - set(train.classes))
            only_train = sorted(set(train.classes) - set(val.classes))
            raise ValueError(f"DATA.VAL_DIR {d.VAL_DIR} and DATA.TRAIN_DIR {d.TRAIN_DIR} have different class folders "
                             f"({len(val.classes)} vs {len(train.classes)}; only in VAL_DIR: {only_val[:5]}, only in "
                             f"TRAIN_DIR: {only_train[:5]}); {evaluation or 'the evaluation'} labels the VAL_DIR "
                             f"images with the classes of TRAIN_DIR, so both need the same class folders")
    else:
        train, val = CIFAR(d.ROOT, d.DATASET, train=True), CIFAR(d.ROOT, d.DATASET, train=False)
    subset = ""
    if d.SUBSET_FILE:
        names = read_subset_list(d.SUBSET_FILE)
        train = SubsetView(train, subset_indices_from_list(train.samples, names, d.SUBSET_FILE))
        subset = os.path.basename(d.SUBSET_FILE)
    elif d.SUBSET_PERCENT or d.SUBSET_PER_CLASS:
        train = SubsetView(train, balanced_subset_indices(train.targets, d.SUBSET_PERCENT, d.SUBSET_PER_CLASS,
                                                          cfg.SEED))
        subset = f"{d.SUBSET_PERCENT:g}%" if d.SUBSET_PERCENT else f"{d.SUBSET_PER_CLASS} per class"
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split: {len(train)} training and {len(val)} evaluation images")
    return train, val, subset


# ----------------------------------------------------------------------------------------------------------------
# Running an evaluator


def start_run(cfg: CfgNode, what: str = "evaluation") -> torch.device:
    """What every evaluator process does first: join the process group (if any), take OUTPUT_DIR's lock (one run per
    folder, :mod:`pretrain.runlock`; :func:`end_run` releases it), log to it, and write the resolved config there
    (rank 0). Returns this process's device."""
    device = du.init_distributed()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    lock_output_dir(cfg.OUTPUT_DIR, what, device)
    setup_logging(cfg.OUTPUT_DIR, du.get_rank())
    if du.is_main_process():
        save_cfg(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    return device


def end_run(cfg: CfgNode) -> None:
    """Release OUTPUT_DIR's lock taken by :func:`start_run` (a no-op where this process holds none)."""
    OutputDirLock(cfg.OUTPUT_DIR).release()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[int, int]:
    """(top-1 hits, top-5 hits); top-5 counts every sample when there are at most 5 classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())

