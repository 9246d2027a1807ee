"""The memory's learnable initial fast weights `params` (docs/math.md §3.1): outer-loop parameters shared by all
sequences, from which every document's test-time training starts."""

from __future__ import annotations

import math

import torch
from torch import nn


class FastWeightInit(nn.Module):
    """W1 (H, dv, hid), W2 (H, hid, D), W3 (H, hid, D) when gated, ln_weight/ln_bias (H, dv) when the memory has LN.

    Weights start at N(0, 1/fan_in) so the memory MLP's activations are O(1) whatever its size (a 0.02 init would make
    the pre-LN output tiny and the LN gradient huge). Head-major, so tensor parallelism splits dim 0 with the heads.
    With `persistent` (the DeepTransformers, docs/math.md §8) W2 is in dual form, Σ_p A0_p φ*(K0_p)ᵀ: K0
    (H, persistent, D) Gaussian keys (unit-normalised where used) and A0 (H, persistent, hid) standard normal.
    """

    def __init__(self, n_heads: int, dv: int, hidden: int, in_dim: int, gated: bool, layer_norm: bool,
                 persistent: int | None = None):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(n_heads, dv, hidden) / math.sqrt(hidden))
        if persistent is not None:
            self.K0 = nn.Parameter(torch.randn(n_heads, persistent, in_dim))
            self.A0 = nn.Parameter(torch.randn(n_heads, persistent, hidden))
        else:
            self.W2 = nn.Parameter(torch.randn(n_heads, hidden, in_dim) / math.sqrt(in_dim))
        if gated:
            self.W3 = nn.Parameter(torch.randn(n_heads, hidden, in_dim) / math.sqrt(in_dim))
        if layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(n_heads, dv))
            self.ln_bias = nn.Parameter(torch.zeros(n_heads, dv))

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The `params` argument of memory_scan (of dual_memory_scan with the mixer's kernel scale added)."""
        return dict(self.named_parameters())
