"""Checkpoint I/O: atomic saves, iteration checkpoints with resume fallback, strict loading with full key reports.
Reading the checkpoint formats of other projects is :mod:`pretrain.formats`."""
import glob
import logging
import math
import os
import re
import zipfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .safeload import load_torch

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"model_(\d+)\.pth$")


def save_atomic(obj, path: str, dump: Callable = torch.save) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is never a partial file: temp file in the same folder + rename.
    ``dump(obj, file)`` serialises (``torch.save``; ``pickle.dump`` for detectron2's ``.pkl``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CorruptCheckpointError(ValueError):
    pass


def verify_checkpoint(path: str) -> None:
    """Raise :class:`CorruptCheckpointError` if the bytes of ``path`` are not those that were written. A torch
    checkpoint is a zip archive with a CRC-32 for every record (the pickle and each tensor's storage); torch does not
    check them when loading, so flipped bytes inside a tensor would load silently. Files in torch's legacy (non-zip)
    format carry no checksum and are not checked."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptCheckpointError(f"{path} is damaged ({e})") from e
    if bad is not None:
        raise CorruptCheckpointError(f"{path} is damaged: the checksum of its record {bad!r} does not match the "
                                     f"bytes (a disk or copy error)")


def remove_orphaned_temp_files(*folders: str) -> List[str]:
    """Delete ``*.tmp.<pid>`` files that :func:`save_atomic` leaves when a process is killed mid-save. Call it only
    while holding the output folder (:mod:`pretrain.runlock`): no other writer can own them then."""
    removed = []
    for folder in folders:
        for p in glob.glob(os.path.join(folder, "*.tmp.*")):
            if re.search(r"\.tmp\.\d+$", p):
                os.remove(p)
                removed.append(p)
    if removed:
        logger.info("removed %d temp files of an interrupted save: %s", len(removed), removed)
    return removed


class Checkpointer:
    """Iteration checkpoints ``OUTPUT_DIR/checkpoints/model_{iter:07d}.pth``.

    ``save`` keeps the newest ``max_to_keep`` (never deleting the one it just wrote; checkpoints numbered past it
    belong to an abandoned continuation and are renamed ``*.superseded``). ``load_latest`` returns the newest
    checkpoint that verifies and loads; with ``quarantine`` an unreadable or damaged one is renamed ``*.corrupt``
    (with a warning), so it can never outrank the good ones again.
    """

    def __init__(self, output_dir: str, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"TRAIN.MAX_TO_KEEP / SOLVER.MAX_TO_KEEP must be >= 1 (got {max_to_keep}): the checkpoint "
                             f"just written is what a resumed run continues from")
        self.dir = os.path.join(output_dir, "checkpoints")
        self.max_to_keep = max_to_keep

    def path(self, iteration: int) -> str:
        return os.path.join(self.dir, f"model_{iteration:07d}.pth")

    def list(self) -> List[str]:
        """Checkpoint paths, newest first."""
        found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(self.dir, "model_*.pth"))
                 if (m := _CKPT_RE.search(os.path.basename(p)))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, iteration: int) -> str:
        path = self.path(iteration)
        save_atomic(state, path)
        ckpts = self.list()
        newer = ckpts[:ckpts.index(path)]
        for p in newer:
            self.set_aside(p, "superseded", f"it is past iteration {iteration}, where this run continued from")
        for old in ckpts[ckpts.index(path) + self.max_to_keep:]:
            os.remove(old)
        return path

    def set_aside(self, path: str, suffix: str, why: str) -> str:
        """Rename ``path`` to ``path.<suffix>`` (out of :meth:`list`) with a warning saying ``why``."""
        target = f"{path}.{suffix}"
        os.replace(path, target)
        logger.warning("moved %s aside to %s: %s", path, os.path.basename(target), why)
        return target

    def read(self, path: str) -> dict:
        """Verify and load one checkpoint; raises on damage or unreadable contents."""
        verify_checkpoint(path)
        state = load_torch(path, "iteration checkpoint")  # refuses (raises) a pickle that would run code
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
        return state

    def readable(self, quarantine: bool = False) -> Iterator[Tuple[str, dict]]:
        """``(path, state)`` of each checkpoint that verifies and loads, newest first. An unreadable one (truncated,
        damaged, unsafe) is skipped with a warning; with ``quarantine`` it is renamed ``*.corrupt``."""
        for path in self.list():
            try:
                state = self.read(path)
            except Exception as e:
                why = f"unreadable ({type(e).__name__}: {e})"
                if quarantine:
                    self.set_aside(path, "corrupt", why)
                else:
                    logger.warning("checkpoint %s is %s; trying the previous one", path, why)
                continue
            yield path, state

    def load_latest(self, quarantine: bool = False) -> Tuple[Optional[dict], Optional[str]]:
        """The newest checkpoint that verifies and loads, and its path; ``(None, None)`` when none does."""
        for path, state in self.readable(quarantine):
            return state, path
        return None, None

    def quarantine_nonfinite(self, iteration: int) -> Optional[str]:
        """After a non-finite loss computed with the weights of ``iteration`` (steps done): move aside the
        checkpoint of that iteration (continuing from it repeats the same loss, whatever the lr) and every newer one
        whose weights have diverged (non-finite, or any magnitude above ``DIVERGED``: trained weights and BatchNorm
        statistics are orders of magnitude smaller, and continuing from such weights overflows again even at a sane
        lr); return the newest remaining checkpoint, or None."""
        for path, state in self.readable(quarantine=True):
            tensors = [v for v in state.get("model", state.get("student", {})).values()
                       if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
            largest = max((t.abs().max().item() for t in tensors), default=0.0)
            if state.get("iter") == iteration:
                self.set_aside(path, "nonfinite", f"its weights give the non-finite loss of iteration {iteration + 1}")
            elif not math.isfinite(largest) or largest > DIVERGED:
                self.set_aside(path, "nonfinite", f"its weights have diverged (largest magnitude {largest:.3g})")
            else:
                return path
        return None


DIVERGED = 1e6  # a checkpoint with a weight or buffer larger than this in magnitude has diverged


def key_mismatch(expected: Dict[str, Tuple[int, ...]], state_dict: Dict[str, torch.Tensor]
                 ) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, "key: checkpoint (shape) vs model (shape)" lines) of ``state_dict`` against
    the key -> shape map ``expected``; all empty when they match exactly."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shape = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if tuple(expected[k]) != tuple(state_dict[k].shape))
    return missing, unexpected, shape


def load_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that fails with the full lists of missing / unexpected / mis-shaped keys."""
    missing, unexpected, shape = key_mismatch({k: tuple(v.shape) for k, v in module.state_dict().items()},
                                              state_dict)
    if missing or unexpected or shape:
        raise KeyError(f"{what} does not match the model.\n  missing keys ({len(missing)}): {missing}\n  unexpected "
                       f"keys ({len(unexpected)}): {unexpected}\n  shape mismatches ({len(shape)}): {shape}\nCheck "
                       f"that the architecture (MODEL.*.ARCH) is the one the checkpoint was trained with.")
    module.load_state_dict(state_dict, strict=True)
