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
# Relative L2 error against float64 that each operand precision may reach (output and gradient): the probe's bound,
# and the benchmark's.
PROBE_TOLERANCE = {"ieee": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
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
def _kernel_forward_backward(one: torch.Tensor, steps: int, upstream: torch.Tensor):
    """The kernel's output and input gradient for one matrix and an upstream gradient (ops called directly)."""
    out, iterates = torch.ops.atlas_train.newton_schulz_saving(one, steps, _ns_precision)
    grad = torch.ops.atlas_train.newton_schulz_backward(one, iterates, upstream, steps, _ns_precision)
    return out, grad


def _reference_forward_backward(one: torch.Tensor, steps: int, upstream: torch.Tensor):
    """The PyTorch path's output and input gradient in float64 on the CPU (where no kernel is dispatched)."""
    from atlas_train.ops.newton_schulz import newton_schulz as torch_newton_schulz

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaf = one.detach().double().cpu().requires_grad_()
        out = torch_newton_schulz(leaf, steps)
        (grad,) = torch.autograd.grad(out, leaf, upstream.double().cpu())
    return out.detach(), grad


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 on the CPU; NaN or inf in `got` gives NaN or inf, which fails any bound."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@torch.compiler.disable  # runs eagerly even when the caller is being compiled
def _probe_newton_schulz(s: torch.Tensor, steps: int) -> str | None:
    """Run the kernel forward and backward on one random matrix shaped like s's and compare both with the float64
    PyTorch path: the reason to fall back (failed to run, or disagrees beyond PROBE_TOLERANCE), or None.

    Checking the numbers, not only that it runs, guards against a compiler that miscompiles the kernel on some GPU
    (GPU.md: Triton 3.6 on Hopper). The kernel ops are called outside autograd and the reference's autograd under
    identity hooks: the probe may run inside an activation-checkpointed forward, whose saved-tensor bookkeeping must
    see the same tensors when that forward is recomputed.
    """
    key = (tuple(s.shape[-2:]), s.dtype, s.device, _ns_precision, steps)
    if key not in _probed:
        one = torch.randn(1, *s.shape[-2:], device=s.device, dtype=s.dtype)
        upstream = torch.randn_like(one)
        try:
            out, grad = _kernel_forward_backward(one, steps, upstream)
        except Exception as exc:  # noqa: BLE001 — any compile/launch failure means: use the PyTorch path
            _probed[key] = f"kernel failed to run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return _probed[key]
        ref_out, ref_grad = _reference_forward_backward(one, steps, upstream)
        error = max(relative_error(out, ref_out), relative_error(grad, ref_grad))
        bound = PROBE_TOLERANCE[_ns_precision]
        _probed[key] = None if error <= bound else (
            f"kernel disagrees with the PyTorch path on a random {tuple(s.shape[-2:])} matrix: relative error "
            f"{error:.1e} > {bound:.0e} ({_ns_precision})")
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
