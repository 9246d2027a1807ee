"""A tiny torchrun worker for the launcher tests: gloo all-reduces in a loop, stopping like atlas-train does.

Why: the launch scripts' contract (rendezvous, environment, exit codes on preemption and failure) is tested
quickly with this instead of a full training run. Each "step" all-reduces the step number; after SIGTERM/SIGUSR1 the
ranks agree (all-reduce max) to stop at the next step and exit 75, as atlas-train does after its checkpoint.

    torchrun --nproc-per-node 2 tests/launch_probe.py --out DIR [--steps N] [--step-seconds S] [--fail-rank R]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75


def all_reduce(tensor: torch.Tensor, **kwargs) -> None:
    """dist.all_reduce, except that a peer that died leaves this rank waiting in the collective (until the
    launcher stops it), as NCCL does, instead of failing at once as gloo does. That keeps the test of "the
    launcher reports the failed worker's own exit code" about the worker that failed, not about a bystander
    whose own error would race it."""
    try:
        dist.all_reduce(tensor, **kwargs)
    except RuntimeError:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends the wait
        time.sleep(120)
        raise


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits 3 after the first step")
    parser.add_argument("overrides", nargs="*", help="atlas-train style key=value arguments, recorded only")
    args = parser.parse_args()

    stop = {"signal": 0}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: stop.update(signal=signum))

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"started.{rank}").write_text(str(os.getpid()))
    total = torch.zeros(())
    for step in range(args.steps):
        value = torch.tensor(float(step + rank))
        all_reduce(value)
        total += value
        if rank == args.fail_rank:
            sys.stdout.flush()
            os._exit(3)  # at once: a normal interpreter exit with gloo's threads alive can abort (SIGABRT) instead
        time.sleep(args.step_seconds)
        flag = torch.tensor(float(stop["signal"]))
        all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            (args.out / f"preempted.{rank}").write_text(json.dumps({"step": step, "signal": int(flag.item())}))
            dist.destroy_process_group()
            return EXIT_PREEMPTED
    record = {
        "rank": rank,
        "overrides": args.overrides,
        "world": world,
        "total": total.item(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "nccl_debug": os.environ.get("NCCL_DEBUG"),
        "local_world": int(os.environ["LOCAL_WORLD_SIZE"]),
        "nnodes": int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]),
    }
    (args.out / f"done.{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
