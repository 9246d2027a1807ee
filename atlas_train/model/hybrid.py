"""atlas_mag: the memory and sliding-window attention read the same input in parallel (docs/math.md §5).

Output = RMSNorm(y_swa) ⊙ sigmoid(RMSNorm(y_mem)): the memory gates what local attention passes on.
(atlas_mal, memory then attention in sequence, is a Block with two mixer sub-layers: see block.py.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.attention import Attention
from atlas_train.model.config import ModelConfig
from atlas_train.model.norms import RMSNorm


def split_cache(cache: Optional[dict], prefix: str) -> Optional[dict]:
    """The entries of a flat cache under `prefix`, with the prefix removed (None when there are none)."""
    if not cache:
        return None
    sub = {key[len(prefix):]: val for key, val in cache.items() if key.startswith(prefix)}
    return sub or None


def join_cache(parts: dict[str, Optional[dict]]) -> dict:
    """Flatten {prefix: cache} into one dict with prefixed keys."""
    return {prefix + key: val for prefix, part in parts.items() if part for key, val in part.items()}


class MemoryAsGate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.memory = AtlasMixer(cfg)
        self.swa = Attention(cfg, window=cfg.swa_window)
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.swa_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                return_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        y_mem, mem_cache = self.memory(x, doc_start, split_cache(cache, "memory."), return_cache)
        y_swa, swa_cache = self.swa(x, doc_start, split_cache(cache, "swa."), return_cache)
        y = self.swa_norm(y_swa) * torch.sigmoid(self.memory_norm(y_mem))
        new_cache = join_cache({"memory.": mem_cache, "swa.": swa_cache}) if return_cache else None
        return y, new_cache
