"""Rotary position embedding from absolute positions.

The angles are computed in float32 (float64 for float64 inputs), never taken from a parameter-dtype buffer, so a
model cast to bf16 keeps exact angles and any absolute position (a decode cache's `pos`) is valid.

Calls without a cache (training, prefill) rotate positions 0..T-1: their cos and sin come from a `RotaryTable`, made
when the model is built and shared by its attention layers (`share_rotary_tables`). Computed inside a compiled block
instead, Inductor fuses the angles' pow, cos and sin into the kernels that rotate q and k and evaluates them again for
every element, forward and backward; read from the table, those kernels are a multiply-add. The table is a
(non-persistent) buffer, so a compiled block takes it as an input, in one graph, and it moves with the model; a cast
of the model recomputes it rather than rounding it.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the rotation is computed in for inputs of `x_dtype`."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def rope_cos_sin(positions: torch.Tensor, half: int, theta: float, dtype: torch.dtype):
    """cos and sin (T, half) of the angles of `positions` (T,) int64."""
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq
    return angles.cos(), angles.sin()


class RotaryTable(nn.Module):
    """cos and sin (length, half) of positions 0..length-1 in `rope_dtype` of the module's dtype: float32 in a bf16 or
    float32 model, float64 in a float64 one. Every move or cast of the module computes them again where they land
    (exact in their dtype, and never left uninitialised by `to_empty`)."""

    def __init__(self, length: int, half: int, theta: float):
        super().__init__()
        self.length, self.half, self.theta = length, half, theta
        cos, sin = rope_cos_sin(torch.arange(length), half, theta, torch.float32)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def lookup(self, length: int, dtype: torch.dtype):
        """(cos, sin) of positions 0..length-1 for inputs of `dtype`, or None where the table does not hold them."""
        if length > self.length or self.cos.dtype != rope_dtype(dtype):
            return None
        return self.cos[:length], self.sin[:length]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        positions = torch.arange(self.length, device=self.cos.device)
        self.cos, self.sin = rope_cos_sin(positions, self.half, self.theta, rope_dtype(self.cos.dtype))
        return self


def share_rotary_tables(model: nn.Module) -> None:
    """Give every attention layer of `model` with the same table settings one RotaryTable: a table for each layer
    would hold the same numbers n_layers times (about 130 MB each at 512K positions and head dim 64)."""
    shared: dict[tuple, RotaryTable] = {}
    for module in list(model.modules()):
        table = getattr(module, "rope", None)
        if isinstance(table, RotaryTable):
            module.rope = shared.setdefault((table.length, table.half, table.theta), table)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, dh) by angles with these cos and sin (T, dh/2) (rotate-half convention)."""
    half = x.shape[-1] // 2
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
