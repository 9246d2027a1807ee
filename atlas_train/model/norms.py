"""RMSNorm layers: the project's own (megatron's torch LayerNorm refuses sequence parallelism)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable gain (Llama style, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's dh values with its own gain per head.

    The gain is stored flat (H·dh,) in head-major order, so tensor parallelism splits it with the heads and no
    replicated parameter needs a cross-rank gradient reduction.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.eps = n_heads, head_dim, eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y (..., H, dh) -> same shape."""
        gain = self.weight.view(-1, self.head_dim)
        return F.rms_norm(y, (self.head_dim,), None, self.eps) * gain
