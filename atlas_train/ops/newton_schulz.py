"""Newton–Schulz orthogonalisation (the Muon step), docs/math.md §3.7.

Batched over every leading dimension, so the token update can orthogonalise all momenta of a chunk (B, H, L, rows,
cols) in one matmul chain instead of one small matmul per token.
"""

from __future__ import annotations

import torch

from atlas_train.ops.registry import fast_path

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_NORM_EPS = 1e-7


def newton_schulz(s: torch.Tensor, steps: int, half_inputs: bool = False) -> torch.Tensor:
    """Approximately orthogonalise each matrix in `s` (..., rows, cols); `steps=0` returns `s` unchanged.

    s is float32 or float64 whatever the model's dtype; `half_inputs` says that the model runs in bf16/fp16, where
    docs/math.md lets a fast path take bf16 operands if the tolerance holds (§3.7; the fast path decides)."""
    if steps == 0:
        return s
    if s.is_cuda:  # a registered fast path where it takes s (the kernels note once why they do not)
        out = fast_path("newton_schulz", s, steps, half_inputs)
        if out is not None:
            return out
    a, b, c = NS_COEFFICIENTS
    x = s / (torch.linalg.matrix_norm(s, ord="fro", keepdim=True) + NS_NORM_EPS)
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # one batched matmul chain; baddbmm fuses the polynomial's scalings
    tall = shape[-2] > shape[-1]
    for _ in range(steps):
        # The spec iterates on the wide orientation (Y = Xᵀ for tall X, so Y Yᵀ is the small Gram matrix); for tall
        # X the same step written without transposes is X ← a·X + X·poly(XᵀX), the polynomial being symmetric.
        gram = x.transpose(-1, -2) @ x if tall else x @ x.transpose(-1, -2)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x.reshape(shape)
