"""Run logging shared by every job of the project: one log file per process in OUTPUT_DIR, and ``metrics.jsonl``
kept consistent with the checkpoint a run resumes from."""
import json
import logging
import os
import sys
from typing import List


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
