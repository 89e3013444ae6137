"""The evaluators' shared toolkit: what the linear / semi-supervised / CIFAR evaluator (:mod:`transfer.linear`), the
kNN evaluator (:mod:`transfer.knn`) and t-SNE (:mod:`transfer.tsne`) all build on.

The frozen backbone (loaded strictly from any checkpoint format :func:`pretrain.formats.read_backbone` reads, in eval
mode, without gradients) and bitwise checks that it stays frozen; what the evaluators read from it
(``MODEL.FEATURES``: the pooled output, or DINO's ViT features, :func:`build_feature_extractor`); the datasets of
``DATA.*`` (ImageFolder or CIFAR, optionally a semi-supervised subset) with their training / evaluation transforms; a
seeded per-epoch sampler whose augmentations depend on neither workers, processes nor resumption; what every
evaluator process does first (:func:`start_run`); and top-1 / top-5 counting.
"""
import logging
import math
import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit
from torch import nn
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from pretrain import distributed as du
from pretrain.backbones import build_backbone, get_spec
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
# What the evaluators read from the frozen backbone (MODEL.FEATURES)

POOLED = {"n_last_blocks": 0, "avgpool_patch_tokens": False}  # the default mode: the backbone's pooled output


def feature_mode(cfg: CfgNode) -> Dict[str, object]:
    """``MODEL.FEATURES`` as plain data: what classifier checkpoints and results.json record, and what a resumed
    classifier must have been trained on."""
    f = cfg.MODEL.FEATURES
    return {"n_last_blocks": int(f.N_LAST_BLOCKS), "avgpool_patch_tokens": bool(f.AVGPOOL_PATCH_TOKENS)}


def describe_features(mode: Optional[dict]) -> str:
    """``pooled output``, or e.g. ``CLS of the last 4 blocks (normed) + mean patch token of the last``."""
    mode = mode or POOLED
    if not mode["n_last_blocks"]:
        return "pooled output"
    n = mode["n_last_blocks"]
    out = f"CLS of the last {n} blocks (normed)" if n > 1 else "CLS of the last block (normed)"
    return out + (" + mean patch token of the last" if mode["avgpool_patch_tokens"] else "")


