"""Semi-supervised linear evaluation data: SimCLR's subset lists and class-balanced subsets.

SimCLR published ``1percent.txt`` / ``10percent.txt``: one ImageNet training file name per line
(``n01440764_10026.JPEG``), no header. The official DisCo reader loads them with ``pd.read_csv`` without
``header=None``, which turns the first file name into a column title and silently drops that image; here every
non-blank line is an image.
"""
import logging
import os
from collections import Counter
from typing import List, Sequence

import torch
from torch.utils.data import Dataset

from pretrain.data import balanced_subset

logger = logging.getLogger(__name__)


def read_subset_list(path: str) -> List[str]:
    """The file names of a SimCLR subset list, in order: every non-blank line, the first one included."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset list {path!r} does not exist (DATA.SUBSET_FILE); SimCLR's 1percent.txt / "
                                f"10percent.txt have one training file name per line")
    with open(path) as f:
        names = [line.strip() for line in f]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"subset list {path} names no image")
    return names


def subset_indices_from_list(samples: Sequence, names: Sequence[str], source: str = "the subset list") -> List[int]:
    """Indices of ``samples`` (``(path, label)`` pairs, as ImageFolder's) whose file basename is in ``names``.

    Names are matched by basename (a list entry may carry a folder). A name that matches no sample, or a
    basename that appears in two class folders, is an error listing them.
    """
    index_of, clashes = {}, []
    for i, (path, _) in enumerate(samples):
        base = os.path.basename(path)
        if base in index_of:
            clashes.append(base)
        index_of[base] = i
    wanted = [os.path.basename(n) for n in names]
    dup = sorted(n for n, c in Counter(wanted).items() if c > 1)
    if dup:
        logger.warning("%s names %d images more than once (counted once): %s", source, len(dup), dup[:5])
    missing = sorted({n for n in wanted if n not in index_of})
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(set(wanted))} images named in {source} are not in the "
                                f"training folder: {missing[:20]}{' ...' if len(missing) > 20 else ''}. Point "
                                f"DATA.TRAIN_DIR at the full training set the list was made for.")
    ambiguous = sorted(set(clashes) & set(wanted))
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} file names of {source} occur in several class folders, so the list "
                         f"cannot tell which is meant: {ambiguous[:10]}")
    return sorted({index_of[n] for n in wanted})


def balanced_subset_indices(targets: Sequence[int], percent: float = 0.0, per_class: int = 0,
                            seed: int = 0) -> List[int]:
    """A deterministic class-balanced subset for datasets without published lists (sorted indices).

    ``per_class``: that many images of each class (all of a smaller class). ``percent``: ``round(percent %)`` of
    each class, at least one. The choice depends only on (targets, seed).
    """
    if per_class and percent:
        raise ValueError("give percent or per_class, not both")
    num_classes = len(set(targets))
    if per_class:
        return balanced_subset(targets, per_class * num_classes, seed)
    if not percent or percent >= 100:
        return list(range(len(targets)))
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for t in sorted(by_class):
        idx = by_class[t]
        n = max(1, round(len(idx) * percent / 100.0))
        chosen.extend(idx[i] for i in torch.randperm(len(idx), generator=g)[:n].tolist())
    return sorted(chosen)


class SubsetView(Dataset):
    """``base`` restricted to ``indices``, keeping the evaluators' interface (``load``, ``targets``, ``classes``)."""

    def __init__(self, base, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.classes = base.classes
        self.targets = [base.targets[i] for i in self.indices]
        self.transform = getattr(base, "transform", None)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.base.load(self.indices[index])

    def __getitem__(self, index: int):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]
