"""Checkpoint I/O: atomic saves, iteration checkpoints with resume fallback, strict loading with full key reports.
Reading the checkpoint formats of other projects is :mod:`pretrain.formats`."""
import glob
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

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


class Checkpointer:
    """Iteration checkpoints ``OUTPUT_DIR/checkpoints/model_{iter:07d}.pth``; keeps the newest ``max_to_keep``."""

    def __init__(self, output_dir: str, max_to_keep: int = 3):
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
        for old in self.list()[self.max_to_keep:]:
            os.remove(old)
        return path

    def load_latest(self) -> Tuple[Optional[dict], Optional[str]]:
        """The newest checkpoint that loads; an unreadable one (e.g. truncated) is skipped with a warning."""
        for path in self.list():
            try:
                return torch.load(path, map_location="cpu", weights_only=False), path
            except Exception as e:  # truncated / corrupted file: fall back to the previous one
                logger.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                               type(e).__name__, e)
        return None, None


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
