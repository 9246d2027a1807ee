"""The whole run's config: one section per concern, each owned by the package that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field

from atlas_train.model.config import ModelConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
