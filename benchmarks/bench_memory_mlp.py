"""The memory MLP kernel's token pass alone, at the chunk scan's production shape (B·H = 128 chains, dh 64: D = 128,
dv = 64, hidden 256, LayerNorm, tf32), forward and forward+backward, under each launch setting of MLP_SWEEP
(bench_memory_scan.py, whose --mlp-setting runs the whole scan under one).

    python benchmarks/bench_memory_mlp.py            # the kernel as configured, and PyTorch's pass
    python benchmarks/bench_memory_mlp.py --sweep    # + the kernel under each setting of MLP_SWEEP

Why: at B·H = 128 the kernel's two passes per chunk (window gradients of the c − 1 + L keys, reads of the L queries)
take about a quarter of the chunk scan's device time, at a small fraction of the tensor cores' rate, and its tile
constants were chosen to fit shared memory, not timed. Each row also gives the traffic floor: the weights read once
per program and the tokens' inputs and outputs moved once, at the card's copy bandwidth measured here; and the
worst relative error of its outputs and gradients against PyTorch's pass. The table comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from unittest import mock

import torch

if not torch.cuda.is_available():  # CPU smoke run: the kernel runs in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_memory_scan import MLP_SWEEP, copy_bandwidth, time_fn, worst_of  # noqa: E402

import atlas_train.kernels.memory_mlp_kernel as mlp_kernel  # noqa: E402
from atlas_train.kernels import dispatch  # noqa: E402
from atlas_train.kernels.dispatch import memory_mlp_pass_results, random_memory_mlp_pass  # noqa: E402
from atlas_train.ops.memory_mlp import loss_gradient_factors, memory_forward  # noqa: E402

CHAINS, WINDOW, CHUNK = 128, 64, 64
DIM, DV, HIDDEN = 128, 64, 256
ERROR_BOUND = {"ieee": 1e-4, "tf32": 1e-2}  # against PyTorch's float32 pass: a setting above it is not a candidate


def run_pass(inputs: dict, upstream: list, factors: bool, kernel: bool, backward: bool):
    """One token pass: the kernel's or PyTorch's (the memory MLP kernel switched off), with its backward (then its
    outputs and gradients are returned) or not."""
    loss = "l2" if factors else None
    setting = dispatch.settings()[2]
    dispatch.set_memory_mlp_kernel(kernel)
    try:
        if backward:
            return memory_mlp_pass_results(**inputs, loss=loss, upstream=upstream, kernel=kernel)
        elif kernel:
            mlp_kernel.memory_mlp_pass(inputs["z"], inputs["w1"], inputs["w2"], inputs["ln"], v=inputs["v"], loss=loss,
                                       precision=dispatch.memory_mlp_precision())
        else:
            weights = {"W1": inputs["w1"], "W2": inputs["w2"]}
            memory_forward(weights, inputs["z"], inputs["w1"].shape[-2], inputs["ln"])
            if factors:
                loss_gradient_factors(weights, inputs["z"], inputs["v"], inputs["ln"], loss)
    finally:
        dispatch.set_memory_mlp_kernel(setting)
    return None


def sweep(device, precision: str, with_settings: bool) -> tuple[list[str], str]:
    """The table's lines: PyTorch's pass, the kernel, and (with_settings) the kernel under each setting of MLP_SWEEP;
    and the kernel setting (an MLP_SWEEP name, or "default") with the least forward+backward time over both passes
    among those within the error bound."""
    chains, keys, queries, (dim, dv, hidden) = ((CHAINS, WINDOW - 1 + CHUNK, CHUNK, (DIM, DV, HIDDEN))
                                                if device.type == "cuda" else (2, 7, 4, (12, 8, 16)))
    bandwidth = copy_bandwidth(device) * 1e9  # bytes per second
    rows = [f"== memory MLP token pass, B*H={chains}, D={dim}, dv={dv}, hidden={hidden}, LayerNorm, {precision}; "
            f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; ms ==",
            f"{'path':<38} {'pass':<22} {'fwd ms':>8} {'fwd+bwd ms':>11} {'floor fwd ms':>13} {'error':>8}"]
    variants = [("PyTorch", False, {}), ("kernel", True, {})]
    variants += [(f"kernel, {name}", True, patches) for name, patches in (MLP_SWEEP if with_settings else [])]
    totals = {name: 0.0 for name, kernel, _ in variants if kernel}  # fwd+bwd ms over both passes; NaN if one failed
    for tokens, factors in ((keys, True), (queries, False)):
        inputs, upstream, _, _ = random_memory_mlp_pass(dim, dv, hidden, heads=chains, tokens=tokens, with_ln=True,
                                                        factors=factors, device=device, dtype=torch.float32)
        weights = (inputs["w1"].numel() + inputs["w2"].numel()) * 4
        outputs = tokens * chains * (dv + (dv + 2 * hidden if factors else 0)) * 4
        moved = weights + inputs["z"].numel() * 4 + (inputs["v"].numel() * 4 if factors else 0) + outputs
        label = f"{tokens} {'keys, factors' if factors else 'queries, reads'}"
        reference = run_pass(inputs, upstream, factors, False, True)
        for name, kernel, patches in variants:
            cells = []
            for backward in (False, True):
                def step():
                    with mock.patch.multiple(mlp_kernel, **patches) if patches else contextlib.nullcontext():
                        run_pass(inputs, upstream, factors, kernel, backward)
                try:
                    step()  # warm-up and compilation
                    seconds = time_fn(step, device, 7)
                    cells.append(f"{seconds * 1e3:.3f}")
                except Exception as exc:  # noqa: BLE001 — one failing row must not stop the others
                    seconds = math.nan
                    cells.append(f"{type(exc).__name__}")
            try:
                with mock.patch.multiple(mlp_kernel, **patches) if patches else contextlib.nullcontext():
                    error = worst_of(run_pass(inputs, upstream, factors, kernel, True), reference)[1]
            except Exception:  # noqa: BLE001 — the timing cells name the failure
                error = math.nan
            if kernel:
                totals[name] += seconds * 1e3 if error <= ERROR_BOUND[precision] else math.nan
            rows.append(f"{name:<38} {label:<22} {cells[0]:>8} {cells[1]:>11} {moved / bandwidth * 1e3:>13.3f} "
                        f"{error:8.1e}")
            print(rows[-1], flush=True)
    timed = {name: total for name, total in totals.items() if math.isfinite(total)}
    best = min(timed, key=timed.get) if timed else "kernel"
    return rows, "default" if best == "kernel" else best.removeprefix("kernel, ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the kernel under each setting of MLP_SWEEP")
    parser.add_argument("--precision", choices=("ieee", "tf32"), default="tf32",
                        help="the kernel's operand precision (the scan's is tf32; `dispatch.memory_mlp_precision`)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = dispatch.settings()[1]
    dispatch.set_ns_precision(args.precision)  # which sets the memory MLP kernel's
    try:
        rows, best = sweep(device, args.precision, args.sweep)
    finally:
        dispatch.set_ns_precision(setting)
    print("\n" + "\n".join(rows))
    print(f"best setting: {best}")  # gpu_single.sh passes it on to bench_memory_scan.py --mlp-setting
    return 0


if __name__ == "__main__":
    sys.exit(main())
