"""SLURM through submitit: the one launcher every CLI of the project uses (``--slurm`` and its flags).

The submitted callable, :class:`SlurmTask`, exports the distributed environment of its task (one task per GPU, or
``--tasks-per-node`` CPU tasks) with ``submitit.helpers.TorchDistributedEnvironment`` and runs the same entry
function a local run uses. Preemption / time limit: SLURM signals the tasks (USR2); the trainer checkpoints at the
next iteration boundary and raises :class:`pretrain.preemption.Preempted`; rank 0 then hands the signal back to
submitit, which calls :meth:`SlurmTask.checkpoint` and requeues the job. The requeued job resumes from OUTPUT_DIR.
"""
import argparse
import hashlib
import os
import signal
import sys
import time
from typing import Any, Callable

import submitit


def add_slurm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("SLURM (submitit)")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running here")
    g.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    g.add_argument("--nodes", type=int, default=1, help="machines of the job")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=0,
                   help="tasks per node (default: --gpus-per-node, or 1 without GPUs; gloo CPU tasks without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (DataLoader workers and more)")
    g.add_argument("--mem", type=int, default=0, help="memory per node in GB (0: the cluster's default)")
    g.add_argument("--timeout", type=int, default=72 * 60, help="time limit in minutes")
    g.add_argument("--account", default="", help="SLURM account to charge (default: yours)")
    g.add_argument("--qos", default="", help="SLURM quality of service (default: the partition's)")
    g.add_argument("--constraint", default="", help="SLURM node features required, e.g. volta32gb")
    g.add_argument("--comment", default="", help="SLURM job comment")
    g.add_argument("--job-dir", default="runs/slurm/%j", help="submitit's folder (logs, pickles); %%j is the job id")
    g.add_argument("--wait", action="store_true",
                   help="with --slurm: follow the job, stream its rank-0 log, return when it ends")
    return parser


def slurm_answers() -> bool:
    """Whether a SLURM answers here: ``sinfo`` runs and lists a node that can take jobs (idle, mix or alloc)."""
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    except (subprocess.SubprocessError, OSError):
        return False
    return any(state in out for state in ("idle", "mix", "alloc"))


def master_port(job_id: str) -> int:
    """The rendezvous port, derived alike by every task from the job id, in 20000-32767: below Linux's ephemeral
    range (32768-60999), where any outgoing connection on the node may hold a port. submitit's own choice
    (20000-60000) overlaps that range, and a taken port fails rank 0 with EADDRINUSE."""
    return 20000 + int(hashlib.sha256(str(job_id).encode()).hexdigest(), 16) % (32768 - 20000)


class SlurmTask:
    """What runs in every task of the job: ``entry(args)`` with the distributed environment exported."""

    def __init__(self, entry: Callable[[argparse.Namespace], Any], args: argparse.Namespace):
        self.entry, self.args = entry, args

    def __call__(self) -> Any:
        from .preemption import Preempted  # here, not at the top: the CLIs import add_slurm_args without torch

        dist_env = submitit.helpers.TorchDistributedEnvironment()
        if "MASTER_PORT" not in os.environ:  # a port the user exported is kept (submitit reads it)
            dist_env.master_port = master_port(submitit.JobEnvironment().job_id)
        dist_env.export(set_cuda_visible_devices=False)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"task {dist_env.rank}/{dist_env.world_size} on {os.uname().nodename} (pid {os.getpid()}), master "
              f"{dist_env.master_addr}:{dist_env.master_port}, restart {restart}", flush=True)
        try:
            return self.entry(self.args)
        except Preempted as e:
            print(f"task {dist_env.rank}: {e}", flush=True)
            if dist_env.rank == 0:
                # the checkpoint is on disk: let submitit's handler requeue the job (it calls checkpoint() below)
                signal.raise_signal(signal.SIGUSR2)
            return None

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue hook: the same task again; it resumes from the newest checkpoint in OUTPUT_DIR."""
        return submitit.helpers.DelayedSubmission(SlurmTask(self.entry, self.args))


def submit(entry: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str, dependency: str = "",
           task: "SlurmTask" = None, quiet: bool = False) -> submitit.Job:
    """Submit ``entry(args)`` (or a ready ``task``) as a SLURM job with the flags of :func:`add_slurm_args`, after
    the jobs of ``dependency`` (sbatch's syntax, e.g. ``afterok:12:13``); print where it runs unless ``quiet``."""
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster="slurm")
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    params = dict(name=name, nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout, slurm_signal_delay_s=120,
                  # a task that dies (crash, kill -9, a failed rendezvous) ends the job: the others would otherwise
                  # wait for it in their next collective until the time limit
                  slurm_srun_args=["--kill-on-bad-exit=1"])
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if dependency:
        params["slurm_dependency"] = dependency
    if args.mem:
        params["mem_gb"] = args.mem
    for flag in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, flag):
            params[f"slurm_{flag}"] = getattr(args, flag)
    executor.update_parameters(**params)
    job = executor.submit(task or SlurmTask(entry, args))
    if not quiet:
        print(f"submitted job {job.job_id} ({args.nodes} node(s) x {tasks} task(s)); rank-0 logs: "
              f"{job.task(0).paths.stdout} and {job.task(0).paths.stderr}", flush=True)
    return job


def follow(job: submitit.Job, poll_s: float = 1.0) -> Any:
    """Stream the job's rank-0 log until it ends; return its result or raise naming the failure (never hangs: a
    job that dies hard is reported by SLURM accounting)."""
    shown = 0
    rank0 = job.task(0)
    while True:
        done = job.done()
        path = rank0.paths.stdout
        if path.exists():
            text = path.read_text(errors="replace")
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        if done:
            break
        time.sleep(poll_s)
    state = job.state
    try:
        return job.results()[0]  # one result per task; rank 0's is the run's
    except Exception as e:
        raise RuntimeError(f"SLURM job {job.job_id} ended in state {state}: {e}\nlogs: {rank0.paths.stdout}, "
                           f"{rank0.paths.stderr}") from e
