"""atlas_train.model: the ATLAS model family (docs/math.md §§1, 2, 4, 5).

`build_model(cfg)` is the one entry point; `AtlasLM.forward(input_ids, doc_start, labels, cache, use_cache)`
trains, prefills and decodes.
"""

from __future__ import annotations

from atlas_train.model.config import MIXERS, ModelConfig
from atlas_train.model.lm import AtlasLM, LMOutput


def build_model(cfg: ModelConfig) -> AtlasLM:
    """An AtlasLM for cfg with the family defaults of cfg.mixer filled in (cfg itself is not modified)."""
    cfg.validate()
    resolved = cfg.resolved()
    resolved.validate()
    return AtlasLM(resolved)


__all__ = ["AtlasLM", "LMOutput", "MIXERS", "ModelConfig", "build_model"]
