"""Pretraining methods as plug-ins: a testbed and any number of distillers, registered by name.

A method is **a testbed** (the student's own self-supervised objective: ``mocov2``; ``none`` for pure distillation)
plus **distillers** (terms that pull the student towards a frozen teacher: ``disco``, ...). The config names them::

    METHOD:
      TESTBED: mocov2           # a name in TESTBEDS
      DISTILLERS: [disco]       # names in DISTILLERS, e.g. [attention, disco] for AT + DisCo

Each is one class in one file (``pretrain/testbeds/<name>.py``, ``pretrain/distillers/<name>.py``; every module
there is imported, so the file is all it takes), registered with ``@TESTBEDS.register()`` /
``@DISTILLERS.register()`` under its ``name``. Its config keys come from its ``add_config(cfg)`` (a one-line comment
per key; every registered method's keys exist in every config, as detectron2 projects add theirs). The trainer knows
no method: it asks :class:`pretrain.model.Method`, which holds the student, the testbed, the distillers and the one
frozen teacher they share, for

- ``targets`` (no gradients, before the student's forward): momentum updates, keys, the teacher's outputs ...;
- the student's forward on each view some part needs (``student_views``), one view's graph alive at a time;
- ``losses(view, out, targets)``: named, already weighted scalars ``loss_<name>``, summed into ``loss``; every
  ``loss_*`` key reaches metrics.jsonl, TensorBoard, the progress bar and the curves with no change there;
- with multi-crop views (DATA.AUGMENTATION swav / dino), all views go through one forward, as SwAV and DINO run
  them (the backbone on the views of each size batched, the head over all: BatchNorm statistics over every crop);
  ``observe(views, outs, targets)`` sees a forward group's outputs before its losses (SwAV computes the codes of
  its assignment crops there);
- ``adjust_gradients`` (after the backward passes, before the step): freeze prototypes or a last layer for a while;
- ``after_step`` (after the optimizer step): enqueue, EMA updates, ...;
- ``progress`` (set by the trainer before each step): the iteration and epoch, for schedules (DINO's teacher
  temperature and momentum, SwAV's queue start);
- their state (an ``nn.Module``'s parameters and buffers go into the checkpoint) and the exported student.
"""
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from fvcore.common.registry import Registry
from torch import nn


class MethodRegistry(Registry):
    """fvcore's ``Registry`` keyed by each class's ``name`` (the string configs use) instead of its ``__name__``."""

    def register(self, obj=None):
        if obj is None:
            return self.register
        if not isinstance(getattr(obj, "name", None), str) or not obj.name:
            raise TypeError(f"{obj.__name__} needs a class attribute `name` (the name configs use)")
        self._do_register(obj.name, obj)
        return obj

    def get(self, name: str):
        if name not in self:
            raise KeyError(f"unknown {self._name.lower().rstrip('s')} {name!r}; registered: "
                           f"{', '.join(sorted(self.names()))}")
        return super().get(name)

    def names(self) -> List[str]:
        return [name for name, _ in self]


TESTBEDS = MethodRegistry("TESTBEDS")
DISTILLERS = MethodRegistry("DISTILLERS")

Targets = Dict[str, object]  # what a part computed without gradients for this step (tensors, lists of tensors)
StudentOutput = Dict[str, object]  # "embedding" NxC (L2-normalised head output), "features" NxD, ["maps"]


@dataclass(frozen=True)
class Progress:
    """Where the run is: ``iteration`` (global, 0-based: the step about to run), of ``max_iter``, with
    ``iters_per_epoch``. Set on every part by :meth:`pretrain.model.Method.set_progress` before each step; a
    function of the checkpointed iteration, so a resumed run's schedules continue exactly."""

    iteration: int = 0
    iters_per_epoch: int = 1
    max_iter: int = 1

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch


