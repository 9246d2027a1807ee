"""Shared memory and registers of the Triton kernels on Hopper, compiled offline (no GPU needed).

    python benchmarks/kernel_resources.py              # every scan shape x precision; exit 1 if one does not fit
    python benchmarks/kernel_resources.py --kernels mlp --precisions tf32   # the memory MLP's token pass only
    python benchmarks/kernel_resources.py --kernels momenta   # the token momenta only
    python benchmarks/kernel_resources.py --kernels muon      # the chunk update's fused Muon step only

Why offline: a kernel that needs more shared memory than the card has only fails when it is first launched on a GPU
(the dispatcher then falls back to PyTorch). Triton ships ptxas and cuobjdump, so the exact launches that
`newton_schulz` would make are compiled here for sm_90 and their resource usage is read from the cubin.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from atlas_train.kernels import memory_mlp_kernel as mlp
from atlas_train.kernels import muon_step_kernel as muon
from atlas_train.kernels import newton_schulz_kernel as ns
from atlas_train.kernels import token_momenta_kernel as momenta
from atlas_train.kernels.runtime import INTERPRETED
from atlas_train.kernels.triton_common import PRECISIONS, KernelCall

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # opt-in shared memory per block on H100/H200
HOPPER_SM_SHARED_BYTES, HOPPER_SM_REGISTERS, HOPPER_SM_WARPS = 233472, 65536, 64  # per SM, all resident programs
NS_STEPS = 5
# Every NS matrix of memory_scan update=token: W1 is dh x hid, W2 is hid x D (D = dh or 2*dh), hid = 4*dh; the
# kernel takes a short side up to MAX_SHORT_SIDE (hid x 2*dh at dh 256 is 1024 x 512: PyTorch path by design).
SCAN_SHAPES = [(dh, 4 * dh) for dh in (64, 128, 256)] + [(4 * dh, dh) for dh in (64, 128, 256)] + \
              [(4 * dh, 2 * dh) for dh in (64, 128)]
# The memory MLP's token pass at the scan's shapes, (D, dv, hidden) = (2·dh, dh, 4·dh) for dh 64 and 128, plus the
# kernel's widest tiles (256 features, 1024 hidden); one head's keys of a chunk (L + c − 1 = 127 tokens).
MLP_SHAPES = [(128, 64, 256), (256, 128, 512), (256, 256, 1024)]
MLP_TOKENS = 127
# The token momenta's launches, (L, K, out, in): W1 and W2 of dh 64 and W2 of dh 128 with chunks of 64 and c = 64
# (K = 127), and c = 128 (K = 191: the key tile at its widest).
MOMENTA_SHAPES = [(64, 127, 64, 256), (64, 127, 256, 128), (64, 127, 512, 256), (64, 191, 256, 128)]
# The chunk update's fused Muon step, (K, out, in, NS steps): atlas's W1 and W2 of dh 64 and 128 with chunks of 64
# and c = 64, and titans' of dh 64 (no NS: the kernel compiles without it).
MUON_SHAPES = [(127, 64, 256, 5), (127, 256, 128, 5), (127, 128, 512, 5), (127, 512, 256, 5), (127, 64, 256, 0),
               (127, 256, 64, 0)]
KERNELS = ("ns", "mlp", "momenta", "muon")


def compile_offline(call: KernelCall, target: GPUTarget = HOPPER):
    """Compile one KernelCall for `target` as its launch would (same specialisation of arguments: types, 16-byte
    alignment and divisibility, constexprs, options), through the steps of Triton 3.7's JITFunction.run, without a
    device."""
    kernel = call.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*call.args, **call.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, call.meta, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def registers_and_spills(compiled) -> tuple[int, int]:
    """Registers per thread and stack bytes per thread (register spills), read from the cubin by the cuobjdump that
    ships with Triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def _rows(shape, precision: str, calls) -> list[tuple]:
    """Resource rows of (name, KernelCall) launches, each compiled offline."""
    rows = []
    for name, call in calls:
        compiled = compile_offline(call)
        rows.append((shape, precision, name, compiled.metadata.shared, *registers_and_spills(compiled),
                     call.meta["num_warps"], compiled.metadata.num_stages))
    return rows


def _measure(shape_and_precision) -> list[tuple]:
    """Resource rows of the forward and backward launches of one (matrix shape, precision)."""
    (rows, cols), precision = shape_and_precision
    s = torch.empty(1, rows, cols)
    fwd, _, iterates = ns.forward_call(s, NS_STEPS, precision, save=True)
    bwd, _ = ns.backward_call(s, iterates, torch.empty_like(s), NS_STEPS, precision)
    return _rows((rows, cols), precision, [(f"{what} {call.meta['VARIANT']}", call)
                                           for what, call in (("forward", fwd), ("backward", bwd))])


def _measure_mlp(shape_and_precision) -> list[tuple]:
    """Resource rows of the token pass's launches for one (D, dv, hidden) and precision: reads only and with the
    gradient factors, forward and backward, with LayerNorm and the l2 loss (the default memory)."""
    (dim, dv, hidden), precision = shape_and_precision
    z, v = torch.empty(1, 1, MLP_TOKENS, dim), torch.empty(1, 1, MLP_TOKENS, dv)
    w1, w2, ln_w = torch.empty(1, 1, dv, hidden), torch.empty(1, 1, hidden, dim), torch.empty(1, dv)
    calls = []
    for factors in (False, True):
        fwd, _ = mlp.forward_call(z, v if factors else None, w1, w2, ln_w, ln_w, "l2", factors, precision)
        ups = (torch.empty(1, 1, MLP_TOKENS, dv),) * 2 + (torch.empty(1, 1, MLP_TOKENS, hidden),) * 2
        bwd, _ = mlp.backward_call(z, v if factors else None, w1, w2, ln_w, ln_w, *ups, "l2", factors, precision)
        calls += [(f"mlp {what}{' factors' if factors else ''}", call) for what, call in (("forward", fwd),
                                                                                         ("backward", bwd))]
    return _rows(f"{dim}/{dv}/{hidden}", precision, calls)


