"""The token momenta kernel alone on one device: Triton kernel against the PyTorch path (einsum + addcmul), forward
and forward+backward, at the token update's shapes (B·H = 16, L = 64, K = 127).

    python benchmarks/bench_momenta.py            # tf32 products, W1 and W2 of dh 64, W2 of dh 128
    python benchmarks/bench_momenta.py --sweep    # + the kernel under each launch setting of SWEEP

Why: the scan's profile shows the kernel's share of a step but not what its launch constants buy; this times them
alone. Each shape also reports the traffic floor: writing the momenta once (forward) and reading their gradient four
times (backward) at the card's copy bandwidth, measured here. The table comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

if not torch.cuda.is_available():  # CPU smoke run: the kernel runs in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_memory_scan import copy_bandwidth, time_fn  # noqa: E402

import atlas_train.kernels.token_momenta_kernel as momenta_kernel  # noqa: E402
from atlas_train.kernels.dispatch import random_token_momenta  # noqa: E402
from atlas_train.ops.outer_sums import weighted_outer_sums_reference  # noqa: E402

HEADS, LENGTH, KEYS = 16, 64, 127
SHAPES = [(64, 256), (256, 128), (512, 256)]  # (out, in): W1 and W2 of dh 64, W2 of dh 128
SWEEP = [("forward tiles 128x128", dict(BLOCK={"out": 128, "in": 128, "keys": 32}, NUM_WARPS={
              "forward": 8, "contraction": 8, "mix": 4})),
         ("forward tiles 64x128", dict(BLOCK={"out": 64, "in": 128, "keys": 32})),
         ("forward keys 64", dict(BLOCK={"out": 64, "in": 64, "keys": 64})),
         ("forward 8 warps", dict(NUM_WARPS={"forward": 8, "contraction": 8, "mix": 4})),
         ("dmix 64 rows, 8 warps", dict(MIX_BLOCK_OUT=64, NUM_WARPS={"forward": 4, "contraction": 8, "mix": 8})),
         ("contraction 4 warps", dict(NUM_WARPS={"forward": 4, "contraction": 4, "mix": 4})),
         ("contraction 256 programs", dict(TARGET_PROGRAMS=256)),
         ("contraction 1024 programs", dict(TARGET_PROGRAMS=1024))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the kernel under each setting of SWEEP")
    parser.add_argument("--precision", choices=momenta_kernel.SCAN_PRECISIONS, default="tf32")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads, length, keys, shapes = (HEADS, LENGTH, KEYS, SHAPES) if device.type == "cuda" else (2, 4, 7, [(6, 10)])
    bandwidth = copy_bandwidth(device) * 1e9  # bytes per second
    rows = [f"== token momenta, B*H={heads}, L={length}, K={keys}, {args.precision}; copy bandwidth "
            f"{bandwidth / 1e12:.2f} TB/s; ms forward | forward+backward ==",
            f"{'path':<34} {'out x in':<9} {'fwd ms':>8} {'fwd+bwd ms':>11} {'floor ms':>17}"]
    variants = [("PyTorch (einsum + addcmul)", weighted_outer_sums_reference, {}),
                ("kernel", lambda *t: momenta_kernel.token_momenta(*t, args.precision), {})]
    variants += [(f"kernel, {name}", variants[1][1], patches) for name, patches in (SWEEP if args.sweep else [])]
    for n_out, n_in in shapes:
        *inputs, upstream = random_token_momenta(length, keys, n_out, n_in, heads=heads, device=device,
                                                 dtype=torch.float32)
        size = upstream.numel() * 4
        floor = f"{size / bandwidth * 2e3:.3f} | {5 * size / bandwidth * 2e3:.3f}"  # write once; + read four times
        for name, fn, patches in variants:
            leaves = [t.clone().requires_grad_() for t in inputs]
            cells = []
            for backward in (False, True):
                def step():
                    with mock.patch.multiple(momenta_kernel, **patches) if patches else contextlib.nullcontext():
                        out = fn(*leaves)
                        if backward:
                            torch.autograd.grad(out, leaves, upstream)
                try:
                    step()  # warm-up and compilation
                    cells.append(f"{time_fn(step, device, 7) * 1e3:.3f}")
                except Exception as exc:  # noqa: BLE001 — one failing row must not stop the others
                    cells.append(f"{type(exc).__name__}")
            rows.append(f"{name:<34} {f'{n_out}x{n_in}':<9} {cells[0]:>8} {cells[1]:>11} {floor:>17}")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
