"""AtlasCache: the native model's recurrent cache as a transformers `Cache`, so `generate()` carries it.

The native cache is one flat dict per batch (fast weights, momentum, Omega window and conv tails for memory layers;
the KV cache for attention layers). Rows that start at different columns of a left-padded batch cannot share one:
the memory's chunk grid and the positions are shared by the batch. So the cache is a list of groups, each a set of
rows that ran together with its own native cache; an unpadded batch is one group of all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import Cache


@dataclass
class CacheGroup:
    rows: torch.Tensor  # (n,) int64: the batch rows this group holds, in its own row order
    state: dict  # the native model's cache for those rows


def _select_rows(state: dict, index: torch.Tensor) -> dict:
    """Per-sequence entries are batch-major; 0-dim entries (positions) are shared by the rows."""
    return {key: (val.index_select(0, index.to(val.device)) if val.dim() > 0 else val) for key, val in state.items()}


class AtlasCache(Cache):
    """Recurrent state for AtlasForCausalLM; `get_seq_length()` counts the columns consumed, padding included."""

    def __init__(self, groups: Optional[list[CacheGroup]] = None, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.groups = groups or []
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back to an earlier token

    @property
    def batch_size(self) -> int:
        return sum(len(group.rows) for group in self.groups) if self.groups else -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("AtlasCache is a recurrent state and cannot drop tokens (no assisted decoding)")

    def reset(self) -> None:
        self.groups, self.seen_tokens = [], 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Row i of the new batch continues row index[i] of the old one (beam reordering, expansion, selection)."""
        index = index.to(torch.long).cpu()
        size = self.batch_size
        owner = torch.empty(size, dtype=torch.long)
        local = torch.empty(size, dtype=torch.long)
        for g, group in enumerate(self.groups):
            owner[group.rows] = g
            local[group.rows] = torch.arange(len(group.rows))
        groups = []
        for g, group in enumerate(self.groups):
            new_rows = torch.nonzero(owner[index] == g).flatten()
            if len(new_rows):
                groups.append(CacheGroup(new_rows, _select_rows(group.state, local[index[new_rows]])))
        self.groups = groups

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch_size).repeat_interleave(repeats))
