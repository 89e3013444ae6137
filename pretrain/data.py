"""Datasets, MoCo-v2 views and a resumable sampler.

Augmentations are a pure function of (seed, epoch, image index): every sample's transforms run under a torch RNG
seeded from those three numbers. A resumed run therefore sees exactly the views an uninterrupted run would, whatever
the number of workers or processes.
"""
import itertools
import logging
import os
from typing import Callable, List, Sequence, Tuple

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

logger = logging.getLogger(__name__)


class CorruptImageError(RuntimeError):
    pass


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (ImageNet's layout) with unreadable images reported by path.

    ``self[i]`` returns ``(PIL RGB image, class index)`` or raises :class:`CorruptImageError` naming the file.
    """

    def __init__(self, root: str, transform: Callable = None):
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotADirectoryError(f"dataset folder {root!r} is a file, not a folder; point DATA.TRAIN_DIR / "
                                     f"DATA.VAL_DIR at an ImageFolder root (<root>/<class>/<image>, e.g. "
                                     f"imagenet/train)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder {root!r} does not exist; point DATA.TRAIN_DIR / DATA.VAL_DIR at an "
                                    f"ImageFolder root (e.g. imagenet/train) or generate one with tools/make_data.py")
        self.root = root
        self.classes, self.class_to_idx = find_classes(root)
        self.samples: List[Tuple[str, int]] = make_dataset(root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated / non-image / broken files
            raise CorruptImageError(f"cannot read image {path}: {e}. Replace or delete the file.") from e

    def __getitem__(self, index: int):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]


class RandomGaussianBlur:
    """PIL Gaussian blur with sigma ~ U(sigma_range), as MoCo-v2's; several times faster than torchvision's tensor
    blur on PIL input. Draws from the torch RNG so that the per-sample seeding covers it."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def moco_v2_transform(size: int, scale=(0.2, 1.0), blur_sigma=(0.1, 2.0), mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p: float = 0.2
                      ) -> Callable:
    """MoCo-v2's augmentation (REFERENCE.md): RandomResizedCrop, colour jitter p=0.8, grayscale p=0.2,
    Gaussian blur p=0.5, horizontal flip."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(scale)),
        T.RandomApply([T.ColorJitter(*color_jitter)], p=0.8),
        T.RandomGrayscale(p=grayscale_p),
        T.RandomApply([RandomGaussianBlur(blur_sigma)], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class RandomSolarize:
    """PIL solarisation (invert every pixel value >= 128) with probability ``p``; draws from the torch RNG, so the
    per-sample seeding covers it (DINO's second global crop: p = 0.2)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if torch.rand(()).item() < self.p else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


# Multi-crop recipes (DATA.AUGMENTATION): the views are NUM[0] crops of SIZES[0] (the "global" / assignment crops),
# then NUM[1] of SIZES[1], ...; each view has its own transform.
MULTI_CROP_RECIPES = ("swav", "dino")


def multi_crop_transforms(recipe: str, nums: Sequence[int], sizes: Sequence[int], min_scales: Sequence[float],
                          max_scales: Sequence[float], blur_sigma=(0.1, 2.0), mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), color_jitter=(0.8, 0.8, 0.8, 0.2), grayscale_p: float = 0.2
                          ) -> List[Callable]:
    """One transform per view, ``sum(nums)`` in all, crops of ``sizes[i]`` at area ``(min_scales[i],
    max_scales[i])`` for the ``nums[i]`` views of group i.

    * ``swav`` (SwAV's ``MultiCropDataset``): RandomResizedCrop (bilinear), horizontal flip, colour jitter p=0.8,
      grayscale, Gaussian blur p=0.5, for every view.
    * ``dino`` (DINO's ``DataAugmentationDINO``): RandomResizedCrop (bicubic), flip, colour jitter p=0.8, grayscale,
      then a Gaussian blur with p=1.0 on the first view, p=0.1 plus solarisation p=0.2 on the second, p=0.5 on every
      other view (the local crops).

    Colour jitter strengths, grayscale probability and the blur's sigma range come from the DATA keys (SwAV:
    jitter 0.8, 0.8, 0.8, 0.2; DINO: 0.4, 0.4, 0.2, 0.1)."""
    if recipe not in MULTI_CROP_RECIPES:
        raise ValueError(f"unknown multi-crop recipe {recipe!r}; known: {', '.join(MULTI_CROP_RECIPES)}")
    if not (len(nums) == len(sizes) == len(min_scales) == len(max_scales)) or not nums:
        raise ValueError(f"DATA.MULTI_CROP: NUM {tuple(nums)}, SIZES {tuple(sizes)}, MIN_SCALE {tuple(min_scales)} "
                         f"and MAX_SCALE {tuple(max_scales)} must have one value per crop size")
    interpolation = T.InterpolationMode.BICUBIC if recipe == "dino" else T.InterpolationMode.BILINEAR
    transforms, view = [], 0
    for num, size, lo, hi in zip(nums, sizes, min_scales, max_scales):
        for _ in range(num):
            blur_p = 0.5 if recipe == "swav" or view >= 2 else (1.0, 0.1)[view]
            ops = [T.RandomResizedCrop(size, scale=(lo, hi), interpolation=interpolation),
                   T.RandomHorizontalFlip(),
                   T.RandomApply([T.ColorJitter(*color_jitter)], p=0.8),
                   T.RandomGrayscale(p=grayscale_p),
                   T.RandomApply([RandomGaussianBlur(blur_sigma)], p=blur_p)]
            if recipe == "dino" and view == 1:
                ops.append(RandomSolarize(0.2))
            transforms.append(T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)]))
            view += 1
    return transforms


