"""The chunk update's Muon step for one fast-weight matrix (docs/math.md §3.5): the chunk's window gradients summed,
momentum, Newton–Schulz and the weight step,

    M' = θ·M + (prior +) Σ_k coef_k left_k ⊗ right_k,    A' = decay·A + descent·NS(M').

One function because on a GPU it is one fused kernel per direction (the fast path "muon_step",
kernels/muon_step_kernel.py), which the chunk scan reaches through this module's attribute (tests stand the kernel
in for it on CPU); elsewhere, or where the fast path declines, it is the PyTorch composition below.
"""

from __future__ import annotations

from atlas_train.ops import outer_sums
from atlas_train.ops.gated_sum import gated_sum
from atlas_train.ops.newton_schulz import newton_schulz
from atlas_train.ops.registry import fast_path


def muon_step_reference(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps: int,
                        half_inputs: bool):
    """(M', A') in PyTorch ops (NS by its own fast path where one applies): coef (B, H, K), left (B, H, K, out),
    right (B, H, K, in), prior None or (B, H, out, in), momentum and anchor (B|1, H, out, in), gates (B|1, H, 1, 1)."""
    grad_sum = outer_sums.outer_sum_of_keys(coef, left, right)
    if prior is not None:
        grad_sum = prior + grad_sum
    momentum = gated_sum(momentum_gate, momentum, grad_sum)
    return momentum, gated_sum(descent, newton_schulz(momentum, steps, half_inputs), anchor, decay)


def muon_step(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps: int,
              half_inputs: bool):
    """`muon_step_reference`'s (M', A') by the registered fast path on CUDA where it takes the step, else by
    PyTorch."""
    if coef.is_cuda:
        fast = fast_path("muon_step", coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay,
                         steps, half_inputs)
        if fast is not None:
            return fast
    return muon_step_reference(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps,
                               half_inputs)
