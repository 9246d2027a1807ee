"""Tensor, sequence and context parallelism applied to a plain single-device model (torchtitan style)."""

from atlas_train.parallel.config import ParallelConfig
from atlas_train.parallel.plan import ParallelPlan, setup_parallel

__all__ = ["ParallelConfig", "ParallelPlan", "setup_parallel"]