class MethodPart(nn.Module):
    """What testbeds and distillers share. Subclasses set ``name`` and override what they need."""

    progress: Progress = Progress()

    name: str = ""
    # student views (0: the query view v, 1: the other view v') whose forward, with gradients, this part's losses use
    student_views: Tuple[int, ...] = ()
    # whether this part's losses need the student's per-stage feature maps (``out["maps"]``)
    student_maps: bool = False
    # whether this part's losses read the student's projection head (``out["embedding"]``); when no part of the method
    # does (e.g. CompRess on backbone features alone), the head is frozen: not optimised, and ignored by DDP
    student_head: bool = True

    @staticmethod
    def add_config(cfg) -> None:
        """Add this part's keys to ``cfg`` (called for every registered part by ``pretrain.config.get_cfg``)."""

    @staticmethod
    def check_config(cfg) -> None:
        """Raise ``ValueError`` naming the key and the fix when ``cfg`` cannot work with this part (only called
        when the part is selected)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of this part the optimizer trains besides the student's (e.g. a predictor); none by default."""
        return (p for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def targets(self, student: nn.Module, views: Sequence[torch.Tensor], teacher: Optional[List[dict]]) -> Targets:
        """Computed without gradients before any student forward of this step. ``teacher``: per view, the frozen
        teacher's outputs (``embedding``, ``features``, ``maps``) when some distiller asked for them."""
        return {}

    def losses(self, view: int, out: StudentOutput, targets: Targets) -> Dict[str, torch.Tensor]:
        """The loss terms of student view ``view`` (for each view in ``student_views``): ``{"loss_<name>": scalar}``,
        already multiplied by the part's weight. The trainer back-propagates their sum, one view at a time."""
        return {}

    @torch.no_grad()
    def observe(self, views: Tuple[int, ...], outs: List[StudentOutput], targets: Targets) -> None:
        """The student's outputs (with gradients: do not back-propagate through what is stored) of the views of one
        forward group, before :meth:`losses` of any of them; may add to ``targets`` what those losses, and the later
        groups', need (SwAV: the codes of its assignment crops)."""

    def adjust_gradients(self) -> None:
        """After the backward passes (gradients unscaled), before the optimizer step: e.g. drop the gradients of
        parameters frozen for the first iterations (``p.grad = None``: the optimizer skips them)."""

    @torch.no_grad()
    def after_step(self, student: nn.Module, targets: Targets) -> None:
        """After the optimizer step (e.g. enqueue keys)."""

    def chance_losses(self) -> Dict[str, float]:
        """``{"loss_<name>": value}`` for terms with a chance level: the value a term takes (as :meth:`losses`
        returns it, weighted) when the student's outputs carry no information, e.g. InfoNCE over K + 1 keys at
        weight w: w * ln(K + 1). The pretrainer warns when a term stays there (:mod:`pretrain.health`)."""
        return {}


class Testbed(MethodPart):
    """The student's own self-supervised objective (MoCo-v2, SwAV, DINO, or none)."""

    @classmethod
    def from_config(cls, cfg, student: nn.Module) -> "Testbed":
        return cls()

    def exported(self, student: nn.Module) -> nn.Module:
        """The encoder (backbone + head) exported and monitored: the student; a testbed whose evaluated network is
        another one (DINO's EMA teacher) returns that."""
        return student


class Distiller(MethodPart):
    """A term pulling the student towards the frozen teacher (``MODEL.TEACHER``, shared by all distillers)."""

    # teacher views (as student_views) and outputs this distiller reads; the teacher runs once for all distillers
    teacher_views: Tuple[int, ...] = ()
    teacher_maps: bool = False
    # whether this distiller's targets are the teacher's projection embedding (``teacher[v]["embedding"]``): the
    # pretrainer then checks that embedding for collapse before distilling (pretrain.health, TEST.TEACHER_HEALTH)
    teacher_embedding: bool = False

    @classmethod
    def from_config(cls, cfg, student: nn.Module, teacher: nn.Module) -> "Distiller":
        return cls()
