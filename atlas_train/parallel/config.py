"""Parallel layout of a run (config section `parallel:`): how many ranks split heads and how many split the sequence.

Data parallelism takes whatever is left: dp = world_size / (tensor_parallel · context_parallel).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # ranks that split the heads (and vocab, MLP hidden) of every layer
    context_parallel: int = 1  # ranks that each hold one contiguous segment of every sequence
    sequence_parallel: bool = False  # norms/residuals on sequence shards inside a TP group (needs tensor_parallel > 1)

    def validate(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        if self.context_parallel < 1:
            raise ValueError("context_parallel must be >= 1")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1")