def view_sizes(cfg) -> List[int]:
    """The crop size of every view of the pretraining data of ``cfg``: two of DATA.IMAGE_SIZE for the MoCo-v2
    augmentation, else DATA.MULTI_CROP's (e.g. [224, 224, 96, 96, 96, 96, 96, 96] for SwAV's 2 x 224 + 6 x 96)."""
    d = cfg.DATA
    if d.AUGMENTATION == "mocov2":
        return [d.IMAGE_SIZE] * 2
    return [size for num, size in zip(d.MULTI_CROP.NUM, d.MULTI_CROP.SIZES) for _ in range(num)]


def view_groups(cfg) -> List[Tuple[int, ...]]:
    """The student's forward groups of ``cfg``'s views (:class:`pretrain.model.Method`): each MoCo-v2 view alone
    (one view's graph alive at a time); all multi-crop views in one forward, as SwAV and DINO run them (the backbone
    per crop size, the head over all crops)."""
    if cfg.DATA.AUGMENTATION == "mocov2":
        return [(0,), (1,)]
    return [tuple(range(len(view_sizes(cfg))))]


def eval_transform(size: int, resize: int = 0, interpolation: str = "bicubic", mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225)) -> Callable:
    """The evaluation transform of every protocol: resize the shorter side to ``resize`` (default size / 0.875, i.e.
    256 for 224), centre-crop ``size``, normalise. Linear evaluation uses 256 / 224 bilinear (MoCo's lincls), CIFAR
    224 / 224 bicubic (32 -> 224), the kNN monitor the default."""
    return T.Compose([T.Resize(resize or int(round(size / 0.875)), interpolation=INTERPOLATIONS[interpolation]),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (((seed * 1_000_003) ^ epoch) * 2_654_435_761 + index) % (2 ** 63)


class MultiViewDataset(Dataset):
    """Independently augmented views of one image (two MoCo-v2 views, or one per multi-crop transform), indexed by
    ``(epoch, index)``.

    Returns ``((view1, view2), label, skipped)``. An unreadable image raises :class:`CorruptImageError` (naming the
    file and ``DATA.SKIP_CORRUPT``), or with ``skip_corrupt`` is replaced by the next readable image (a deterministic
    substitute keeps batches full). ``skipped`` is 1 when this sample's own file is unreadable and ``epoch`` is the
    first epoch that draws it, else 0: summed over a run (any number of workers and processes, resumed or not) it
    counts each unreadable file drawn so far once. ``sampler`` (the run's :class:`ResumableSampler`) tells which
    epoch first draws an image when the incomplete last batch is dropped; without it, epoch 0 is taken to draw all.
    """

    def __init__(self, base: ImageFolder, transform, seed: int, num_views: int = 2,
                 skip_corrupt: bool = False, sampler: "ResumableSampler" = None):
        # one transform for every view, or a list of one per view (multi-crop: num_views is its length)
        self.transforms = list(transform) if isinstance(transform, (list, tuple)) else [transform] * num_views
        self.base, self.seed = base, seed
        self.num_views, self.skip_corrupt, self.sampler = len(self.transforms), skip_corrupt, sampler

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        drawn, passed = index, 0
        while True:
            try:
                img = self.base.load(index)
                break
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise CorruptImageError(f"{e} Or set DATA.SKIP_CORRUPT True to skip unreadable images (counted "
                                            f"in metrics.jsonl as skipped_images).") from e
                passed += 1
                logger.warning("skipping %s", e)
                if passed >= len(self.base):
                    raise CorruptImageError(f"no readable image in {self.base.root}") from e
                index = (index + 1) % len(self.base)  # deterministic substitute keeps batches full
        skipped = int(passed > 0 and epoch == (self.sampler.first_epoch(drawn) if self.sampler is not None else 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            views = tuple(t(img) for t in self.transforms)
        return views, self.base.targets[index], skipped


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` for this process's share of one epoch, from iteration ``start_iter`` on.

    The epoch's permutation depends only on (seed, epoch); it is cut into global batches of ``total_batch`` (the
    incomplete tail is dropped), and process ``rank`` takes its contiguous slice of each. The global batches are
    therefore the same for any number of processes, and a resumed run continues at the exact sample.
    """

    def __init__(self, dataset_len: int, total_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if total_batch % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {total_batch} is not divisible by the {world_size} processes")
        self.iters_per_epoch = dataset_len // total_batch
        if self.iters_per_epoch == 0:
            raise ValueError(f"the dataset has {dataset_len} images, fewer than one batch of {total_batch}; lower "
                             f"SOLVER.IMS_PER_BATCH or add data")
        self.n, self.total_batch, self.local_batch = dataset_len, total_batch, total_batch // world_size
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.epoch, self.start_iter = 0, 0
        self._tails = {}  # epoch -> the indices it drops (first_epoch's cache)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        self.epoch, self.start_iter = epoch, start_iter

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def first_epoch(self, index: int) -> int:
        """The first epoch whose batches (all processes') contain ``index``, i.e. it is not in the dropped tail; -1
        when none does (``shuffle`` False and ``index`` in the tail). Only called for unreadable images."""
        keep = self.iters_per_epoch * self.total_batch
        if not self.shuffle:
            return 0 if index < keep else -1
        for epoch in itertools.count():
            if epoch not in self._tails:
                self._tails[epoch] = set(self._order(epoch)[keep:].tolist())
            if index not in self._tails[epoch]:
                return epoch

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_iter) * self.local_batch

    def __iter__(self):
        order = self._order(self.epoch)
        batches = order[:self.iters_per_epoch * self.total_batch].view(self.iters_per_epoch, self.total_batch)
        mine = batches[self.start_iter:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        for index in mine.reshape(-1).tolist():
            yield self.epoch, index


def balanced_subset(targets: Sequence[int], max_items: int, seed: int = 0) -> List[int]:
    """At most ``max_items`` indices, the same number per class where possible, chosen deterministically."""
    if max_items <= 0 or max_items >= len(targets):
        return list(range(len(targets)))
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    g = torch.Generator().manual_seed(seed)
    per_class = max(1, max_items // len(by_class))
    chosen = []
    for t in sorted(by_class):
        idx = by_class[t]
        perm = torch.randperm(len(idx), generator=g)[:per_class].tolist()
        chosen.extend(idx[i] for i in perm)
    return sorted(chosen)


def balanced_sample(targets, max_images: int, seed: int = 0) -> List[int]:
    """At most ``max_images`` (0 = all) indices of a split with ``targets``, class-balanced and deterministic
    (:func:`balanced_subset`), and a seeded choice among them when there are more classes than
    ``max_images`` (balanced_subset keeps one per class then)."""
    chosen = balanced_subset(targets, max_images, seed)
    if len(chosen) > max_images > 0:
        keep = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:max_images]
        chosen = sorted(chosen[i] for i in keep.tolist())
    return chosen
