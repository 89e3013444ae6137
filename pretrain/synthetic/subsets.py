"""SimCLR-style semi-supervised subset lists (``1percent.txt`` / ``10percent.txt``) of an ImageFolder's train split."""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from .writer import DatasetMismatchError


# --------------------------------------------------------------------------------------------------------
# SimCLR-style semi-supervised subset lists (1percent.txt / 10percent.txt)
# --------------------------------------------------------------------------------------------------------

# The extensions torchvision's ImageFolder accepts: a list must name only images that loader would see.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def write_subset_list(imagefolder_root: Union[str, os.PathLike], out_file: Union[str, os.PathLike],
                      percent: Optional[float] = None, per_class: Optional[int] = None,
                      seed: int = 0) -> List[str]:
    """Write a class-balanced subset of ``imagefolder_root/train`` in SimCLR's ``1percent.txt`` format: one image
    file name per line (basename, no directory, no header), ``\\n`` line ends, a trailing newline.

    Exactly one of ``percent`` (of each class's images, rounded, in (0, 100]) or ``per_class`` (images per class)
    is given; every class gets at least one image. The choice is a seeded sample per class (classes in sorted
    folder order, seed stream ``[seed, class position]``), listed class by class in file-name order.
    Written atomically: an existing identical file is reused, a different one is refused with
    :class:`DatasetMismatchError`. Returns the listed names.
    """
    if (percent is None) == (per_class is None):
        raise ValueError("give exactly one of percent (e.g. 1 or 10) or per_class")
    if percent is not None and not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if per_class is not None and (not isinstance(per_class, (int, np.integer)) or per_class < 1):
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    train = Path(imagefolder_root) / "train"
    classes = sorted(d for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{train} has no class folders: imagefolder_root must be an ImageFolder root "
                                f"holding train/<class>/<images> (e.g. one written by write_imagefolder)")
    names: List[str] = []
    for pos, d in enumerate(classes):
        files = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{d} holds no images; ImageFolder would refuse it too")
        if percent is not None:
            k = max(1, int(round(len(files) * percent / 100)))
        else:
            if per_class > len(files):
                raise ValueError(f"per_class={per_class} but {d} holds only {len(files)} images")
            k = per_class
        pick = np.random.default_rng(np.random.SeedSequence([seed, pos])).choice(len(files), k, replace=False)
        names.extend(files[i] for i in sorted(pick))
    dupes = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"file names repeat across classes ({dupes[:3]}...): a list of basenames could not tell "
                         f"them apart. Give every image a unique name (e.g. class-prefixed).")
    content = "".join(n + "\n" for n in names).encode()

    out = Path(out_file)
    if out.exists():
        if out.is_file() and out.read_bytes() == content:
            return names
        raise DatasetMismatchError(f"{out} exists and differs from the requested subset list; refusing to "
                                   f"overwrite it. Choose another file name or delete it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, out)  # unlike rename, fails if another writer got there first
        except FileExistsError:
            if out.read_bytes() != content:
                raise DatasetMismatchError(f"{out} was written concurrently with different content") from None
    finally:
        os.unlink(tmp)
    return names
