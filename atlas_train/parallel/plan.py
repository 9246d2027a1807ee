"""`setup_parallel`: process groups for TP × CP × DP and the one object training asks about the layout.

Training always goes through a `ParallelPlan`, on one CPU process as on many GPUs: with every size 1 the plan is a
no-op (no process group, `mpu` None, `parallelize` returns the model as is), so there is a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from atlas_train.config import ConfigError
from atlas_train.parallel.config import ParallelConfig


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group() -> None:
    """Join the job torchrun (or slurm + torchrun) started: NCCL on GPUs, gloo on CPU."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _has_cuda_device() -> bool:
    """Whether megatron-core's SP mappings can allocate (they use torch.cuda.current_device())."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return False
    return True


@dataclass
class ParallelPlan:
    """Where this process sits in the TP × CP × DP grid, and the operations that depend on it."""

    cfg: ParallelConfig
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    mpu: Any = None  # DeepSpeedMPU when distributed, else None (DeepSpeed then uses the world group)
    chunk_size: int = 1  # segment lengths must be multiples of it (set by parallelize from the model's config)
    _reduce_group: Any = field(default=None, repr=False)

    @property
    def sequence_parallel(self) -> bool:
        return self.cfg.sequence_parallel

    @property
    def is_distributed(self) -> bool:
        return self.mpu is not None

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Turn the full single-device model (built from the same seed on every rank) into this rank's part."""
        model_cfg = getattr(model, "config", None)
        self.chunk_size = getattr(model_cfg, "chunk_size", 1)
        if self.tp_size > 1:
            from atlas_train.parallel.tensor import apply_tensor_parallel

            apply_tensor_parallel(model, sequence_parallel=self.sequence_parallel)
        if self.cp_size > 1:
            from atlas_train.parallel.context import apply_context_parallel

            apply_context_parallel(model)
        return model

    def shard_batch(self, batch: dict) -> dict:
        """This CP rank's contiguous segment of input_ids / labels / doc_start.

        Accepts the loader's {"tokens": (B, L+1), "doc_start": (B, L+1)} (split here into input = tokens[:, :-1],
        labels = tokens[:, 1:], doc_start[:, :-1]) or an already split {"input_ids", "labels", "doc_start"}.
        A `doc_start` of None (no document starts after token 0) stays None.
        """
        if "tokens" in batch:
            tokens, doc_start = batch["tokens"], batch["doc_start"]
            batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
                     "doc_start": None if doc_start is None else doc_start[:, :-1]}
        if self.cp_size == 1:
            return dict(batch)
        length = batch["input_ids"].shape[1]
        segment = length // self.cp_size
        if length % self.cp_size or segment % self.chunk_size:
            raise ConfigError(
                f"sequence length {length} does not split into {self.cp_size} context-parallel segments "
                f"of a multiple of chunk_size {self.chunk_size}"
            )
        start = self.cp_rank * segment
        return {key: None if value is None else value[:, start : start + segment] for key, value in batch.items()}

    def loss_for_logging(self, loss: torch.Tensor) -> float:
        """The loss averaged over DP × CP ranks (each CP rank's loss covers an equal-length segment)."""
        value = loss.detach().to(torch.float64).reshape(1).clone()
        if self.mpu is not None:
            dist.all_reduce(value, group=self._reduce_group)
            value /= dist.get_world_size(self._reduce_group)
        return value.item()


def setup_parallel(cfg: ParallelConfig) -> ParallelPlan:
    """Create (or reuse) the megatron-core process groups for `cfg` and describe this rank's place in them."""
    world = _world_size()
    model_parallel = cfg.tensor_parallel * cfg.context_parallel
    if world == 1 and model_parallel == 1:
        return ParallelPlan(cfg)
    if world % model_parallel:
        raise ConfigError(
            f"parallel: world size {world} is not divisible by tensor_parallel {cfg.tensor_parallel} "
            f"x context_parallel {cfg.context_parallel}"
        )
    if cfg.sequence_parallel and not _has_cuda_device():
        raise ConfigError("parallel.sequence_parallel needs CUDA devices (megatron-core's sequence-parallel mappings)")
    _init_process_group()
    from megatron.core import parallel_state as ps

    from atlas_train.parallel.mpu import DeepSpeedMPU

    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size() == cfg.tensor_parallel
            and ps.get_context_parallel_world_size() == cfg.context_parallel
        )
        if not same:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel, context_parallel_size=cfg.context_parallel
        )
    return ParallelPlan(
        cfg,
        rank=dist.get_rank(),
        world_size=world,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=cfg.tensor_parallel,
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=cfg.context_parallel,
        mpu=DeepSpeedMPU(),
        _reduce_group=ps.get_data_parallel_group(with_context_parallel=True),
    )
