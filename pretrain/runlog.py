"""Run logging shared by every job of the project: one log file per process in OUTPUT_DIR, and ``metrics.jsonl``
kept consistent with the checkpoint a run resumes from."""
import json
import logging
import os
import sys


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


def truncate_metrics(output_dir: str, key: str, last: int) -> None:
    """Drop the ``metrics.jsonl`` lines whose ``key`` (iter / epoch) is past the checkpoint a run resumed from:
    the resumed run writes them again."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get(key, 0) <= last]
    with open(path, "w") as f:
        f.writelines(keep)
