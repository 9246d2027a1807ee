"""The process-wide state an in-process `atlas-train` run leaves behind: its process group and the launch variables
it sets for a one-process run. conftest.py restores both after every test module."""

from __future__ import annotations

import contextlib
import os

import torch.distributed as dist

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def process_state_restored():
    """Tear down a process group started inside the block and restore the launch variables, so that what runs after
    (a later module, a subprocess that inherits the environment) finds the process as it would alone."""
    started = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in LAUNCH_VARS}
    try:
        yield
    finally:
        if started and dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
