"""`train.micro_batch_size: auto`: the largest micro-batch that fits the device, found by a short probe at start-up.

The probe runs one forward + backward of the model (as it will train: same dtype, recompute and fused-loss settings)
on random tokens at growing micro-batches, powers of two that divide the rows each data-parallel rank owes a global
batch, and records the peak memory of each. What the engine adds later is estimated, not probed: the fp32 master
weights and the two AdamW moments (12 bytes per parameter, divided over the data-parallel ranks by ZeRO ≥ 1) and the
fp32 gradient buffer (4 bytes per parameter, divided by ZeRO ≥ 2). A micro-batch is kept when its peak plus that
estimate stays under the budget (a fraction of the device's memory). The probe stops at the first out-of-memory or
at the first size over budget, so it costs one step per doubling. Gradient accumulation then keeps the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from atlas_train.ops.cuda_graphs import clear_scan_graphs


class ProbeError(RuntimeError):
    """Not even the smallest micro-batch fits (reported as one line)."""


@dataclass(frozen=True)
class ProbeResult:
    micro_batch_size: int
    peak_gib: dict[int, float]  # micro-batch -> probed peak (GiB), those that ran
    engine_gib: float  # the estimate added for master weights, moments and gradients
    budget_gib: float

    def describe(self) -> str:
        peaks = ", ".join(f"{mb}: {gib:.1f}" for mb, gib in self.peak_gib.items())
        return (f"micro_batch_size auto -> {self.micro_batch_size} (probed peak GiB by micro-batch {peaks}; "
                f"+{self.engine_gib:.1f} GiB for optimizer state; budget {self.budget_gib:.1f} GiB)")


def candidates(rows_per_rank: int) -> list[int]:
    """Powers of two that divide the rows a data-parallel rank owes one optimizer step, smallest first."""
    sizes, mb = [], 1
    while mb <= rows_per_rank:
        if rows_per_rank % mb == 0:
            sizes.append(mb)
        mb *= 2
    return sizes


def engine_state_bytes(n_params: int, zero_stage: int, dp_size: int) -> float:
    """Bytes the DeepSpeed engine adds per device: fp32 master + AdamW moments, and the fp32 gradient buffer."""
    optimizer = 12.0 * n_params / (dp_size if zero_stage >= 1 else 1)
    gradients = 4.0 * n_params / (dp_size if zero_stage >= 2 else 1)
    return optimizer + gradients


def probe_micro_batch(run_step: Callable[[int], float], sizes: list[int], *, budget_bytes: float,
                      engine_bytes: float) -> ProbeResult:
    """The largest of `sizes` whose one forward + backward fits; raises when not even the first does.

    `run_step(mb)` runs that step and returns its peak memory in bytes, leaving nothing behind, or raises
    torch.cuda.OutOfMemoryError.
    """
    peaks: dict[int, float] = {}
    best = None
    for mb in sizes:
        try:
            peak = run_step(mb)
        except torch.cuda.OutOfMemoryError:
            break
        peaks[mb] = peak / 2**30
        if peak + engine_bytes > budget_bytes:
            break
        best = mb
    if best is None:
        raise ProbeError(
            f"micro_batch_size auto: not even micro-batch {sizes[0]} fits in {budget_bytes / 2**30:.1f} GiB "
            f"(probed peak GiB {peaks or 'out of memory'}); use a shorter train.seq_len, more recompute "
            "(train.activation_checkpointing=full) or more devices"
        )
    return ProbeResult(best, peaks, engine_bytes / 2**30, budget_bytes / 2**30)


def model_step_runner(model: torch.nn.Module, seq_len: int, vocab_size: int,
                      device: torch.device) -> Callable[[int], float]:
    """`run_step` for the probe: one forward + backward of `model` (on `device`, in its training dtype) on random
    tokens, returning the peak memory it took and leaving no gradients behind."""

    gen = torch.Generator(device).manual_seed(0)  # the run's own random streams stay untouched

    def run(mb: int) -> float:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            ids = torch.randint(0, vocab_size, (mb, seq_len + 1), device=device, generator=gen)
            model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
            return float(torch.cuda.max_memory_allocated(device))
        finally:
            model.zero_grad(set_to_none=True)
            clear_scan_graphs()  # graphs captured at this size would hold their memory pools for the whole run
            torch.cuda.empty_cache()

    return run


def batch_layout(tc, dp_size: int, probe: Callable[[list[int]], int]) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for `tc` on `dp_size` data-parallel ranks.

    Without `global_batch_size` both are as configured. With it, every rank owes global / dp rows per optimizer
    step, cut into micro-batches of the configured size, or of the size `probe(candidates)` picks for `auto`.
    """
    if tc.global_batch_size is None:
        return tc.micro_batch_size, tc.grad_accum
    rows, rest = divmod(tc.global_batch_size, dp_size)
    if rest:
        raise ProbeError(f"train.global_batch_size {tc.global_batch_size} does not split over {dp_size} "
                         "data-parallel ranks")
    micro = probe(candidates(rows)) if tc.micro_batch_size == "auto" else tc.micro_batch_size
    if rows % micro:
        raise ProbeError(f"train.micro_batch_size {micro} does not divide the {rows} rows each of {dp_size} "
                         f"data-parallel ranks owes train.global_batch_size {tc.global_batch_size}")
    return micro, rows // micro
