"""One distributed initialisation for every launch: ``env://``.

Local multi-process runs (``launch``), ``torchrun`` and SLURM jobs (``submitit.helpers.TorchDistributedEnvironment
().export()``) all end up with MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK in the environment, then
call :func:`init_distributed`. NCCL on GPUs, gloo on CPU.
"""
import os
import socket
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed() -> torch.device:
    """Join the process group described by the environment (if WORLD_SIZE > 1) and return this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not is_dist():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return device


def barrier() -> None:
    if is_dist():
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any of them (a collective call with several processes): how
    all processes stop together on a signal, a non-finite loss or a folder in use."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (no gradient). Identity for a single process."""
    if not is_dist():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(tensor, src=src)
    return tensor


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable, num_per_machine: int, machine_rank: int, world_size: int, args: Sequence):
    os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(machine_rank * num_per_machine + local_rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(num_per_machine))
    try:
        fn(*args)
    finally:
        if is_dist():
            dist.destroy_process_group()


def launch(fn: Callable, num_per_machine: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Sequence = ()) -> None:
    """Run ``fn(*args)`` in ``num_per_machine`` processes on each of ``num_machines`` machines (detectron2's
    ``launch`` signature, but through ``env://``). ``dist_url`` is ``tcp://HOST:PORT`` or ``auto`` (one machine only).
    A single process runs ``fn`` in this process, joining a group already described by the environment (torchrun).
    """
    world_size = num_per_machine * num_machines
    if world_size <= 1:
        fn(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; pass --dist-url tcp://HOST:PORT")
        host, port = "127.0.0.1", free_port()
    else:
        if not dist_url.startswith("tcp://"):
            raise ValueError(f"--dist-url must be 'auto' or tcp://HOST:PORT, got {dist_url!r}")
        host, port = dist_url[len("tcp://"):].rsplit(":", 1)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    mp.start_processes(_worker, nprocs=num_per_machine, args=(fn, num_per_machine, machine_rank, world_size, args),
                       start_method="spawn", daemon=False)
