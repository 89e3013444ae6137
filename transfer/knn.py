"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol, Wu et al. 2018).

Shared by the pretrainer's online monitor and the offline evaluator.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F


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
