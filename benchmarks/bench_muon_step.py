"""The chunk update's closing Muon step alone on one device: the fused kernel (kernels/muon_step_kernel.py) against
the unfused step (ops/muon_step.py's PyTorch composition: the outer sum, the gated sums, Newton–Schulz on its
dispatched fast path), forward and forward+backward, at the shapes of the chunk scan.

    python benchmarks/bench_muon_step.py     # on one GPU: W1 and W2 of dh 64 and 128, at 128 chains (4K) and 32 (16K)

Why: the scan's rows (`bench_memory_scan.py --variants graphs graphs+muon`) show what the step buys in a whole chunk;
this is the roofline of the step itself, as issue 20 asks of each kernel: achieved TFLOP/s (G's product and NS's) and
GB/s (the step's inputs and outputs, each moved once) against the bf16 matmul ceiling and the copy bandwidth
measured in the same call, and each path's worst error against float64 over M', A' and every input gradient.
A bf16 model's precisions (G's products tf32, NS bf16); on CPU (smoke run) tiny shapes in the interpreter, exact. The
table comes last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # CPU smoke run: the kernel runs in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_memory_scan import copy_bandwidth, matmul_ceiling, ns_flops, time_fn, worst_of  # noqa: E402

import atlas_train.kernels.muon_step_kernel as muon_kernel  # noqa: E402
from atlas_train.kernels.dispatch import muon_step_results, random_muon_step  # noqa: E402
from atlas_train.ops.muon_step import muon_step_reference  # noqa: E402
from atlas_train.ops.precision import scan_precision  # noqa: E402

NS_STEPS, KEYS = 5, 127  # c = 64, chunk 64
SHAPES = [(64, 256), (256, 128), (128, 512), (512, 256)]  # (out, in): W1 and W2 of dh 64, then of dh 128
CHAINS = (128, 32)  # B·H at 4K and at 16K (32K tokens per step, 16 heads)


def step_flops(keys: int, n_out: int, n_in: int, backward: bool) -> int:
    """Algorithmic FLOPs of one chain's step: G's product (and in backward the factors' two), NS forward (and
    backward)."""
    forward, ns_backward = ns_flops(n_out, n_in, NS_STEPS)
    product = 2 * keys * n_out * n_in
    return product + forward + (2 * product + ns_backward if backward else 0)


def step_bytes(keys: int, n_out: int, n_in: int, backward: bool) -> int:
    """float32 bytes one chain's step must move at least: forward reads coef, the factors, M and A and writes M' and
    A'; backward reads them and the two upstream gradients again and writes the gradients of every input."""
    inputs = keys * (1 + n_out + n_in) + 2 * n_out * n_in
    forward = inputs + 2 * n_out * n_in
    return 4 * (forward + (forward + 2 * n_out * n_in + inputs if backward else 0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    keys, shapes, chains_list = (KEYS, SHAPES, CHAINS) if on_gpu else (7, [(6, 10), (12, 5)], (2,))
    product, precision = ("tf32", "bf16") if on_gpu else ("ieee", "ieee")
    ceiling, bandwidth = matmul_ceiling(device), copy_bandwidth(device)
    rows = [f"== the chunk update's Muon step, K={keys}, ns={NS_STEPS}, G's products {product}, NS {precision}; "
            f"roofs in this call: {ceiling:.3g} TFLOP/s (matmul), {bandwidth:.0f} GB/s (copy) ==",
            f"{'path':<9} {'chains':>6} {'out x in':<9} {'fwd ms':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} "
            f"{'% matmul':>8} {'GB/s':>7} {'% copy':>7} {'error':>9}"]

    def unfused(*tensors):
        with scan_precision(device, half_inputs=on_gpu):  # the scan's context: its products' precision on a GPU
            return muon_step_reference(*tensors, NS_STEPS, on_gpu)

    paths = [("unfused", unfused), ("fused", lambda *t: muon_kernel.muon_step(*t, NS_STEPS, product, precision))]
    for chains in chains_list:
        for n_out, n_in in shapes:
            inputs, upstream = random_muon_step(chains, 1, keys, n_out, n_in, prior=False, device=device,
                                                dtype=torch.float32)
            want = muon_step_results([None if t is None else t.double().cpu() for t in inputs],
                                     [u.double().cpu() for u in upstream], NS_STEPS, kernel=False)
            for name, fn in paths:
                leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
                targets = [t for t in leaves if t is not None]
                cells = []
                try:
                    for backward in (False, True):
                        def step():
                            out = fn(*leaves)
                            if backward:
                                return list(out) + list(torch.autograd.grad(out, targets, upstream))
                            return out
                        step()  # warm-up and compilation
                        cells.append(time_fn(step, device, 7))
                    error = worst_of([t.detach() for t in step()], want)[1]
                except Exception as exc:  # noqa: BLE001 — one failing row must not stop the others
                    rows.append(f"{name:<9} {chains:>6} {f'{n_out}x{n_in}':<9} {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:60] if str(exc) else ''}")
                    print(rows[-1], flush=True)
                    continue
                tflops = chains * step_flops(keys, n_out, n_in, True) / cells[1] / 1e12
                gbs = chains * step_bytes(keys, n_out, n_in, True) / cells[1] / 1e9
                rows.append(f"{name:<9} {chains:>6} {f'{n_out}x{n_in}':<9} {cells[0] * 1e3:8.3f} "
                            f"{cells[1] * 1e3:11.3f} {tflops:8.2f} {100 * tflops / ceiling:7.1f}% {gbs:7.0f} "
                            f"{100 * gbs / bandwidth:6.1f}% {error:9.2e}")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
