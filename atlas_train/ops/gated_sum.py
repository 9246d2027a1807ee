"""a·x + b·y for fast-weight matrices x, y (B, H, out, in) and per-chain gates a, b (B, H, 1, 1): the chunk update's
momentum (θ̄·M + G) and weight step (ᾱ·W − η̄·NS(M)).

At the production shape (B·H = 128 chains) the chunk scan is bound by the bytes it moves over the fast weights, not
by arithmetic. Autograd's backward of the broadcast products writes a weight-sized product for each gate's gradient
and then sums it (and addcmul's backward scales the large operand once more by its `value`); here each gate's
gradient is one batched dot product that reads its two operands and writes a number per chain, and the forward is a
single addcmul pass where b is absent (1).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def gated_sum(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """a·x + b·y (b = 1 when None), differentiable in every tensor."""
    return _GatedSum.apply(a, x, y, b)


def _dot(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ g ⊙ x over the last two dims, as (B, H, 1, 1): one batched product that reads both and writes one number
    per chain (in the scan's product precision, like its other products)."""
    lead, x = g.shape[:-2], x.expand_as(g)
    flat_g, flat_x = g.reshape(-1, 1, g.shape[-2] * g.shape[-1]), x.reshape(-1, x.shape[-2] * x.shape[-1], 1)
    return torch.bmm(flat_g, flat_x).view(*lead, 1, 1)


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