class LastBlocksFeatures(nn.Module):
    """DINO's linear-evaluation features of a ViT (``eval_linear.py``, ``--n_last_blocks`` /
    ``--avgpool_patchtokens``): the class tokens of the last ``n_last_blocks`` transformer blocks, each through the
    model's final norm, concatenated oldest block first; with ``avgpool_patch_tokens`` also the mean of the last
    block's normed patch tokens, appended last. ``forward(images)``: N x 3 x H x W -> N x (n + avgpool) * embed_dim.

    Built on timm's ``forward_intermediates(norm=True)``, the same tokens DINO's ``get_intermediate_layers`` returns.
    With ``n_last_blocks`` 1 and no average it equals the pooled output of timm's ViT (global_pool ``token``: the
    normed CLS of the last block). DINO's code appends the average only with ``n_last_blocks`` 1 and then interleaves
    the two vectors element by element; here they are concatenated, which only permutes a linear classifier's inputs
    (its i.i.d. init and its training do not depend on their order) and works for any ``n_last_blocks``."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int, avgpool_patch_tokens: bool = False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool_patch_tokens = backbone, n_last_blocks, avgpool_patch_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        blocks = self.backbone.forward_intermediates(images, indices=self.n_last_blocks, return_prefix_tokens=True,
                                                     norm=True, output_fmt="NLC", intermediates_only=True)
        # per block, oldest first: (patch tokens N x L x D, prefix tokens N x P x D); the CLS token is prefix 0
        feats = [prefix[:, 0] for _, prefix in blocks]
        if self.avgpool_patch_tokens:
            feats.append(blocks[-1][0].mean(dim=1))
        return torch.cat(feats, dim=1)


def _last_blocks_dim(backbone: nn.Module, arch: str, mode: dict, what: str) -> int:
    """The feature dim of :class:`LastBlocksFeatures` on ``backbone``, or a ValueError saying why the architecture
    has no such features and what to set instead (``what``: the key or file the mode came from)."""
    n = mode["n_last_blocks"]
    if isinstance(backbone, Xcit):
        raise ValueError(f"{what} asks for the class tokens of the last {n} blocks of {arch}, but XCiT's "
                         f"{len(backbone.blocks)} XCA blocks carry no class token (XCiT adds it only in the "
                         f"class-attention blocks that follow them), and DINO's eval_linear evaluates XCiT on the "
                         f"model's own output: set MODEL.FEATURES.N_LAST_BLOCKS 0 and AVGPOOL_PATCH_TOKENS False "
                         f"(configs/eval/linear_dino_xcit.yaml)")
    if not isinstance(backbone, VisionTransformer) or getattr(backbone, "cls_token", None) is None:
        raise ValueError(f"{what} asks for the class tokens of the last {n} transformer blocks, but {arch} is not a "
                         f"Vision Transformer with a class token (it has no such blocks): DINO's block features apply "
                         f"to ViTs only; set MODEL.FEATURES.N_LAST_BLOCKS 0 and AVGPOOL_PATCH_TOKENS False to "
                         f"evaluate {arch}'s pooled output")
    if n > len(backbone.blocks):
        raise ValueError(f"{what} asks for the last {n} blocks, but {arch} has {len(backbone.blocks)}: set "
                         f"MODEL.FEATURES.N_LAST_BLOCKS between 1 and {len(backbone.blocks)} (DINO: 4 for ViT-S/16)")
    return backbone.embed_dim * (n + int(mode["avgpool_patch_tokens"]))


def _check_mode(mode: dict, what: str) -> None:
    if mode["avgpool_patch_tokens"] and not mode["n_last_blocks"]:
        raise ValueError(f"{what}: AVGPOOL_PATCH_TOKENS needs N_LAST_BLOCKS >= 1 (the mean patch token is appended "
                         f"to DINO's CLS-token features)")


def build_feature_extractor(backbone: nn.Module, arch: str, mode: Optional[dict] = None,
                            what: str = "MODEL.FEATURES") -> Tuple[nn.Module, int]:
    """``(extractor, D)``: the module whose ``forward(images)`` gives the N x D features an evaluator trains and
    votes on, frozen like ``backbone``. ``mode`` (:func:`feature_mode`; None = :data:`POOLED`): ``n_last_blocks`` 0
    is ``backbone`` itself (its pooled output, D = the registry's feature dim); ``n_last_blocks`` n >= 1 is
    :class:`LastBlocksFeatures` (ViTs only: a clear error for a ResNet, a ConvNet or XCiT). ``what`` names the source
    of ``mode`` in errors."""
    mode = mode or POOLED
    _check_mode(mode, what)
    if not mode["n_last_blocks"]:
        return backbone, get_spec(arch).feature_dim
    dim = _last_blocks_dim(backbone, arch, mode, what)
    return freeze(LastBlocksFeatures(backbone, mode["n_last_blocks"], mode["avgpool_patch_tokens"])), dim


@lru_cache(maxsize=None)
def _feature_dim(arch: str, n_last_blocks: int, avgpool_patch_tokens: bool, what: str) -> int:
    mode = {"n_last_blocks": n_last_blocks, "avgpool_patch_tokens": avgpool_patch_tokens}
    _check_mode(mode, what)
    if not n_last_blocks:
        return get_spec(arch).feature_dim
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no init cost, global RNG untouched
        model = build_backbone(arch)
    return _last_blocks_dim(model, arch, mode, what)


def feature_dim_of(arch: str, mode: Optional[dict] = None, what: str = "MODEL.FEATURES") -> int:
    """D of :func:`build_feature_extractor` for ``arch`` and ``mode`` without building weights (the same errors): to
    check a classifier checkpoint against its backbone before anything is loaded. KeyError for an unknown arch."""
    mode = mode or POOLED
    return _feature_dim(arch, int(mode["n_last_blocks"]), bool(mode["avgpool_patch_tokens"]), what)


# ----------------------------------------------------------------------------------------------------------------
# Data


def eval_transform_from_cfg(cfg: CfgNode):
    """:func:`pretrain.data.eval_transform` with DATA.VAL_RESIZE / IMAGE_SIZE / INTERPOLATION (ImageNet: 256 / 224
    bilinear; CIFAR: 224 / 224 bicubic, i.e. 32 -> 224)."""
    d = cfg.DATA
    return eval_transform(d.IMAGE_SIZE, d.VAL_RESIZE, d.INTERPOLATION, d.MEAN, d.STD)


def train_transform(cfg: CfgNode):
    """RandomResizedCrop + horizontal flip (MoCo's and DINO's lincls), or the evaluation transform without
    augmentation. The crop resamples with DATA.TRAIN_INTERPOLATION ("" = DATA.INTERPOLATION; DINO crops bilinear and
    resizes bicubic for evaluation)."""
    d = cfg.DATA
    if not d.TRAIN_AUGMENT:
        return eval_transform_from_cfg(cfg)
    interpolation = INTERPOLATIONS[d.TRAIN_INTERPOLATION or d.INTERPOLATION]
    return T.Compose([T.RandomResizedCrop(d.IMAGE_SIZE, interpolation=interpolation),
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

