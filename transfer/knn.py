"""Weighted k-nearest-neighbour classification on L2-normalised features (DINO's protocol, Wu et al. 2018).

Shared by the pretrainer's online monitor and the offline evaluator.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from pretrain.data import ImageFolder, balanced_subset, eval_transform


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
def extract_features(model: torch.nn.Module, loader, device: torch.device, amp_dtype=None,
                     channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``loader`` (yielding ``(images, labels, ...)``); -> (NxD L2-normalised float32 features,
    N labels), both on the CPU."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in loader:
        out = backbone_features(model, batch[0].to(device, non_blocking=True), amp_dtype, channels_last)
        feats.append(F.normalize(out, dim=1).cpu())
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


# ----------------------------------------------------------------------------------------------------------------
# The offline evaluator (tools/eval_knn.py)


def knn_summary_line(r: dict) -> str:
    """e.g. ``knn resnet18 imagenet: top-1 48.20 top-5 71.00 (k=20, T=0.07, 1281167 train images)``."""
    data = f"{r['dataset']} ({r['subset']})" if r["subset"] else r["dataset"]
    return (f"knn {r['arch']} {data}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} (k={r['k']}, "
            f"T={r['temperature']:g}, {r['train_images']} train images)")


def run(args) -> Dict:
    """One process of ``tools/eval_knn.py``: features of the (subset of the) training split and of the evaluation
    split with the evaluation transform (extracted by all processes together), weighted kNN on rank 0, then
    ``OUTPUT_DIR/results.json`` and one summary line."""
    import json
    import os
    import time

    from pretrain import distributed as du

    from .config import setup_cfg
    from .linear import (TransformedDataset, amp_dtype_of, build_datasets, dataset_name, eval_transform,
                         extract_features, load_backbone, start_run)
    from .semi import SubsetView

    cfg = setup_cfg(args.config_file, args.opts)
    if args.eval_only or args.resume:
        raise ValueError("kNN evaluation trains nothing: --eval-only / --resume do not apply")
    t0 = time.perf_counter()
    device = start_run(cfg)
    rank = du.get_rank()
    backbone, info = load_backbone(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH, cfg.SEED)
    backbone.to(device)
    train, val, subset = build_datasets(cfg)
    if cfg.KNN.MAX_TRAIN_IMAGES:
        train = SubsetView(train, balanced_subset(train.targets, cfg.KNN.MAX_TRAIN_IMAGES, cfg.SEED))
        subset = ", ".join(filter(None, [subset, f"{len(train)} class-balanced"]))
    tf = eval_transform(cfg)
    kw = dict(device=device, batch_size=cfg.TEST.IMS_PER_BATCH, num_workers=cfg.DATA.NUM_WORKERS,
              amp_dtype=amp_dtype_of(cfg.MODEL.AMP_DTYPE), channels_last=cfg.MODEL.CHANNELS_LAST)
    train_f = F.normalize(extract_features(backbone, TransformedDataset(train, tf), **kw), dim=1)
    val_f = F.normalize(extract_features(backbone, TransformedDataset(val, tf), **kw), dim=1)
    results = {}
    if rank == 0:
        acc = knn_accuracy(train_f, torch.as_tensor(train.targets), val_f, torch.as_tensor(val.targets),
                           len(train.classes), cfg.KNN.K, cfg.KNN.TEMPERATURE)
        results = {"eval": "knn", "arch": info["arch"], "weights": info["weights"],
                   "checkpoint_format": info["format"], "dataset": dataset_name(cfg), "subset": subset,
                   "num_classes": len(train.classes), "train_images": len(train), "val_images": len(val),
                   "k": cfg.KNN.K, "temperature": cfg.KNN.TEMPERATURE, "top1": round(acc["top1"], 3),
                   "top5": round(acc["top5"], 3), "seconds": round(time.perf_counter() - t0, 3),
                   "output_dir": os.path.abspath(cfg.OUTPUT_DIR)}
        with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(knn_summary_line(results), flush=True)
    du.barrier()
    return results
