"""Frozen-feature extraction and weighted k-nearest-neighbour classification (DINO's protocol, Wu et al. 2018).

The base of every evaluation: the pretrainer's online kNN monitor, the offline kNN evaluator, the linear / CIFAR
feature cache and t-SNE all extract features with :func:`extract_features`.
Feature extraction and kNN voting show :func:`pretrain.runlog.progress_bar`.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as du
from .data import ImageFolder, balanced_subset, eval_transform
from .runlog import progress_bar

@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, images: torch.Tensor, amp_dtype: Optional[torch.dtype] = None,
                      channels_last: bool = False) -> torch.Tensor:
    """Pooled features (N x D, float32) of ``backbone`` on ``images``, under autocast when ``amp_dtype`` is set."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = backbone(images)
    return out.float()


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                     num_workers: int = 0, amp_dtype=None, channels_last: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """Features (N x D float32, CPU) of every item of ``dataset`` (yielding ``(image, label)``), in dataset order,
    with ``backbone`` in whatever mode it is in (callers freeze it or put it in eval mode). Rank 0 shows a progress
    bar of its share of the images named ``desc`` (:func:`progress_bar`).

    With several processes each extracts an interleaved share and the shares are all-gathered, so every process
    ends with all N rows (a collective call: every process must make it).
    """
    rank, world, n = du.get_rank(), du.get_world_size(), len(dataset)
    mine = list(range(rank, n, world))
    per = math.ceil(n / world)
    padded = mine + mine[:1] * (per - len(mine))  # equal lengths for all_gather; the padding is dropped below
    loader = DataLoader(Subset(dataset, padded), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    parts = []
    with progress_bar(len(padded), desc, unit="img") as bar:
        for x, _ in loader:
            parts.append(backbone_features(backbone, x.to(device, non_blocking=True), amp_dtype, channels_last).cpu())
            bar.update(len(x))
    feats = torch.cat(parts)
    if world == 1:
        return feats
    out = torch.empty(n, feats.shape[1])
    chunk = 8192  # gather in row chunks: bounded device memory for large datasets
    for start in range(0, per, chunk):
        part = du.concat_all_gather(feats[start:start + chunk].to(device)).cpu()  # world*rows x D, rank-major
        rows = part.shape[0] // world
        for r in range(world):
            idx = torch.arange(r + start * world, min(n, r + (start + rows) * world), world)
            out[idx] = part[r * rows:r * rows + len(idx)]
    return out


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (M x num_classes) of each test feature: the k most similar training features (cosine) vote for
    their class with weight exp(similarity / temperature)."""
    k = min(k, train_features.shape[0])
    scores = []
    with progress_bar(test_features.shape[0], "kNN vote", unit="img") as bar:
        for start in range(0, test_features.shape[0], chunk):
            sim = test_features[start:start + chunk] @ train_features.t()  # chunk x N
            top_sim, top_idx = sim.topk(k, dim=1)  # chunk x k
            votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
            votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
            scores.append(votes)
            bar.update(sim.shape[0])
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) of :func:`knn_predict`; top-5 is 100 when there are at most 5 classes."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels.view(-1, 1)
    return {"top1": 100.0 * correct[:, 0].float().mean().item(),
            "top5": 100.0 * correct.any(dim=1).float().mean().item()}


class KnnData:
    """The two splits of a kNN evaluation with the resize / centre-crop transform: a class-balanced feature bank of
    at most ``max_train_images`` of ``train_dir`` and all of ``val_dir`` (ImageFolder roots, same class folders)."""

    def __init__(self, train_dir: str, val_dir: str, image_size: int, max_train_images: int = 0, seed: int = 0,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        tf = eval_transform(image_size, mean=mean, std=std)
        train, self.val = ImageFolder(train_dir, tf), ImageFolder(val_dir, tf)
        if self.val.classes != train.classes:
            raise ValueError(f"{val_dir} and {train_dir} have different class folders ({len(self.val.classes)} vs "
                             f"{len(train.classes)}); kNN needs the same classes in both")
        chosen = balanced_subset(train.targets, max_train_images, seed)
        self.bank = Subset(train, chosen)
        self.bank_labels = torch.as_tensor([train.targets[i] for i in chosen])
        self.val_labels = torch.as_tensor(self.val.targets)
        self.num_classes = len(train.classes)


def knn_evaluate(backbone: torch.nn.Module, data: KnnData, device: torch.device, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256, num_workers: int = 0, amp_dtype=None,
                 channels_last: bool = False) -> Dict[str, float]:
    """kNN top-1 / top-5 (%) of ``backbone``'s pooled features, run in eval mode (its mode is restored after).
    A collective call with several processes (each extracts a share); every process gets the result."""
    was_training = backbone.training
    backbone.eval()
    try:
        kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, amp_dtype=amp_dtype,
                  channels_last=channels_last)
        bank = F.normalize(extract_features(backbone, data.bank, desc="kNN bank features", **kw), dim=1)
        val = F.normalize(extract_features(backbone, data.val, desc="kNN val features", **kw), dim=1)
    finally:
        backbone.train(was_training)
    return knn_accuracy(bank, data.bank_labels, val, data.val_labels, data.num_classes, k, temperature)
