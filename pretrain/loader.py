"""The pretraining loader of a config: DATA.BACKEND's data path over the run's :class:`ResumableSampler`.

Its own module because it picks between :mod:`pretrain.data` (torchvision) and :mod:`pretrain.data_dali` (which
builds on :mod:`pretrain.data`).
"""
import torch
from torch.utils.data import DataLoader

from .data import ImageFolder, MultiViewDataset, ResumableSampler, moco_v2_transform, multi_crop_transforms


def build_train_loader(cfg, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu")):
    """The pretraining loader of ``cfg`` for process ``rank`` of ``world`` training on ``device``: returns
    ``(loader, sampler, num_images)``. Iterating the loader after ``sampler.set_epoch(epoch, start_iter)`` yields
    that epoch's remaining batches ``(views, labels, skipped)``; the backend is DATA.BACKEND:

    * ``torchvision``: a DataLoader over :class:`pretrain.data.MultiViewDataset` (PIL decoding and
      ``moco_v2_transform``, or the multi-crop transforms of DATA.AUGMENTATION swav / dino, in DATA.NUM_WORKERS
      worker processes);
    * ``dali``: :class:`pretrain.data_dali.DaliTwoViewLoader` (NVIDIA DALI, on the GPU when ``device`` is one), the
      same samples and augmentation parameters, DATA.NUM_WORKERS (at least one) DALI threads.
    """
    d = cfg.DATA
    if d.BACKEND == "dali":
        from .data_dali import require_dali
        require_dali()  # before the dataset scan: a missing optional dependency is a config error
    base = ImageFolder(d.TRAIN_DIR)
    sampler = ResumableSampler(len(base), cfg.SOLVER.IMS_PER_BATCH, rank, world, cfg.SEED)
    if d.BACKEND == "dali":
        from .data_dali import DaliTwoViewLoader
        loader = DaliTwoViewLoader(base, sampler, d, cfg.SEED, device=device, num_threads=d.NUM_WORKERS,
                                   skip_corrupt=d.SKIP_CORRUPT)
        return loader, sampler, len(base)
    if d.AUGMENTATION == "mocov2":
        transform = moco_v2_transform(d.IMAGE_SIZE, d.CROP_SCALE, d.BLUR_SIGMA, d.MEAN, d.STD, d.COLOR_JITTER,
                                      d.GRAYSCALE_P)
    else:  # one transform per view; the DataLoader collates each view into its own batch tensor
        m = d.MULTI_CROP
        transform = multi_crop_transforms(d.AUGMENTATION, m.NUM, m.SIZES, m.MIN_SCALE, m.MAX_SCALE, d.BLUR_SIGMA,
                                          d.MEAN, d.STD, d.COLOR_JITTER, d.GRAYSCALE_P)
    dataset = MultiViewDataset(base, transform, cfg.SEED, skip_corrupt=d.SKIP_CORRUPT, sampler=sampler)
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, drop_last=True,
                        num_workers=d.NUM_WORKERS, pin_memory=device.type == "cuda",
                        persistent_workers=d.NUM_WORKERS > 0,
                        # its own generator: creating an iterator must not draw from the global RNG, whose
                        # state the checkpoint restores (augmentations are seeded per sample anyway)
                        generator=torch.Generator().manual_seed(cfg.SEED))
    return loader, sampler, len(base)
