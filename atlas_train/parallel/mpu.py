"""The `mpu` object DeepSpeed asks for process groups.

DeepSpeed reduces (and with ZeRO, partitions) gradients over `get_data_parallel_group()`. Context-parallel ranks
hold the same weights and each sees a different part of the sequence, so their gradients must be averaged too:
the "data parallel" group we hand DeepSpeed is megatron's DP×CP group. Model parallel = tensor parallel (no
pipeline), which DeepSpeed uses for the gradient norm and checkpoint names.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class DeepSpeedMPU:
    """Adapter from megatron-core's `parallel_state` to the interface DeepSpeed's engine queries."""

    # Gradient reduction group: every rank that holds the same weight shard (DP × CP).
    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # Model parallel = tensor parallel here (pipeline size is always 1).
    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
