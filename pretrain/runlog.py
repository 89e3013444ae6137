"""Run logging shared by every job of the project: one log file per process in OUTPUT_DIR, and ``metrics.jsonl``
kept consistent with the checkpoint a run resumes from, and the progress bars of long loops (:func:`progress_bar`:
feature extraction, kNN voting, the linear probe's epochs and evaluation passes)."""
import json
import logging
import os
import sys
from typing import List, Optional


PROGRESS_DELAY_S = 3.0  # a phase shorter than this prints no bar at all (cached epochs, tiny runs): no clutter
PROGRESS_INTERVAL_S = (1.0, 5.0)  # seconds between bar refreshes: stderr a terminal / not (log files, CI, SLURM)


def progress_bar(total: int, desc: str, unit: str = "it", leave: Optional[bool] = None):
    """A tqdm bar (count, rate, elapsed < ETA) on stderr for a loop of ``total`` units; call ``update(n)``, ``close()``.

    Only on rank 0 (a disabled bar elsewhere). It refreshes at most every second when stderr is a terminal (as the
    pretraining loop's bar) and at most every PROGRESS_INTERVAL_S[1] seconds otherwise (log files, CI output); a
    phase shorter than PROGRESS_DELAY_S prints nothing at all. ``leave`` None keeps the finished bar only when no
    other bar is open (a bar nested under the pretraining bar, e.g. the kNN monitor's, is cleared).
    ``TQDM_DISABLE=1`` in the environment (tqdm reads it at import) turns rank 0's bars off too.
    """
    from tqdm import tqdm

    from .distributed import get_rank  # here: runlog itself imports no torch

    tty = sys.stderr.isatty()
    off = {} if get_rank() == 0 else {"disable": True}  # rank 0: tqdm's default, so TQDM_DISABLE applies
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                mininterval=PROGRESS_INTERVAL_S[0 if tty else 1], delay=PROGRESS_DELAY_S, **off)


def setup_logging(output_dir: str, rank: int) -> None:
    """Log INFO and above to ``OUTPUT_DIR/log.txt`` (rank 0, also to stdout) or ``log.rank<N>.txt``. Calling it again
    (a second run in the same process) replaces the handlers it added before."""
    log = logging.getLogger()
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_runlog", False):
            log.removeHandler(h)
    fmt = logging.Formatter(f"[%(asctime)s r{rank}] %(name)s %(levelname)s: %(message)s", "%m/%d %H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(output_dir, "log.txt" if rank == 0 else f"log.rank{rank}.txt"))]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h._runlog = True
        log.addHandler(h)


def read_jsonl(path: str) -> List[dict]:
    """The records of a JSON-lines file (``metrics.jsonl``), in order. A torn last line (a run killed while writing
    it) is dropped with a warning; any other line that is not JSON is an error naming it."""
    with open(path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f.read().split("\n")) if line.strip()]
    records = []
    for n, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                logging.getLogger(__name__).warning("%s: dropping a torn last line (%d characters, a run killed "
                                                    "while writing it)", path, len(line))
                break
            raise ValueError(f"{path} line {number} is not JSON ({e}); repair or delete that line") from e
    return records


def truncate_metrics(output_dir: str, key: str, last: int) -> None:
    """Keep the ``metrics.jsonl`` records up to ``key`` (iter / epoch) ``last``, where a run (re)starts: a resumed
    run writes the later ones again (:func:`read_jsonl` drops a torn last line)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = [json.dumps(rec) + "\n" for rec in read_jsonl(path) if rec.get(key, 0) <= last]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
