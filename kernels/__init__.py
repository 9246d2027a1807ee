"""Triton kernels for memory_scan (imported as atlas_train.kernels; never `import kernels`).

What is a kernel today: the batched Newton–Schulz step with its backward (`newton_schulz`), beside a cuBLAS path for
the larger matrices (`newton_schulz_cublas`); and the memory MLP's token pass (reads and inner-loss gradient factors
of a chunk's tokens at shared weights, forward and second-order backward: `memory_mlp_kernel`), on by default
where it covers the pass; and the token update's weighted sums of outer products (its per-token momenta, and in
backward the gradient of its per-token updates: `token_momenta_kernel`); and the chunk update's closing Muon step
(window gradients summed, momentum, Newton–Schulz, weight step) fused into one kernel per direction
(`muon_step_kernel`), off by default until timed. `dispatch` decides per call which fast path
applies and notes once why one does not.

The ops never import this package: `register` (the entry point of the group "atlas_train.fast_paths", pyproject.toml)
hands dispatch's fast paths to `atlas_train.ops.registry`, which loads it on the ops' first lookup.
"""

from atlas_train.kernels.dispatch import (
    newton_schulz_or_none,
    note_fallback,
    register,
    set_kernels_enabled,
    set_memory_mlp_kernel,
    set_ns_precision,
)
from atlas_train.kernels.newton_schulz_kernel import newton_schulz, newton_schulz_unsupported

__all__ = ["newton_schulz", "newton_schulz_unsupported", "newton_schulz_or_none", "note_fallback", "register",
           "set_ns_precision", "set_kernels_enabled", "set_memory_mlp_kernel"]
