"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol, Wu et al. 2018).

Shared by the pretrainer's online monitor and the offline evaluator.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from pretrain.data import ImageFolder, balanced_subset, eval_transform


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None,
                     channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` (yielding ``(images, labels, ...)``); -> (NxD L2-normalised float32 features,
    N labels), both on the CPU."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(images)
        feats.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(torch.as_tensor(batch[1]))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (M x num_classes) of each test feature: the k most similar training features (cosine) vote for
    their class with weight exp(similarity / temperature)."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        sim = test_features[start:start + chunk] @ train_features.t()  # chunk x N
        top_sim, top_idx = sim.topk(k, dim=1)  # chunk x k
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) of :func:`knn_predict`; top-5 is 100 when there are at most 5 classes."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top == test_labels.view(-1, 1)
    return {"top1": 100.0 * correct[:, 0].float().mean().item(),
            "top5": 100.0 * correct.any(dim=1).float().mean().item()}


def build_knn_loaders(train_dir: str, val_dir: str, image_size: int, max_train_images: int = 0,
                      batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> Tuple[DataLoader, DataLoader, int]:
    """(feature-bank loader over a class-balanced subset of ``train_dir``, ``val_dir`` loader, number of classes),
    both with the resize / centre-crop evaluation transform."""
    tf = eval_transform(image_size, mean, std)
    train, val = ImageFolder(train_dir, tf), ImageFolder(val_dir, tf)
    if val.classes != train.classes:
        raise ValueError(f"{val_dir} and {train_dir} have different class folders ({len(val.classes)} vs "
                         f"{len(train.classes)}); kNN needs the same classes in both")
    bank = Subset(train, balanced_subset(train.targets, max_train_images, seed))
    kw = dict(batch_size=batch_size, num_workers=num_workers, shuffle=False)
    return DataLoader(bank, **kw), DataLoader(val, **kw), len(train.classes)


def knn_evaluate(backbone: torch.nn.Module, loaders: Tuple[DataLoader, DataLoader, int], device: torch.device,
                 k: int = 20, temperature: float = 0.07, amp_dtype=None, channels_last: bool = False
                 ) -> Dict[str, float]:
    """kNN top-1 / top-5 (%) of ``backbone``'s pooled features: ``loaders`` from :func:`build_knn_loaders`."""
    bank_loader, val_loader, num_classes = loaders
    train_f, train_l = extract_features(backbone, bank_loader, device, amp_dtype, channels_last)
    val_f, val_l = extract_features(backbone, val_loader, device, amp_dtype, channels_last)
    return knn_accuracy(train_f, train_l, val_f, val_l, num_classes, k, temperature)
