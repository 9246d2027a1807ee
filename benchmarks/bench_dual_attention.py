"""The dual scan's attention passes alone (kernels/dual_attention_kernel.py), at issue 22's production shape (B·H = 128,
T = 4K, dh 64, value dimension hid = 256), forward and each backward kernel, under the launch settings of SWEEP.

    python benchmarks/bench_dual_attention.py            # the kernel as configured
    python benchmarks/bench_dual_attention.py --sweep    # + the kernel under each setting of SWEEP

Why: the passes are a third of the dual scan's device time at this shape (the reads' backward kernels alone about 25
ms each), at a small fraction of the tensor cores' rate, and their launch constants were never timed. Two passes, as
the scan runs them: the reads (every query over the keys final before its chunk: causal by chunks of 64, less the
window's 63 keys) and one chunk's anchor pass (its 127 window keys over the 2K keys written before a chunk in the
middle of the sequence). Each row gives the time of the forward and of each backward kernel, the pass's achieved
TFLOP/s (the products' FLOPs over the keys each point sees) and its worst relative error against PyTorch's pass in
float32; the script names the setting with the least total time (reads and anchor pass, forward + backward) within
the error bound. The table comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU smoke run: the kernel runs in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_memory_scan import time_fn, worst_of  # noqa: E402

import atlas_train.kernels.dual_attention_kernel as kernel  # noqa: E402
from atlas_train.ops.dual_attention import TORCH  # noqa: E402

CHUNK, WINDOW = 64, 64
BOUND = {"bf16": 2e-2, "tf32": 1e-2, "ieee": 1e-4}  # relative L2 against PyTorch's float32 pass

# Launch settings (module constants of dual_attention_kernel) timed by --sweep, and applied to a whole dual scan by
# bench_dual_scan.py --attention-setting.
SWEEP = [("points 128", dict(BLOCK={"points": 128, "keys": 64, "values": 128})),
         ("keys 128", dict(BLOCK={"points": 64, "keys": 128, "values": 128})),
         ("values 256", dict(BLOCK={"points": 64, "keys": 64, "values": 256})),
         ("values 64", dict(BLOCK={"points": 64, "keys": 64, "values": 64})),
         ("points 128, values 256", dict(BLOCK={"points": 128, "keys": 64, "values": 256})),
         ("4 warps", dict(NUM_WARPS={"forward": 4, "dv": 4, "dk": 4, "dx": 4})),
         ("8 warps", dict(NUM_WARPS={"forward": 8, "dv": 8, "dk": 8, "dx": 8})),
         ("2 stages", dict(NUM_STAGES={"forward": 2, "dv": 2, "dk": 2, "dx": 2})),
         ("4 stages", dict(NUM_STAGES={"forward": 4, "dv": 4, "dk": 4, "dx": 4})),
         ("points 128, 8 warps", dict(BLOCK={"points": 128, "keys": 64, "values": 128},
                                      NUM_WARPS={"forward": 8, "dv": 8, "dk": 8, "dx": 8}))]


def setting(patches: dict):
    """The kernel module's constants replaced by `patches` inside the block."""
    return mock.patch.multiple(kernel, **patches) if patches else contextlib.nullcontext()


