"""a·x + b·y for fast-weight matrices x, y (B, H, out, in) and per-chain gates a, b (B, H, 1, 1): the chunk update's
momentum (θ̄·M + G) and weight step (ᾱ·W − η̄·NS(M)).

At the production shape (B·H = 128 chains) the chunk scan is bound by the bytes it moves over the fast weights, not
by arithmetic. Autograd's form of these sums moves more of them: its forward is a product and a sum (two passes where
b is absent, here one addcmul), and addcmul's backward scales the large operand once more by its `value`. The gates'
gradients are a product and a sum per chain either way."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def gated_sum(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """a·x + b·y (b = 1 when None), differentiable in every tensor."""
    return _GatedSum.apply(a, x, y, b)


def _dot(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ g ⊙ x over the last two dims, as (B, H, 1, 1): a product and a sum, elementwise passes at the copy roof. As
    a batched matrix-vector product (cuBLAS's gemv, one long dot product per chain) it moves half the bytes but, with
    a chain per product, leaves most of the GPU idle (a quarter of the copy roof at B·H = 128)."""
    return (g * x).sum((-2, -1), keepdim=True)


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, y, b):
        ctx.save_for_backward(a, x, y, b)
        return torch.addcmul(y if b is None else b * y, a, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, x, y, b = ctx.saved_tensors
        da = _dot(grad, x) if ctx.needs_input_grad[0] else None
        dx = grad * a if ctx.needs_input_grad[1] else None
        dy = (grad if b is None else grad * b) if ctx.needs_input_grad[2] else None
        db = _dot(grad, y) if b is not None and ctx.needs_input_grad[3] else None
        return _reduce_to(da, a), dx, dy, _reduce_to(db, b)


def _reduce_to(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A gate's gradient in its own shape (a gate may be (1, H, 1, 1) against (B, H, ...) weights)."""
    if grad is None or like is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape)
