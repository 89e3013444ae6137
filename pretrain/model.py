"""The :class:`Method` that trains a student: student encoder + testbed + distillers + the frozen teacher.

``Method.forward`` returns the student's outputs for one view (what DistributedDataParallel wraps); everything else
a step needs comes from its parts (see :mod:`pretrain.methods` and :func:`pretrain.engine.train_step`).
"""
import logging
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .checkpoint import load_strict
from .encoder import Encoder, build_student_encoder
from .data import view_groups
from .methods import DISTILLERS, TESTBEDS, Distiller, Progress, Testbed
from .precision import amp_dtype, resolve_cfg
from .safeload import load_torch
from .teacher import copy_teacher_queue, load_teacher

logger = logging.getLogger(__name__)


class Method(nn.Module):
    """The student, its testbed, its distillers and the frozen teacher they share (none without distillers).

    The teacher never receives gradients and is not optimised; its BatchNorm runs in eval mode (pretrained running
    statistics) unless ``teacher_bn_train`` (the official code: batch statistics). With ``teacher_amp_dtype`` it
    runs under autocast, its weights stored in that dtype (unless BN_TRAIN, whose running statistics keep
    accumulating in float32).
    """

    def __init__(self, student: Encoder, testbed: Testbed, distillers: Dict[str, Distiller],
                 teacher: Optional[Encoder] = None, teacher_bn_train: bool = False,
                 teacher_amp_dtype: Optional[torch.dtype] = None,
                 view_groups: Optional[Sequence[Sequence[int]]] = None):
        super().__init__()
        if distillers and teacher is None:
            raise ValueError(f"distillers {sorted(distillers)} need a teacher")
        self.student = student
        self.testbed = testbed
        self.distillers = nn.ModuleDict(distillers)
        self.teacher = teacher
        self.teacher_bn_train = teacher_bn_train
        self.teacher_amp_dtype = teacher_amp_dtype
        parts = self.parts()
        self.student_views = tuple(sorted({v for p in parts for v in p.student_views}))
        self.student_maps = any(p.student_maps for p in parts)
        self.teacher_views = tuple(sorted({v for d in self.distillers.values() for v in d.teacher_views}))
        self.teacher_maps = any(d.teacher_maps for d in self.distillers.values())
        if not self.student_views:
            raise ValueError(f"no part of the method ({', '.join(p.name for p in parts)}) trains the student")
        # the student's forward groups: views forwarded (and back-propagated) together as one batch; by default each
        # view alone (one view's graph alive at a time), multi-crop: all views at once (SwAV, DINO)
        groups = [tuple(g) for g in view_groups] if view_groups else [(v,) for v in self.student_views]
        self.student_groups = [g for g in groups if any(v in self.student_views for v in g)]
        missing = set(self.student_views) - {v for g in self.student_groups for v in g}
        if missing:
            raise ValueError(f"student views {sorted(missing)} are in no forward group {groups}")
        self.student_head = any(p.student_head for p in parts if p.student_views)
        if not self.student_head:  # no loss reads it: frozen, so the optimizer skips it and DDP expects no gradient
            student.head.requires_grad_(False)
            logger.info("no part of the method reads the student's projection head: it is frozen (not trained)")
        if teacher is not None:
            teacher.requires_grad_(False)
            if teacher_amp_dtype is not None and not teacher_bn_train:
                teacher.to(teacher_amp_dtype)  # frozen weights used only in low precision: half the memory
        self.train()

    def set_progress(self, iteration: int, iters_per_epoch: int, max_iter: int) -> None:
        """Tell every part where the run is (:class:`pretrain.methods.Progress`) before the step ``iteration``."""
        progress = Progress(iteration, iters_per_epoch, max_iter)
        for part in self.parts():
            part.progress = progress

    def parts(self) -> List[nn.Module]:
        """The testbed, then the distillers in config order."""
        return [self.testbed, *self.distillers.values()]

    @property
    def description(self) -> str:
        """e.g. ``mocov2 + disco``."""
        return " + ".join(p.name for p in self.parts() if p.name != "none") or "none"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.teacher_bn_train:
            self.teacher.eval()  # frozen: BatchNorm uses (and keeps) its pretrained running statistics
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer trains: the student, then any parameters of the parts (the teacher and momentum
        encoders never)."""
        yield from (p for p in self.student.parameters() if p.requires_grad)
        for part in self.parts():
            yield from part.trainable_parameters()

    def named_trainable_parameters(self) -> Iterator[tuple]:
        """``(name, parameter)`` of :meth:`trainable_parameters`, in its order."""
        names = {id(p): n for n, p in self.named_parameters()}
        for p in self.trainable_parameters():
            yield names[id(p)], p

    def exported(self) -> Encoder:
        """The encoder exported at the end and evaluated by the kNN monitor."""
        return self.testbed.exported(self.student)

    def compile_encoders(self) -> List[str]:
        """TRAIN.COMPILE: compile every encoder a step runs, in place (``nn.Module.compile``: no wrapper, so the
        state-dict keys, checkpoints, exports and resumes are those of an uncompiled run): the student, the frozen
        teacher and any encoder of the parts (MoCo-v2's and CompRess's momentum key encoders). An encoder's whole
        ``embed`` (backbone, feature maps, head, normalisation) goes through its ``__call__``, so it is what compiles,
        once per input shape, train / eval mode and autocast state (``dynamic=False``); the losses, momentum updates
        and queues stay eager. The kNN monitor calls the student's backbone directly: eager. Returns the names of
        the modules compiled (e.g. ``["student", "teacher", "testbed.encoder_k"]``)."""
        names = []
        for name, module in self.named_modules():
            if isinstance(module, Encoder):
                module.compile(dynamic=False)
                names.append(name)
        return names

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, images, maps: bool = False) -> Dict[str, object]:
        """The student on one forward group (gradients flow): ``embedding`` (E_s, NxC), ``features``, [``maps``].
        ``images``: one batch, or a list of batches of several sizes (multi-crop: :meth:`Encoder.forward`)."""
        return self.student.embed(images, maps)

    @torch.no_grad()
    def targets(self, views: Sequence[torch.Tensor], amp_dtype: Optional[torch.dtype] = None) -> dict:
        """Everything computed without gradients before the student's forward: the testbed's targets (under the
        student's autocast ``amp_dtype``: its key encoder is a student copy), then the teacher's outputs on the
        views the distillers read (once for all of them, before any student graph exists), then each distiller's
        targets."""
        device = views[0].device.type
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            testbed = self.testbed.targets(self.student, views, None)
        teacher = self.teacher_outputs(views) if self.teacher is not None else None
        return {"testbed": testbed,
                "distillers": {name: d.targets(self.student, views, teacher) for name, d in self.distillers.items()}}

    @torch.no_grad()
    def teacher_outputs(self, views: Sequence[torch.Tensor]) -> List[Optional[dict]]:
        """Per view, the teacher's ``embedding`` / ``features`` (/ ``maps``) in float32; None for views no distiller
        reads."""
        need = self.teacher_views
        dtype = self.teacher_amp_dtype
        with torch.autocast(views[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if self.teacher.training or len(need) == 1:  # BN_TRAIN (official): batch statistics of each view
                outs = {v: self.teacher.embed(views[v], self.teacher_maps) for v in need}
            else:  # eval-mode BN is per-sample: one forward over all views of a size is exactly equivalent, and faster
                outs = {}
                for group in size_runs(views, need):
                    joint = self.teacher.embed(torch.cat([views[v] for v in group]), self.teacher_maps)
                    outs.update({v: _chunk(joint, len(group), i) for i, v in enumerate(group)})
        return [_to_float(outs[v]) if v in outs else None for v in range(len(views))]

    def losses(self, view: int, out: Dict[str, object], targets: dict) -> Dict[str, torch.Tensor]:
        """The weighted terms of student view ``view`` from every part, and ``loss``, their sum."""
        terms = {}
        if view in self.testbed.student_views:
            terms.update(_named(self.testbed, self.testbed.losses(view, out, targets["testbed"]), terms))
        for name, d in self.distillers.items():
            if view in d.student_views:
                terms.update(_named(d, d.losses(view, out, targets["distillers"][name]), terms))
        total = None
        for value in terms.values():
            total = value if total is None else total + value
        if total is None:
            raise RuntimeError(f"no loss term for student view {view}")
        return {"loss": total, **terms}

    def group_losses(self, group: Sequence[int], outs: Sequence[Dict[str, object]], targets: dict
                     ) -> Dict[str, torch.Tensor]:
        """The terms of one forward group (``outs``: the student's outputs of each view of ``group``): every part
        first observes the group (:meth:`MethodPart.observe`), then :meth:`losses` of each view, summed per term."""
        for part, part_targets in self._part_targets(targets):
            part.observe(tuple(group), list(outs), part_targets)
        total: Dict[str, torch.Tensor] = {}
        for v, out in zip(group, outs):
            if v not in self.student_views:
                continue
            for k, value in self.losses(v, out, targets).items():
                total[k] = total[k] + value if k in total else value
        return total

    def adjust_gradients(self) -> None:
        for part in self.parts():
            part.adjust_gradients()

    def _part_targets(self, targets: dict):
        yield self.testbed, targets["testbed"]
        for name, d in self.distillers.items():
            yield d, targets["distillers"][name]

    @torch.no_grad()
    def after_step(self, targets: dict) -> None:
        for part, part_targets in self._part_targets(targets):
            part.after_step(self.student, part_targets)


def _named(part, terms: Dict[str, torch.Tensor], seen: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for key in terms:
        if not key.startswith("loss_") or key in seen:
            raise ValueError(f"{type(part).__name__}.losses returned {key!r}: terms are named loss_<something>, "
                             f"unique across the method's parts")
    return terms


def size_runs(views: Sequence[torch.Tensor], indices: Sequence[int]) -> List[List[int]]:
    """``indices`` cut into runs of consecutive views of one image size (order kept): the views one joint forward
    can take as a single batch (the student's multi-crop input, the teacher's eval-mode forward)."""
    runs: List[List[int]] = []
    for v in indices:
        if runs and views[v].shape[1:] == views[runs[-1][-1]].shape[1:]:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


def size_batches(views: Sequence[torch.Tensor], indices: Sequence[int]) -> List[torch.Tensor]:
    """The views ``indices`` as the student's input of one forward group: each run of :func:`size_runs` as one
    batch (one tensor per crop size: :meth:`pretrain.encoder.Encoder.forward` takes the list)."""
    return [views[r[0]] if len(r) == 1 else torch.cat([views[v] for v in r]) for r in size_runs(views, indices)]


def split_views(out: Dict[str, object], n: int) -> List[Dict[str, object]]:
    """The output of a forward over ``n`` views concatenated along the batch, as ``n`` per-view outputs."""
    return [out] if n == 1 else [_chunk(out, n, i) for i in range(n)]


def _chunk(out: Dict[str, object], n: int, i: int) -> Dict[str, object]:
    """Part ``i`` of ``n`` equal batch chunks of every tensor (and list of tensors) in ``out``."""
    return {k: [m.chunk(n)[i] for m in v] if isinstance(v, list) else v.chunk(n)[i] for k, v in out.items()}


def _to_float(out: Dict[str, object]) -> Dict[str, object]:
    return {k: [m.float() for m in v] if isinstance(v, list) else v.float() for k, v in out.items()}


def build_method(cfg, device="cpu") -> Method:
    """The method of ``cfg``: the student (MODEL.STUDENT, optionally initialised from MODEL.STUDENT.WEIGHTS), the
    testbed METHOD.TESTBED, the distillers METHOD.DISTILLERS and, when there are distillers, the frozen teacher
    MODEL.TEACHER. Built in this order, so the same seed gives the same initial weights. A precision key left to
    ``auto`` is resolved for ``device`` (the Trainer passes a config it already resolved)."""
    cfg = resolve_cfg(cfg, device)[0]
    student = build_student_encoder(cfg)
    if cfg.MODEL.STUDENT.WEIGHTS:
        sd = load_torch(cfg.MODEL.STUDENT.WEIGHTS, "MODEL.STUDENT.WEIGHTS")
        load_strict(student.backbone, sd.get("state_dict", sd), f"student weights {cfg.MODEL.STUDENT.WEIGHTS}")
    testbed = TESTBEDS.get(cfg.METHOD.TESTBED).from_config(cfg, student)
    classes = [DISTILLERS.get(name) for name in cfg.METHOD.DISTILLERS]
    teacher = None
    if classes:
        t = cfg.MODEL.TEACHER
        # DisCo on the backbone features reads no projection head: a backbone-only file (DINO's release) will do
        teacher, info = load_teacher(t.WEIGHTS, t.ARCH, head_required=cfg.LOSS.DISCO.EMBEDDING == "head")
        logger.info("teacher %s from %s (%s format, head %s; ignored %d keys: %s)", t.ARCH, t.WEIGHTS,
                    info["format"], info["head"], len(info["ignored_keys"]), info["ignored_keys"][:6])
        teacher.normalize = t.NORMALIZE
        if t.COPY_QUEUE:
            copy_teacher_queue(testbed, info["queue"], t.WEIGHTS)
    distillers = {cls.name: cls.from_config(cfg, student, teacher) for cls in classes}
    teacher_amp = amp_dtype(cfg.TRAIN.AMP.DTYPE if cfg.TRAIN.AMP.TEACHER else "")
    return Method(student, testbed, distillers, teacher, cfg.MODEL.TEACHER.BN_TRAIN, teacher_amp, view_groups(cfg))
