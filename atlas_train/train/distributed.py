"""One process group for every launch: torchrun/srun set RANK & co.; plain `python -m` gets a 1-process group."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and DeepSpeed's comm layer on top of it."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    if not cuda and int(os.environ["WORLD_SIZE"]) == 1:
        # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU (~20 s cold); one process never uses it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False)


def shutdown_distributed() -> None:
    """Barrier, then tear the process groups down: a process that exits with gloo's threads still running can die
    of SIGABRT ("terminate called without an active exception") after its work is done, turning a finished run
    into a failed one for torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def any_rank(*flags) -> tuple[bool, ...]:
    """For each flag, whether it holds on some rank, so every rank takes the same branch.

    Flags are bools or 0-dim tensors on the device (e.g. "this loss is not finite"): they are stacked on the device,
    so the whole call costs one all-reduce and one device-to-host transfer, the only sync of a training step.
    """
    dev = device()
    # Python bools are filled in on the device (torch.full launches a kernel; a host-to-device copy would sync).
    t = torch.stack([
        f.reshape(()).to(torch.float32) if isinstance(f, torch.Tensor) else torch.full((), float(f), device=dev)
        for f in flags
    ])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())
