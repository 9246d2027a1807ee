"""Choosing between the Triton kernels and the PyTorch path of `atlas_train.ops`, with a one-time note on fallback.

The ops code calls `newton_schulz_or_none`; None means "run your PyTorch path". The first call for each matrix
shape runs the kernel's forward and backward once on a single matrix of that shape, so that a kernel which cannot
compile on this GPU (registers, shared memory) falls back instead of failing mid-training; every reason to fall back
is logged once, so a training log says plainly when (and why) the kernels did not apply.
"""

from __future__ import annotations

import logging

import torch

from atlas_train.kernels.newton_schulz_kernel import PRECISIONS, newton_schulz, newton_schulz_unsupported

log = logging.getLogger(__name__)
_noted: set[str] = set()
_probed: dict[tuple, str | None] = {}  # (shape, dtype, device, precision) -> failure of the probe, None if it ran
_ns_precision = "tf32"
_enabled = True


def set_kernels_enabled(enabled: bool) -> None:
    """Switch the kernels off (or back on) for this process, e.g. to time or check the PyTorch path on a GPU."""
    global _enabled
    _enabled = bool(enabled)


def set_ns_precision(precision: str) -> None:
    """Operand precision of the NS kernel products on the GPU: 'ieee' (fp32), 'tf32' (default) or 'bf16'."""
    global _ns_precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    _ns_precision = precision


def note_fallback(what: str, reason: str) -> None:
    """Log once per (what, reason) that the PyTorch path runs instead of a kernel."""
    key = f"{what}: {reason}"
    if key not in _noted:
        _noted.add(key)
        log.warning("atlas_train.kernels: %s runs on the PyTorch path (%s)", what, reason)


@torch.no_grad()
def _kernel_forward_backward(one: torch.Tensor, steps: int) -> None:
    out, iterates = torch.ops.atlas_train.newton_schulz_saving(one, steps, _ns_precision)
    torch.ops.atlas_train.newton_schulz_backward(one, iterates, torch.ones_like(out), steps, _ns_precision)


@torch.compiler.disable  # runs eagerly even when the caller is being compiled
def _probe_newton_schulz(s: torch.Tensor, steps: int) -> str | None:
    """Run the kernel forward and backward on one matrix shaped like s's; the error's first line if it fails.

    The probe calls the kernel ops directly, outside autograd: it may run inside a model's forward under activation
    checkpointing, whose saved-tensor bookkeeping must see the same tensors when that forward is recomputed.
    """
    key = (tuple(s.shape[-2:]), s.dtype, s.device, _ns_precision, steps)
    if key not in _probed:
        try:
            _kernel_forward_backward(torch.randn(1, *s.shape[-2:], device=s.device, dtype=s.dtype), steps)
            _probed[key] = None
        except Exception as exc:  # noqa: BLE001 — any compile/launch failure means: use the PyTorch path
            _probed[key] = f"kernel failed to run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _probed[key]


def newton_schulz_or_none(s: torch.Tensor, steps: int) -> torch.Tensor | None:
    """NS(s) by the Triton kernel when s is a CUDA tensor the kernel covers, else None (after a one-time note)."""
    if not (_enabled and s.is_cuda):
        return None  # CPU runs, or kernels switched off: the PyTorch path by design, nothing to note
    reason = newton_schulz_unsupported(s, _ns_precision) or _probe_newton_schulz(s, steps)
    if reason is not None:
        note_fallback("Newton-Schulz", reason)
        return None
    return newton_schulz(s, steps, _ns_precision)
