"""Resuming a checkpoint under another data-parallel size: what may change, and re-cutting the ZeRO partitions.

ZeRO 1-3 shard the fp32 master weights and the Adam moments over the data-parallel ranks that wrote them, so a run
with another DP size cannot read those files directly. DeepSpeed's universal checkpoint does the re-cut:
`ds_to_universal` stitches every parameter back whole (fp32 weights, exp_avg, exp_avg_sq, step), and an engine
started with `checkpoint.load_universal` takes its own slice of each. It works with our client AdamW on CPU/gloo once
the `universal_checkpoint_info` that Megatron-DeepSpeed would save is injected; that record only describes how to
merge tensor-parallel slices, which is why a DP change is refused under TP > 1 (the merge patterns are not written).
ZeRO 0 keeps whole weights and optimizer state in `mp_rank_00_model_states.pt`, which loads under any DP size as is.

What is per rank in our client state cannot follow a DP change one to one: the data position is global (every rank
saves the same one, and the loader re-cuts it for the new DP size), the counters are equal on all ranks, and the RNG
streams are reseeded from (seed, step) because ranks that did not exist before have no stream to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from atlas_train.train.checkpoint import UNIVERSAL, CheckpointError, CheckpointManager
from atlas_train.train.distributed import any_rank


@dataclass(frozen=True)
class Layout:
    """The parallel sizes a checkpoint was written with, or a run has."""

    tensor_parallel: int
    context_parallel: int
    data_parallel: int

    @classmethod
    def of_plan(cls, plan) -> "Layout":
        return cls(plan.tp_size, plan.cp_size, plan.dp_size)

    @classmethod
    def of_checkpoint(cls, tag_dir: Path, client: dict) -> "Layout":
        """From the saved config's parallel section and the number of ranks that wrote client files."""
        parallel = client["config"].get("parallel", {})
        tp, cp = parallel.get("tensor_parallel", 1), parallel.get("context_parallel", 1)
        world = len(list(tag_dir.glob("client_rank*.pt")))
        return cls(tp, cp, world // (tp * cp))


def check_layout_change(saved: Layout, current: Layout, tag_dir: Path) -> bool:
    """Whether the DP size changed (resumable); raises one line naming the sizes for a change that cannot work."""
    for name in ("tensor_parallel", "context_parallel"):
        before, now = getattr(saved, name), getattr(current, name)
        if before != now:
            raise CheckpointError(
                f"{tag_dir} was written with parallel.{name}={before}, this run has {now}: only the data-parallel "
                "size (the number of ranks / (tensor_parallel x context_parallel)) may change on resume"
            )
    changed = saved.data_parallel != current.data_parallel
    if changed and current.tensor_parallel > 1:
        raise CheckpointError(
            f"{tag_dir} was written with {saved.data_parallel} data-parallel ranks, this run has "
            f"{current.data_parallel}: changing the data-parallel size of a tensor-parallel run is not supported"
        )
    return changed


def convert_to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal form of `tag_dir`, made once (atomically: built aside, then renamed into place).

    Call on one rank only; the conversion reads the checkpoint files, no process group is involved.
    """
    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    # Built in a private folder: the converter also writes a `latest_universal` file beside its output.
    work = tag_dir / f".{UNIVERSAL}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(work / UNIVERSAL), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter; errors still raise
            ds_to_universal(args)
        os.replace(work / UNIVERSAL, out)
    except Exception as err:
        raise CheckpointError(f"could not convert {tag_dir} for a new data-parallel size: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def read_resume_client(ckpt: CheckpointManager, tag: str, current: Layout) -> tuple[dict, bool]:
    """(client state to resume from, whether the DP size changed). After a DP change every rank takes rank 0's:
    the parts that matter (step, data position, counters) are the same on all ranks."""
    tag_dir = ckpt.dir / tag
    first = ckpt.read_client(tag, rank=0)
    changed = check_layout_change(Layout.of_checkpoint(tag_dir, first), current, tag_dir)
    return (first if changed else ckpt.read_client(tag)), changed


def prepare_universal(tag_dir: Path, rank: int) -> None:
    """Rank 0 converts `tag_dir`; every rank returns once the conversion is there, or raises if it failed."""
    error = None
    if rank == 0:
        try:
            convert_to_universal(tag_dir)
        except CheckpointError as err:
            error = err
    (failed,) = any_rank(error is not None)  # also the barrier: no rank loads before the conversion is complete
    if failed:
        raise error or CheckpointError(f"rank 0 could not convert {tag_dir} for a new data-parallel size")


@contextlib.contextmanager
def repairing_universal_load(optimizer):
    """Undo two side effects of DeepSpeed 0.19.8's ZeRO-3 universal load on a client torch optimizer.

    It gives every parameter group the first group's settings (weight decay on norms and biases), and one shared
    `step` tensor to every group's state, which AdamW then advances once per group and step (wrong bias correction).
    The run's own group settings are the right ones anyway (as the lr, they come from the config); each state gets
    its own copy of the restored step.
    """
    saved = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, saved):
        group.update(settings)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
