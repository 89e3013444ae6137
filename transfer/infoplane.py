"""The information plane of a classifier's output (DisCo paper, Figure 7): mutual information estimated by binning.

The paper explains the distilling bottleneck with the path that the linear classifier's output T takes in the plane
(I(X;T), I(T;Y)) while it trains on CIFAR-10, estimated as the official DisCo-pytorch ``data/mi_by_binning.py``
does (after Shwartz-Ziv & Tishby 2017), re-derived here:

* T is the softmax of the classifier's logits on N fixed training images; each of its C probabilities is cut into
  ``bins`` equal-width bins of [0, 1] (right-closed, as ``pandas.cut``: (0, 1/B], (1/B, 2/B], ..., with 0 in the
  first bin), so every image gets a discrete pattern t (a C-tuple of bin indices);
* X is the image, every one of the N a distinct value with p(x) = 1/N; T is a deterministic function of X, so
  I(X;T) = H(T) = -sum_t p(t) log2 p(t), with p(t) the fraction of the N images whose pattern is t. It is log2 N when
  every image has its own pattern and 0 when all share one;
* Y is the label: I(T;Y) = sum_{t,y} p(t,y) log2(p(t,y) / (p(t) p(y))) from the empirical joint distribution of
  patterns and labels; at most H(Y) (log2 of the number of classes for balanced classes).

All in bits. Differences from the official script, on purpose: the N images are a fixed class-balanced subset seen
through the evaluation transform every epoch (the official takes the first 1000 images of a freshly shuffled,
augmented loader, so its X changes from one estimate to the next), and a probability of exactly 0 falls into the
first bin (``pandas.cut`` makes it NaN, and NaN patterns never compare equal, so each such image counted as its own
pattern).
"""
import math
from typing import Dict

import torch


def discretize(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index (0 .. bins - 1, int64) of every entry of ``values`` (in [0, 1]) in ``bins`` equal-width right-closed
    bins of [0, 1]: (k / bins, (k + 1) / bins] -> k; 0 -> 0; values outside [0, 1] are clamped."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    idx = torch.ceil(values.double() * bins).long() - 1
    return idx.clamp_(0, bins - 1)


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy (bits) of the empirical distribution given by ``counts``."""
    p = counts.double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log2()).sum()))  # not -0.0 for a single value


def mutual_information(patterns: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``mi_xt`` = I(X;T) and ``mi_ty`` = I(T;Y) in bits of discrete ``patterns`` (N x C integers, or N integers: one
    value of T per sample) and ``labels`` (N integers), every sample a distinct x; also ``h_x`` = log2 N (the largest
    I(X;T)) and ``h_y`` = H(Y) (the largest I(T;Y))."""
    labels = torch.as_tensor(labels).long().view(-1)
    patterns = torch.as_tensor(patterns)
    if patterns.ndim == 1:
        patterns = patterns.view(-1, 1)
    n = patterns.shape[0]
    if n == 0 or labels.numel() != n:
        raise ValueError(f"need N >= 1 patterns and as many labels, got {n} patterns and {labels.numel()} labels")
    _, t = torch.unique(patterns, dim=0, return_inverse=True)  # pattern id of every sample
    _, y = torch.unique(labels, return_inverse=True)
    nt, ny = int(t.max()) + 1, int(y.max()) + 1
    joint = torch.bincount(t * ny + y, minlength=nt * ny).view(nt, ny).double() / n  # p(t, y)
    pt, py = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi_ty = float((joint[nz] * (joint[nz] / (pt * py)[nz]).log2()).sum())
    return {"mi_xt": entropy_bits(torch.bincount(t)), "mi_ty": max(0.0, mi_ty), "h_x": math.log2(n),
            "h_y": entropy_bits(torch.bincount(y))}


def information_plane(logits: torch.Tensor, labels: torch.Tensor, bins: int = 30,
                      softmax: bool = True) -> Dict[str, float]:
    """(I(X;T), I(T;Y)) of a classifier's output by binning (the module doc): ``logits`` N x C (``softmax`` False:
    values already in [0, 1], e.g. probabilities), ``labels`` N. Returns :func:`mutual_information`'s dict."""
    probs = torch.softmax(logits.double(), dim=1) if softmax else logits
    return mutual_information(discretize(probs, bins), labels)


def info_plane_record(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> Dict[str, float]:
    """The metrics.jsonl fields of one estimate: ``mi_xt``, ``mi_ty`` and their upper bounds ``mi_xt_max`` (log2 N)
    and ``mi_ty_max`` (H(Y)), bits, rounded to 6 decimals."""
    mi = information_plane(logits, labels, bins)
    return {"mi_xt": round(mi["mi_xt"], 6), "mi_ty": round(mi["mi_ty"], 6), "mi_xt_max": round(mi["h_x"], 6),
            "mi_ty_max": round(mi["h_y"], 6)}