def _measure_momenta(shape_and_precision) -> list[tuple]:
    """Resource rows of the token momenta's forward and three backward launches for one (L, K, out, in), B·H = 16."""
    (length, keys, n_out, n_in), precision = shape_and_precision
    mix, scale = torch.empty(1, 16, length, keys), torch.empty(1, 16, length)
    left, right = torch.empty(1, 16, keys, n_out), torch.empty(1, 16, keys, n_in)
    prev, grad = torch.empty(1, 16, n_out, n_in), torch.empty(1, 16, length, n_out, n_in)
    calls = [("momenta forward", momenta.forward_call(mix, left, right, scale, prev, precision)[0]),
             ("momenta d right", momenta.contraction_call(mix, left, grad, precision, transpose=False)[0]),
             ("momenta d left", momenta.contraction_call(mix, right, grad, precision, transpose=True)[0]),
             ("momenta d mix", momenta.mix_grad_call(grad, left, right, prev, mix, precision)[0])]
    return _rows(f"{length}/{keys}/{n_out}x{n_in}", precision, calls)


def _measure_muon(shape_and_precision) -> list[tuple]:
    """Resource rows of the fused Muon step's forward and backward launches for one (K, out, in, NS steps) and NS
    precision (G's products in the scan's product precision that goes with it: tf32 beside bf16 NS, else exact),
    B·H = 128."""
    (keys, n_out, n_in, steps), precision = shape_and_precision
    product = "tf32" if precision == "bf16" else "ieee"
    chains = 128
    coef, gates = torch.empty(chains, keys), torch.empty(chains, 3)
    left, right, weights = torch.empty(chains, keys, n_out), torch.empty(chains, keys, n_in), torch.empty(
        chains, n_out, n_in)
    fwd, _, _, x, iterates = muon.forward_call(coef, left, right, None, weights, weights, gates, steps, product,
                                               precision, save=True)
    bwd, _ = muon.backward_call(coef, left, right, weights, weights, gates, weights, x, iterates, weights, weights,
                                steps, product, precision)
    return _rows(f"{keys}/{n_out}x{n_in}/ns{steps}", precision, [(f"muon {what} {call.meta['VARIANT']}", call)
                                                        for what, call in (("forward", fwd), ("backward", bwd))])


def resource_rows(shapes=SCAN_SHAPES, precisions=PRECISIONS, workers=2, kernels=KERNELS, mlp_shapes=MLP_SHAPES):
    """(shape, precision, kernel, shared bytes, registers, spill bytes, num_warps, num_stages) for every launch the
    kernels make on these shapes; compiled in `workers` processes (Triton caches the binaries on disk)."""
    tasks = []
    if "ns" in kernels:
        tasks += [(_measure, (shape, precision)) for shape in shapes for precision in precisions]
    if "mlp" in kernels:
        tasks += [(_measure_mlp, (shape, precision)) for shape in mlp_shapes for precision in precisions]
    if "momenta" in kernels:
        tasks += [(_measure_momenta, (shape, precision)) for shape in MOMENTA_SHAPES for precision in precisions
                  if precision in momenta.SCAN_PRECISIONS]
    if "muon" in kernels:
        tasks += [(_measure_muon, (shape, precision)) for shape in MUON_SHAPES for precision in precisions]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [row for rows in pool.map(_run_task, tasks) for row in rows]


def _run_task(task):
    measure, argument = task
    return measure(argument)


def _matrix(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxCOLS, e.g. 64x256") from None
    return rows, cols


def programs_per_sm(shared: int, regs: int, warps: int) -> int:
    """How many programs of this kernel one SM holds at once: what hides one matrix's dot-after-dot latency behind
    another's (register allocation granularity ignored: an upper bound)."""
    return min(HOPPER_SM_REGISTERS // (regs * 32 * warps), HOPPER_SM_SHARED_BYTES // max(shared + 1024, 1),
               HOPPER_SM_WARPS // warps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="compile in this many processes")
    parser.add_argument("--shapes", nargs="+", type=_matrix, default=SCAN_SHAPES,
                        help="matrices as ROWSxCOLS (default: every scan shape)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS,
                        help="Newton-Schulz (ns), the memory MLP's token pass (mlp, at MLP_SHAPES), the token "
                             "momenta (momenta, at MOMENTA_SHAPES), the fused Muon step (muon, at MUON_SHAPES)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        parser.error("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; unset it")
    rows = resource_rows(args.shapes, args.precisions, args.workers, args.kernels)
    too_big = [r for r in rows if r[3] > HOPPER_SHARED_BYTES]
    print(f"{'shape':<14} {'precision':<9} {'kernel':<22} {'shared B':>9} {'regs':>5} {'spill B':>7} "
          f"{'warps':>5} {'stages':>6} {'progs/SM':>8}")
    for shape, precision, name, shared, regs, spill, warps, stages in rows:
        flag = "  > H100 limit" if shared > HOPPER_SHARED_BYTES else ""
        shape = shape if isinstance(shape, str) else f"{shape[0]}x{shape[1]}"
        print(f"{shape:<14} {precision:<9} {name:<22} {shared:>9} {regs:>5} {spill:>7} {warps:>5} "
              f"{stages:>6} {programs_per_sm(shared, regs, warps):>8}{flag}")
    print(f"{len(rows)} kernels, {len(too_big)} over the {HOPPER_SHARED_BYTES} B of shared memory")
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