def pass_inputs(kind: str, batch: int, heads: int, length: int, dh: int, device) -> tuple[dict, torch.Tensor, int]:
    """(the pass's arguments, an upstream gradient, the (point, key) pairs it computes) for the reads or an anchor
    pass, one document, θ = √dh (the scale's initial value)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    hid, past = 4 * dh, WINDOW - 1
    if kind == "reads":
        points, keys = length, length
        lim = ((torch.arange(points, device=device) // CHUNK) * CHUNK - past).clamp(min=0)
    else:
        points, keys = CHUNK + past, length // 2
        lim = torch.full((points,), keys, device=device)
    inputs = dict(x=F.normalize(randn(batch, heads, points, dh), dim=-1),
                  k=F.normalize(randn(batch, heads, keys, dh), dim=-1), v=randn(batch, heads, keys, hid), lim=lim,
                  x_doc=torch.zeros(batch, points, dtype=torch.long, device=device),
                  k_doc=torch.zeros(batch, keys, dtype=torch.long, device=device), kind="exp",
                  theta=torch.full((heads,), math.sqrt(dh), device=device))
    return inputs, randn(batch, heads, points, hid), int(lim.sum()) * batch * heads


def run_kernels(inputs: dict, grad: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """out, then dx, dk, dv, dθ of one pass on the kernel."""
    out = kernel.dual_attention_forward(**inputs, precision=precision)
    return [out, *kernel.dual_attention_backward(**inputs, grad_out=grad, need_v=True, precision=precision)]


def time_pass(inputs: dict, grad: torch.Tensor, precision: str, device, reps: int) -> tuple[float, float]:
    """(forward, forward + backward) median seconds."""
    def forward():
        kernel.dual_attention_forward(**inputs, precision=precision)

    def both():
        run_kernels(inputs, grad, precision)

    forward(), both()  # compile
    return time_fn(forward, device, reps), time_fn(both, device, reps)


def sweep(args, device) -> tuple[list[str], str]:
    shape = ((args.batch, args.heads, args.length, args.dh) if device.type == "cuda" else (1, 2, 256, 16))
    variants = [("kernel", {})] + (SWEEP if args.sweep else [])
    rows = [f"== dual attention passes, B={shape[0]} H={shape[1]} T={shape[2]} dh={shape[3]} value dim {4 * shape[3]}, "
            f"{args.precision} products; ms ==",
            f"{'setting':<26} {'pass':<7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'error':>8}"]
    totals = {name: 0.0 for name, _ in variants}
    for kind in ("reads", "anchor"):
        inputs, grad, pairs = pass_inputs(kind, *shape, device)
        reference = [TORCH.forward(**inputs), *TORCH.backward(**inputs, grad_out=grad, need_v=True)]  # by blocks
        dims = shape[3]
        # forward: z (2·dh) and the values (2·hid) per pair; backward: z, dP (2·hid), dv (2·hid), dk and dx (2·dh each)
        flops = pairs * (2 * dims + 2 * 4 * dims), pairs * (2 * dims + 4 * 4 * dims + 4 * dims)
        for name, patches in variants:
            try:
                with setting(patches):
                    fwd, both = time_pass(inputs, grad, args.precision, device, args.reps)
                    results = run_kernels(inputs, grad, args.precision)
                    error = worst_of(results, reference)[1]
            except Exception as exc:  # noqa: BLE001 — one failing setting must not stop the others
                rows.append(f"{name:<26} {kind:<7} {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
                totals[name] = math.nan
                print(rows[-1], flush=True)
                continue
            totals[name] += both * 1e3 if error <= BOUND[args.precision] else math.nan
            rate = (flops[0] + flops[1]) / both / 1e12
            rows.append(f"{name:<26} {kind:<7} {fwd * 1e3:8.3f} {both * 1e3:11.3f} {rate:8.1f} {error:8.1e}")
            print(rows[-1], flush=True)
    timed = {name: total for name, total in totals.items() if math.isfinite(total)}
    best = min(timed, key=timed.get) if timed else "kernel"
    return rows, "default" if best == "kernel" else best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time the kernel under each setting of SWEEP")
    p.add_argument("--precision", choices=("ieee", "tf32", "bf16"), default="bf16", help="the kernel's products")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dh", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.precision, args.reps = "ieee", 1
    rows, best = sweep(args, device)
    print("\n" + "\n".join(rows))
    print(f"best setting: {best}")  # gpu_single.sh passes it on to bench_dual_scan.py --attention-setting
    return 0


if __name__ == "__main__":
    sys.exit(main())
