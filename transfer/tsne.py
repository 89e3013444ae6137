"""t-SNE of frozen features (the paper's Figure 8): N classes of the evaluation split embedded in 2-D, one panel per
model, written as a PNG (matplotlib, Agg backend; scikit-learn's ``TSNE`` with a fixed ``random_state``). Every
model's features are ``MODEL.FEATURES``' (:func:`transfer.common.build_feature_extractor`; the pooled output by
default, DINO's ViT block features on request, then for every panel)."""
import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

import time

import numpy as np
import torch
import torch.nn.functional as F

from pretrain import distributed as du
from pretrain.knn import extract_features
from pretrain.precision import amp_dtype

from .common import (TransformedDataset, build_datasets, build_feature_extractor, dataset_name, describe_features,
                     end_run, eval_transform_from_cfg, feature_mode, load_backbone, start_run)
from .config import setup_eval_cfg
from .semi import SubsetView

logger = logging.getLogger("transfer")


def select_tsne_indices(targets: Sequence[int], num_classes: int, per_class: int, seed: int = 0
                        ) -> Tuple[List[int], List[int]]:
    """(sorted sample indices, chosen class ids): ``num_classes`` classes drawn with ``seed`` (all if fewer),
    then ``per_class`` samples of each (all of a smaller class), deterministically."""
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    g = torch.Generator().manual_seed(seed)
    classes = sorted(by_class)
    chosen = sorted(classes[i] for i in torch.randperm(len(classes), generator=g)[:num_classes].tolist())
    idx = []
    for c in chosen:
        members = by_class[c]
        idx.extend(members[i] for i in torch.randperm(len(members), generator=g)[:per_class].tolist())
    return sorted(idx), chosen


def tsne_embed(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """N x D features -> N x 2 t-SNE embedding of their L2-normalised rows (the cosine geometry contrastive features
    are trained in). Perplexity is capped below N / 3 so that small sets work too. scikit-learn's fit reports no
    progress, so a log line says what is being embedded before it starts and how long it took after."""
    from sklearn.manifold import TSNE

    x = F.normalize(features.float(), dim=1).numpy().astype(np.float64)
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}; raise TSNE.PER_CLASS / TSNE.NUM_CLASSES")
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    logger.info("t-SNE of %d points (%d-d features, perplexity %g) started; scikit-learn reports nothing until it "
                "ends", n, x.shape[1], perplexity)
    t = time.perf_counter()
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
               random_state=seed).fit_transform(x)
    logger.info("t-SNE of %d points done in %.1f s", n, time.perf_counter() - t)
    return emb


def plot_tsne(panels: Sequence[Tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str], path: str,
              title: Optional[str] = None) -> str:
    """One scatter panel per ``(title, N x 2 embedding, N labels)``; colours by class, one shared legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels_all = sorted({int(c) for _, _, y in panels for c in np.asarray(y)})
    cmap = plt.get_cmap("tab10" if len(labels_all) <= 10 else "tab20")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(labels_all)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, emb, y) in zip(axes[0], panels):
        y = np.asarray(y)
        for c in labels_all:
            m = y == c
            ax.scatter(emb[m, 0], emb[m, 1], s=6, color=colour[c], label=class_names[c] if c < len(class_names)
                       else str(c))
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, markerscale=2,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(names) - 1) // 5), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def panel_title(info: dict) -> str:
    """``efficientnet_b0 (disco)`` for our exports, ``resnet50 (moco checkpoint)`` otherwise; DINO's ViT block
    features (``info["features"]`` with ``n_last_blocks`` >= 1) add e.g. ``, CLS of the last 4 blocks (normed)``."""
    features = info.get("features") or {}
    extra = f", {describe_features(features)}" if features.get("n_last_blocks") else ""
    return f"{info['arch']} ({info.get('method') or info['format'] + ' checkpoint'}{extra})"


def run(args) -> dict:
    """One process of ``tools/tsne.py``."""
    if args.eval_only or args.resume:
        raise ValueError("t-SNE trains nothing: --eval-only / --resume do not apply")
    return run_tsne(setup_eval_cfg(args.config_file, args.opts))


def run_tsne(cfg) -> dict:
    """MODEL.WEIGHTS and TSNE.COMPARE_WEIGHTS, features of TSNE.NUM_CLASSES x TSNE.PER_CLASS evaluation images,
    one t-SNE panel each -> ``OUTPUT_DIR/tsne.png`` (+ ``tsne.npz`` and ``results.json``). All processes extract
    features together; rank 0 embeds and draws (t-SNE itself is single-process)."""
    try:
        return _tsne(cfg)
    finally:
        end_run(cfg)


def _tsne(cfg) -> dict:
    t0 = time.perf_counter()
    device = start_run(cfg, "t-SNE")
    rank = du.get_rank()
    _, val, _ = build_datasets(cfg, "t-SNE")
    idx, classes = select_tsne_indices(val.targets, cfg.TSNE.NUM_CLASSES, cfg.TSNE.PER_CLASS, cfg.SEED)
    data = TransformedDataset(SubsetView(val, idx), eval_transform_from_cfg(cfg))
    labels = np.asarray([val.targets[i] for i in idx])
    models = [(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH)] + [
        (w, cfg.TSNE.COMPARE_ARCHS[i] if i < len(cfg.TSNE.COMPARE_ARCHS) else "")
        for i, w in enumerate(cfg.TSNE.COMPARE_WEIGHTS)]
    panels, infos, arrays = [], [], {"labels": labels, "indices": np.asarray(idx)}
    mode = feature_mode(cfg)
    for i, (weights, arch) in enumerate(models):
        backbone, info = load_backbone(weights, arch, cfg.SEED)
        info["features"] = mode
        extractor, _ = build_feature_extractor(backbone.to(device), info["arch"], mode,
                                               f"MODEL.FEATURES (for every t-SNE panel; this one: {weights})")
        feats = extract_features(extractor, data, device, cfg.TEST.IMS_PER_BATCH, cfg.DATA.NUM_WORKERS,
                                 amp_dtype(cfg.MODEL.AMP_DTYPE), cfg.MODEL.CHANNELS_LAST,
                                 desc=f"features {i + 1}/{len(models)}")
        if rank != 0:
            continue
        emb = tsne_embed(feats, cfg.SEED, cfg.TSNE.PERPLEXITY)
        panels.append((panel_title(info), emb, labels))
        infos.append({k: info[k] for k in ("arch", "format", "weights", "method", "features")})
        arrays[f"embedding_{i}"] = emb
    if rank != 0:
        du.barrier()
        return {}
    name = dataset_name(cfg)
    png = plot_tsne(panels, val.classes, os.path.join(cfg.OUTPUT_DIR, "tsne.png"),
                    f"t-SNE of frozen features: {len(classes)} classes of {name}, {len(idx)} images")
    np.savez(os.path.join(cfg.OUTPUT_DIR, "tsne.npz"), **arrays)
    results = {"eval": "tsne", "dataset": name, "classes": [val.classes[c] for c in classes], "images": len(idx),
               "models": infos, "png": os.path.abspath(png), "seconds": round(time.perf_counter() - t0, 3)}
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"tsne {' | '.join(p[0] for p in panels)} {name}: {len(classes)} classes x {cfg.TSNE.PER_CLASS} images "
          f"-> {png}", flush=True)
    du.barrier()
    return results
