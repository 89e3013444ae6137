"""Student + momentum encoder + queue (MoCo-v2) and the frozen teacher (DisCo). ``forward`` returns embeddings."""
import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone, feature_dim
from .distributed import broadcast_, concat_all_gather, get_rank, get_world_size
from .heads import build_head


class Encoder(nn.Module):
    """backbone -> projection head -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)  # NxC


def build_encoder(arch: str, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = False) -> Encoder:
    return Encoder(build_backbone(arch), build_head(feature_dim(arch), hidden_dim, out_dim, num_layers, bn))


class MoCoV2(nn.Module):
    """MoCo-v2 (He et al. 2020; Chen et al. 2020): query encoder, momentum key encoder and a queue of keys."""

    def __init__(self, encoder: Encoder, queue_size: int = 65536, momentum: float = 0.999, shuffle_bn: bool = True,
                 bn_splits: int = 1):
        super().__init__()
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        self.encoder_k.requires_grad_(False)
        dim = encoder.head[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # CxK
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries of the queue with ``keys`` (NxC, all processes' keys)."""
        batch = keys.shape[0]
        size = self.queue.shape[1]
        if size % batch:
            raise ValueError(f"MODEL.MOCO.QUEUE_SIZE {size} is not a multiple of the total batch {batch}")
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + batch] = keys.t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch) % size

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Key embeddings (NxC) of the momentum encoder, with shuffle-BN: the key batch is shuffled (across
        processes when there are several, else locally) and forwarded in ``bn_splits`` groups per process, so the
        BatchNorm statistics of a key never come from the same group of images as its query's. Without it the
        model can "cheat" through BN statistics (MoCo, sec. 3.3); on one process use ``bn_splits`` > 1."""
        if not self.shuffle_bn:
            return self.encoder_k(images)
        if get_world_size() > 1:
            images, unshuffle = _shuffle_across_processes(images)
            return _unshuffle_across_processes(self._split_forward(images), unshuffle)
        perm = torch.randperm(images.shape[0], device=images.device)
        return self._split_forward(images[perm])[torch.argsort(perm)]

    def _split_forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.bn_splits <= 1:
            return self.encoder_k(images)
        if images.shape[0] % self.bn_splits:
            raise ValueError(f"the per-process batch {images.shape[0]} is not divisible by MODEL.MOCO.BN_SPLITS "
                             f"{self.bn_splits}")
        return torch.cat([self.encoder_k(chunk) for chunk in images.chunk(self.bn_splits)])


@torch.no_grad()
def _shuffle_across_processes(x: torch.Tensor):
    local = x.shape[0]
    x_all = concat_all_gather(x)
    perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device), src=0)
    unshuffle = torch.argsort(perm)
    mine = perm.view(get_world_size(), -1)[get_rank()]
    assert mine.numel() == local
    return x_all[mine], unshuffle


@torch.no_grad()
def _unshuffle_across_processes(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    x_all = concat_all_gather(x)
    return x_all[unshuffle.view(get_world_size(), -1)[get_rank()]]


class DisCo(nn.Module):
    """A MoCo-v2 student and, for DisCo, a frozen teacher encoder (no gradients, not in the optimizer).

    A step has two parts (see ``pretrain.engine.train_step``):
      ``targets(view1, view2)``, without gradients: momentum update, then a dict of L2-normalised
        k:      momentum encoder on view 2 (E'_m)                            NxC
        queue:  the negatives, as they were before this batch                CxK  (enqueue after the step)
        t, t2:  teacher on view 1 / view 2 (E_t, E'_t), absent without a teacher
      ``forward(images)``: the student query encoder (E_s or E'_s, NxC), the only part with gradients; it is what
        DistributedDataParallel wraps.
    Running the teacher before the student keeps its activations from ever coexisting with the student's graph.
    """

    def __init__(self, student: MoCoV2, teacher: Optional[Encoder] = None, teacher_bn_train: bool = False,
                 teacher_amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.teacher_bn_train = teacher_bn_train
        self.teacher_amp_dtype = teacher_amp_dtype
        if teacher is not None:
            teacher.requires_grad_(False)
            if teacher_amp_dtype is not None and not teacher_bn_train:
                # frozen weights are only ever used in low precision: store them so (half the memory, no per-step
                # autocast casts); with BN_TRAIN the running statistics keep accumulating in float32
                teacher.to(teacher_amp_dtype)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.teacher_bn_train:
            self.teacher.eval()  # frozen: BatchNorm uses (and keeps) its pretrained running statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.encoder_q(images)

    @torch.no_grad()
    def targets(self, view1: torch.Tensor, view2: torch.Tensor, amp_dtype: Optional[torch.dtype] = None
                ) -> Dict[str, torch.Tensor]:
        """Everything the losses compare the student against. ``amp_dtype``: autocast of the key encoder (the
        student's setting); the teacher uses ``teacher_amp_dtype``."""
        device = view1.device.type
        self.student.momentum_update()
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = {"k": self.student.keys(view2).float(), "queue": self.student.queue}
        if self.teacher is not None:
            dtype = self.teacher_amp_dtype
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                if self.teacher.training:  # official behaviour: BN batch statistics per view
                    t, t2 = self.teacher(view1), self.teacher(view2)
                else:  # eval-mode BN is per-sample, so one forward over both views is exactly equivalent
                    t, t2 = self.teacher(torch.cat([view1, view2])).chunk(2)
            out["t"], out["t2"] = t.float(), t2.float()
        return out
