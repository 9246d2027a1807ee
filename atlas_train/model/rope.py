"""Rotary position embedding computed from absolute positions on the fly.

The angles are computed in float32 (float64 for float64 inputs) at every call instead of from a buffer, so a model
cast to bf16 keeps exact angles and any absolute position (a decode cache's `pos`) is valid.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (B, T, H, dh) by the angles of `positions` (T,) int64 (rotate-half convention)."""
    half = x.shape[-1] // 2
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq  # (T, half)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x1, x2 = x[..., :half].to(dtype), x[..., half:].to(dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
