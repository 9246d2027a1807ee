"""The model family registry (docs/math.md §5): `model.mixer` name → the sequence mixer of each block.

The memory members (atlas, atlas_pp, omeganet, titans, dla) share AtlasMixer and differ only by the family
defaults that ModelConfig.resolved() fills in (memory gating, feature map, inner loss, Newton–Schulz steps,
momentum, window). atlas_mal's second (attention) sub-layer is added by Block. The DeepTransformers (deep_transformer,
swdt, dot; §8) share DualMixer and differ by inner loss and window.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.attention import Attention
from atlas_train.model.config import ModelConfig
from atlas_train.model.dual_mixer import DualMixer
from atlas_train.model.hybrid import MemoryAsGate

MIXER_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "atlas": AtlasMixer,
    "atlas_pp": AtlasMixer,
    "omeganet": AtlasMixer,
    "titans": AtlasMixer,
    "dla": AtlasMixer,
    "transformer": Attention,
    "atlas_mag": MemoryAsGate,
    "atlas_mal": AtlasMixer,
    "deep_transformer": DualMixer,
    "swdt": DualMixer,
    "dot": DualMixer,
}


def build_mixer(cfg: ModelConfig) -> nn.Module:
    """The block's first mixer for a resolved config."""
    return MIXER_BUILDERS[cfg.mixer](cfg)
