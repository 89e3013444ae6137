"""The preemption protocol, one implementation for the pretrainer and for detectron2 training.

A scheduler that wants a job gone (SLURM before preemption or at the time limit) signals its processes (SIGTERM /
SIGUSR2). The handler only sets a flag; at the next iteration boundary all processes agree (a signal that reached any
of them stops all of them), the job writes the checkpoint of the iteration that just finished and raises
:class:`Preempted`. A SLURM task then requeues itself (``pretrain.slurm``); a local run ends and rerunning the same
command continues from that checkpoint.
"""
import signal
import threading

import torch

from .distributed import any_process


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM / SIGUSR2) and has written its checkpoint."""


class StopRequest:
    """A stop flag raised by SIGTERM / SIGUSR2 (or :meth:`request`), and the agreement of all processes on it.

    ``install()`` / ``restore()`` bracket a run; handlers can only be installed from the main thread (elsewhere the
    flag is raised by :meth:`request` alone).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)  # what SLURM / schedulers send before killing a job

    def __init__(self):
        self.requested = False
        self._previous = {}

    def request(self, signum=None, frame=None) -> None:
        """Safe in a signal handler: it only sets a flag."""
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.request) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, device: torch.device) -> bool:
        """True on every process if any process was asked to stop (a collective call with several processes)."""
        return any_process(self.requested, device)
