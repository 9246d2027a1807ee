"""Polynomial feature maps φ for the memory's keys and queries (docs/math.md §2).

φ(x) = concat(√a1·x, √a2·ψ2(x), …, √ap·ψp(x)): a truncated Taylor expansion of the exp kernel, which raises the
memory's capacity. The coefficients a_i are learnable per layer, stored softplus-inverse (so a_i > 0 stays
unconstrained for the optimiser) and initialised to 1/i!. `identity` is the plain map (no coefficients): the
"w/o polynomial mapping" ablation and the Titans/DLA baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class FeatureMap(nn.Module):
    def __init__(self, kind: str, n_heads: int, head_dim: int, degree: int = 2, sketch_dim: int | None = None):
        super().__init__()
        self.kind, self.degree, self.head_dim = kind, degree, head_dim
        self.sketch_dim = sketch_dim or head_dim
        if kind == "identity":
            self.out_dim = head_dim
            return
        init = torch.tensor([1.0 / math.factorial(i) for i in range(1, degree + 1)], dtype=torch.float64)
        self.coef_raw = nn.Parameter(_softplus_inverse(init).float())
        if kind == "elementwise":
            self.out_dim = degree * head_dim
        elif kind == "sketch":
            # ψj uses j Gaussian matrices; all degrees' matrices are stacked per head: (H, Σ_{j=2..p} j, r, dh).
            n_mats = sum(range(2, degree + 1))
            self.sketch = nn.Parameter(torch.randn(n_heads, n_mats, self.sketch_dim, head_dim))
            self.out_dim = head_dim + (degree - 1) * self.sketch_dim
        elif kind == "exact":
            if degree != 2:
                raise ValueError("feature_map 'exact' supports poly_degree 2 only")
            rows, cols = torch.triu_indices(head_dim, head_dim)
            self.register_buffer("pair_rows", rows, persistent=False)
            self.register_buffer("pair_cols", cols, persistent=False)
            self.register_buffer("pair_scale", torch.where(rows == cols, 1.0, math.sqrt(2.0)), persistent=False)
            self.out_dim = head_dim + head_dim * (head_dim + 1) // 2
        else:
            raise ValueError(f"unknown feature_map {kind!r}")

    def coefficients(self) -> torch.Tensor:
        """a_1 .. a_p (positive)."""
        return F.softplus(self.coef_raw)

    def _psi(self, x: torch.Tensor, j: int) -> torch.Tensor:
        if self.kind == "elementwise":
            return x**j
        if self.kind == "exact":
            return x[..., self.pair_rows] * x[..., self.pair_cols] * self.pair_scale.to(x.dtype)
        first = sum(range(2, j))  # index of ψj's first matrix in the stack
        mats = self.sketch[:, first : first + j]  # (H, j, r, dh)
        proj = torch.einsum("bthd,hjrd->bthjr", x, mats.to(x.dtype))
        return proj.prod(dim=-2) / math.sqrt(self.sketch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, dh) -> (B, T, H, out_dim); the first dh features are √a1·x (the memory's residual)."""
        if self.kind == "identity":
            return x
        root = self.coefficients().to(x.dtype).sqrt()
        parts = [root[0] * x] + [root[j - 1] * self._psi(x, j) for j in range(2, self.degree + 1)]
        return torch.cat(parts, dim=-1)
