"""Causal depthwise convolution that never reads across a document start and carries its last inputs as a cache."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class CausalDepthwiseConv(nn.Module):
    """y[t, ch] = sum_i weight[ch, i] * x[t - (K-1) + i, ch] over taps inside t's document (no bias).

    The cache is the last K-1 inputs, with those that precede the latest document start already zeroed, so a
    following segment (or a decode step) reads exactly what one long call would have read. Per-channel weights, so
    tensor parallelism shards the channels with the heads.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise filter
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))

    def empty_cache(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[-1])

    def forward(
        self, x: torch.Tensor, doc_start: Optional[torch.Tensor], cache: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), doc_start (B, T) bool or None, cache (B, K-1, C) or None -> (y (B, T, C), new cache)."""
        T, K = x.shape[1], self.kernel_size
        prev = self.empty_cache(x) if cache is None else cache.to(x.dtype)
        xe = torch.cat((prev, x), dim=1)  # (B, T+K-1, C)
        taps = xe.unfold(1, K, 1)  # (B, T, C, K): token t's K inputs, oldest first (a view: two kernels in all)
        if doc_start is None:
            return (taps * self.weight).sum(-1), xe[:, T:]
        # Document index of every extended position; the cached inputs belong to token 0's document.
        seg = torch.cat((doc_start.new_zeros(x.shape[0], K - 1, dtype=torch.long), doc_start.long().cumsum(1)), 1)
        same_doc = seg.unfold(1, K, 1) == seg[:, K - 1 :, None]  # (B, T, K): tap in token t's document
        y = (taps * self.weight * same_doc[:, :, None, :].to(x.dtype)).sum(-1)
        tail = xe[:, T:] * (seg[:, T:] == seg[:, -1:]).to(x.dtype)[..., None]
        return y, tail
