"""The whole run's config: one section per concern, each owned by the package that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field

from atlas_train.data.config import DataConfig
from atlas_train.model.config import ModelConfig
from atlas_train.parallel.config import ParallelConfig
from atlas_train.train.config import TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
