"""One run per output folder: an exclusive lock on ``OUTPUT_DIR/.lock`` for as long as a run works there.

The lock is ``fcntl.flock`` on a file that records the holder (host, pid, SLURM job, start time): the kernel
releases it when the holding process ends in any way (exit, crash, kill -9, preemption), so a stale lock of a dead
process never blocks the next run, and a requeued SLURM job simply takes it again. A second run on a folder in use
fails at once, naming the holder.
"""
import datetime
import fcntl
import json
import os
import socket
from typing import Optional


class OutputDirInUse(RuntimeError):
    pass


class OutputDirLock:
    """``with OutputDirLock(dir, what):`` or ``acquire()`` / ``release()``. Only one process per run takes it (rank 0);
    re-acquiring in the same process is a no-op."""

    _held = {}  # realpath of the lock file -> open file of this process

    def __init__(self, output_dir: str, what: str = "run"):
        self.output_dir, self.what = output_dir, what
        self.path = os.path.join(output_dir, ".lock")
        self.file: Optional[object] = None

    def acquire(self) -> "OutputDirLock":
        os.makedirs(self.output_dir, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in self._held:
            self.file = self._held[key]
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "(unknown holder)"
            f.close()
            try:
                holder = ", ".join(f"{k} {v}" for k, v in json.loads(holder).items())
            except ValueError:
                pass
            raise OutputDirInUse(f"OUTPUT_DIR {self.output_dir} is in use by another run ({holder}). Two runs in one "
                                 f"folder would overwrite each other's checkpoints, metrics and exports: wait for it "
                                 f"to end, or give this run another OUTPUT_DIR.") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                            "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
                            "since": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        f.flush()
        self.file = self._held[key] = f
        return self

    def release(self) -> None:
        key = os.path.realpath(self.path)
        f = self._held.pop(key, None)
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()
        self.file = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(output_dir: str, what: str, device) -> OutputDirLock:
    """Rank 0 takes the folder's lock; every process learns whether it got it (a collective call with several
    processes), so all of them stop together when another run holds the folder."""
    from .distributed import any_process, get_rank

    lock, error = OutputDirLock(output_dir, what), None
    if get_rank() == 0:
        try:
            lock.acquire()
        except OutputDirInUse as e:
            error = e
    if any_process(error is not None, device) and error is None:
        error = OutputDirInUse(f"OUTPUT_DIR {output_dir} is in use by another run (see rank 0's log)")
    if error is not None:
        raise error
    return lock
