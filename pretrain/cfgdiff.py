"""What changed between the config a run was checkpointed with and the config it is resumed with.

A resumed run must be the run its folder holds: keys that change what is computed (the method, the model, the
data, the schedule, the precision) may not silently differ from the checkpoint's, while keys that only change how
it is run or watched (log and checkpoint periods, workers, the kNN monitor) may. ``config.yaml`` always describes
what runs now, and every resume with changes appends them to ``config_changes.jsonl``.
"""
import datetime
import json
import os
from typing import Dict, Iterable, Tuple

from fvcore.common.config import CfgNode as _FvcoreCfgNode

from .cfgnode import cfg_value


def flatten(cfg, prefix: str = "") -> Dict[str, object]:
    """``{"SOLVER.BASE_LR": 0.03, ...}`` of a (nested) CfgNode / dict; tuples and lists compare as lists."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def config_changes(saved: str, current) -> Dict[str, Tuple[object, object]]:
    """``{key: (saved value, current value)}`` for every key that differs (a key only one side has included)."""
    old = flatten(_FvcoreCfgNode.load_cfg(saved))
    new = flatten(current)
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>")}


def is_safe(key: str, safe: Iterable[str]) -> bool:
    """``key`` is one of ``safe`` or under one of its nodes (``"TEST.KNN"`` covers ``TEST.KNN.K``)."""
    return any(key == s or key.startswith(s + ".") for s in safe)


def check_resume(saved: str, current, safe: Iterable[str], allow_key: str, checkpoint: str) -> Dict[str, tuple]:
    """The changes of ``current`` against the ``saved`` config dump of ``checkpoint``; raises ``ValueError`` listing
    the ones outside ``safe`` unless ``current``'s ``allow_key`` (e.g. ``TRAIN.RESUME_CHANGED_CONFIG``) is true."""
    changes = config_changes(saved, current)
    meaning = {k: v for k, v in changes.items() if not is_safe(k, safe)}
    if meaning and not cfg_value(current, allow_key):
        listed = "\n".join(f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in meaning.items())
        raise ValueError(
            f"OUTPUT_DIR {current.OUTPUT_DIR} holds a run with another config: resuming {checkpoint} would silently "
            f"mix two runs. Keys that change what is computed differ:\n{listed}\nStart a new OUTPUT_DIR for the new "
            f"config, or, to continue this run with the new values on purpose (e.g. a lower lr after a blow-up), add "
            f"{allow_key} True (the changes are recorded in config_changes.jsonl).")
    return changes


def record_changes(output_dir: str, iteration: int, changes: Dict[str, tuple]) -> None:
    """Append ``{"iter", "time", "changes": {key: [old, new]}}`` to ``OUTPUT_DIR/config_changes.jsonl``."""
    if not changes:
        return
    with open(os.path.join(output_dir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps({"iter": iteration, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                            "changes": {k: [str(a), str(b)] for k, (a, b) in changes.items()}}) + "\n")
        f.flush()
