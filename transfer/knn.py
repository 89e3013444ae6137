"""The offline kNN evaluator (``tools/eval_knn.py``): weighted kNN on L2-normalised frozen features, DINO's protocol.
The algorithm and the feature extraction live in :mod:`pretrain.knn` (the pretrainer's online monitor uses them too).
The features are ``MODEL.FEATURES``' (:func:`transfer.common.build_feature_extractor`): the pooled output by default,
which for a ViT is the normed class token of the last block, what DINO's ``eval_knn.py`` uses for ViTs and XCiT.
"""
import json
import os
import time
from typing import Dict

import torch
import torch.nn.functional as F

from pretrain import distributed as du
from pretrain.data import balanced_subset
from pretrain.knn import extract_features, knn_accuracy
from pretrain.precision import amp_dtype

from .common import (TransformedDataset, build_datasets, build_feature_extractor, dataset_name, end_run,
                     eval_transform_from_cfg, feature_mode, load_backbone, start_run)
from .config import setup_eval_cfg
from .semi import SubsetView


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
    cfg = setup_eval_cfg(args.config_file, args.opts)
    if args.eval_only or args.resume:
        raise ValueError("kNN evaluation trains nothing: --eval-only / --resume do not apply")
    try:
        return _knn(cfg)
    finally:
        end_run(cfg)


def _knn(cfg) -> Dict:
    t0 = time.perf_counter()
    device = start_run(cfg, "kNN evaluation")
    rank = du.get_rank()
    backbone, info = load_backbone(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH, cfg.SEED)
    features, dim = build_feature_extractor(backbone.to(device), info["arch"], feature_mode(cfg))
    train, val, subset = build_datasets(cfg, "kNN evaluation")
    if cfg.KNN.MAX_TRAIN_IMAGES:
        train = SubsetView(train, balanced_subset(train.targets, cfg.KNN.MAX_TRAIN_IMAGES, cfg.SEED))
        subset = ", ".join(filter(None, [subset, f"{len(train)} class-balanced"]))
    tf = eval_transform_from_cfg(cfg)
    kw = dict(device=device, batch_size=cfg.TEST.IMS_PER_BATCH, num_workers=cfg.DATA.NUM_WORKERS,
              amp_dtype=amp_dtype(cfg.MODEL.AMP_DTYPE), channels_last=cfg.MODEL.CHANNELS_LAST)
    train_f = F.normalize(extract_features(features, TransformedDataset(train, tf), desc="train features", **kw), dim=1)
    val_f = F.normalize(extract_features(features, TransformedDataset(val, tf), desc="val features", **kw), dim=1)
    results = {}
    if rank == 0:
        acc = knn_accuracy(train_f, torch.as_tensor(train.targets), val_f, torch.as_tensor(val.targets),
                           len(train.classes), cfg.KNN.K, cfg.KNN.TEMPERATURE)
        results = {"eval": "knn", "arch": info["arch"], "weights": info["weights"],
                   "checkpoint_format": info["format"], "features": feature_mode(cfg), "feature_dim": dim,
                   "dataset": dataset_name(cfg), "subset": subset,
                   "num_classes": len(train.classes), "train_images": len(train), "val_images": len(val),
                   "k": cfg.KNN.K, "temperature": cfg.KNN.TEMPERATURE, "top1": round(acc["top1"], 3),
                   "top5": round(acc["top5"], 3), "seconds": round(time.perf_counter() - t0, 3),
                   "output_dir": os.path.abspath(cfg.OUTPUT_DIR)}
        with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(knn_summary_line(results), flush=True)
    du.barrier()
    return results
