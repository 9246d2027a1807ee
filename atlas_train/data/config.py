"""Data section of a run's config (`data:`): where the shards are and how the loader reads them.

The micro-batch size and seq_len come from the train/model sections and the seed from the run, so that one
dataset folder serves any model size or batch setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    path: str = "runs/demo/shards"  # dataset folder written by atlas-prep (holds manifest.json)
    shuffle_buffer: int = 4096  # rows mixed together after the per-epoch shard shuffle; 0 or 1: shard order only
    num_workers: int = 1  # DataLoader worker processes per rank; 0 reads in the training process
    on_corrupt: Literal["stop", "skip"] = "stop"  # a damaged shard stops the run, or is left out of the order

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path must name the dataset folder")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
