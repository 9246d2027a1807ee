"""The scan's precision: its math in float32 (float64 for float64 inputs) whatever the model's dtype or the caller's
autocast, and on a GPU the operand precision that the registered fast paths give its float32 products."""

from __future__ import annotations

import contextlib

import torch

from atlas_train.ops.registry import fast_path


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan computes and keeps its state in for inputs of `dtype` (docs/math.md §3.7)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_half(dtype: torch.dtype) -> bool:
    """Whether a model computing in `dtype` runs in half precision (what `newton_schulz`'s half_inputs means)."""
    return dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def scan_precision(device: torch.device, half_inputs: bool):
    """Autocast off inside the scan: its math is float32 (float64; docs/math.md §3.7), whatever the caller's
    autocast, and the recompute in backward (which runs outside the caller's autocast) then repeats the forward
    exactly. On the GPU its float32 products take the fast paths' operand precision for the model's dtype, also
    whatever the caller set (the fast path "scan_products" of the registry: the kernels give tf32 to a bf16/fp16
    model by default)."""
    products = contextlib.nullcontext()
    if device.type == "cuda":
        products = fast_path("scan_products", half_inputs) or products
    with torch.autocast(device_type=device.type, enabled=False), products:
        yield
