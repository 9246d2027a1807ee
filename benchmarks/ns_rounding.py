"""Newton–Schulz accuracy under tensor-core operand rounding, emulated on CPU (no GPU needed).

    python benchmarks/ns_rounding.py            # relative error of y and dS against float64, per form and spectrum
    python benchmarks/ns_rounding.py --scan     # the token update's worst error with each precision's NS forms

Why: a GPU check can only say that an NS path is too inexact, not why. Here every product rounds its operands to
tf32 or bf16 (to nearest even, as cuBLAS and the Triton kernels do; "tf32 truncated" rounds toward zero, as
Hopper's tf32 `tl.dot` does to float32 operands) and accumulates in float32, so the forms of one NS step can be
compared at will. The forward and the analytic backward are those of kernels/newton_schulz_kernel.py
(dB = G Xᵀ, dA = b dB + c (dB A + A dB), dX = a G + B G + (dA + dAᵀ) X). Forms:
  float32 A   the Gram matrix A = XXᵀ kept in float32: bA exact, A² from rounded operands (cuBLAS tf32, whose
              baddbmm adds bA in float32)
  rounded A   A rounded once where it is formed, one value for bA, A² and the backward, X in float32 (the Triton
              kernel, and the cuBLAS path's bf16, which also rounds the backward's small products once)
  bf16 chain  every result stored in bf16 (as Muon implementations do)
  fold        X <- (aI + B) X, one product
Spectra: Gaussian matrices (flat spectrum, what the checks draw) and singular values decaying to 1e-2 and 1e-4
(closer to momentum). With truncated tf32 operands, "float32 A" and "rounded A" match what the GPU gives for a kernel
of each form.

--scan puts the emulated NS into memory_scan(update="token") at bench_memory_scan's check inputs (smaller: one row,
128 tokens, 4 heads, dh 64), each matrix in the form its GPU path computes (`dispatch.triton_takes`: the
Triton kernel, else cuBLAS), and reports the worst relative error of y and every gradient against float64.
"""

from __future__ import annotations

import argparse

import torch

from atlas_train.ops.newton_schulz import NS_COEFFICIENTS, NS_NORM_EPS
from atlas_train.ops.newton_schulz import newton_schulz as ns_reference

STEPS = 5
SHAPES = ((64, 64, 256), (8, 40, 200), (16, 128, 512))  # (matrices, short side, long side)
FORMS = ("float32 A", "rounded A", "bf16 chain", "fold")


def round_bits(t: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float32 t rounded to nearest even at `mantissa_bits` explicit mantissa bits (tf32: 10, bf16: 7)."""
    drop = 23 - mantissa_bits
    bits = t.view(torch.int32)
    odd = (bits >> drop) & 1
    return ((bits + (1 << (drop - 1)) - 1 + odd) & ~((1 << drop) - 1)).view(torch.float32)


def emulated_ns(s, upstream, operand, form):
    """(y, dS) of NS on float32 s with every product's operands rounded by `operand`, in the given form (dS None
    without an upstream gradient)."""
    a, b, c = NS_COEFFICIENTS
    store = operand if form == "bf16 chain" else (lambda t: t)

    def mm(p, q):
        return store(operand(p) @ operand(q))

    def polynomial(x):
        gram = mm(x, x.mT)
        if form == "rounded A":
            gram = operand(gram)
        return gram, store(b * gram + c * mm(gram, gram))

    eye = torch.eye(s.shape[-2])
    norm = torch.linalg.matrix_norm(s, keepdim=True)
    x = store(s / (norm + NS_NORM_EPS))
    iterates = []
    for _ in range(STEPS):
        iterates.append(x)
        _, poly = polynomial(x)
        x = mm(a * eye + poly, x) if form == "fold" else store(a * x + mm(poly, x))
    if upstream is None:
        return x, None
    y, g = x, store(upstream)
    for x in reversed(iterates):
        gram, poly = polynomial(x)
        d_poly = mm(g, x.mT)
        d_gram = store(b * d_poly + c * (mm(d_poly, gram) + mm(gram, d_poly)))
        step = mm(a * eye + poly, g) if form == "fold" else store(a * g + mm(poly, g))
        g = store(step + mm(d_gram + d_gram.mT, x))
    inner = (g * s).sum(dim=(-2, -1), keepdim=True)
    return y, (g - inner * s / ((norm + NS_NORM_EPS) * norm)) / (norm + NS_NORM_EPS)


def random_matrices(shape, spectrum, gen):
    """Gaussian matrices, or random orthogonal factors around singular values decaying log-evenly to `spectrum`."""
    count, short, long = shape
    if spectrum is None:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(count, short, short, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(count, long, short, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, torch.tensor(spectrum).log10().item(), short, dtype=torch.float64)
    return left @ torch.diag_embed(sigma.expand(count, short)) @ right.mT


def relative_error(got, want):
    return (torch.linalg.norm(got.double() - want) / torch.linalg.norm(want)).item()


def truncate_bits(t: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float32 t with its mantissa cut to `mantissa_bits` (rounded toward zero)."""
    return (t.view(torch.int32) & ~((1 << (23 - mantissa_bits)) - 1)).view(torch.float32)


# "tf32 truncated" is what Hopper's tf32 `tl.dot` does to float32 operands: with it the "float32 A" and "rounded A"
# rows reproduce the GPU's errors for a Triton kernel of each form, which is why the kernels round every tf32 operand
# themselves.
OPERANDS = {"tf32": lambda t: round_bits(t, 10), "tf32 truncated": lambda t: truncate_bits(t, 10),
            "bf16": lambda t: round_bits(t, 7)}
# (operands, form of the Triton kernel's matrices, form of cuBLAS's, label): the GPU paths as they compute, and in bf16
# the forms they avoid (a float32 Gram matrix, a chain stored in bf16), one or both at a time.
SCAN_CASES = (("tf32", "rounded A", "float32 A", "tf32, the GPU paths' forms"),
              ("bf16", "float32 A", "bf16 chain", "bf16, both avoided forms"),
              ("bf16", "rounded A", "bf16 chain", "bf16, cuBLAS as a bf16 chain"),
              ("bf16", "rounded A", "rounded A", "bf16, the GPU paths' forms"))


class _EmulatedNS(torch.autograd.Function):
    """NS on any (..., rows, cols) batch through `emulated_ns`, a tall matrix iterated on its transpose."""

    @staticmethod
    def forward(ctx, s, operand, form):
        ctx.save_for_backward(s)
        ctx.operand, ctx.form = operand, form
        return _EmulatedNS.run(s, None, operand, form)[0]

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return _EmulatedNS.run(s, grad, ctx.operand, ctx.form)[1], None, None

    @staticmethod
    def run(s, grad, operand, form):
        tall = s.shape[-2] > s.shape[-1]
        wide = s.mT if tall else s
        flat = wide.reshape(-1, *wide.shape[-2:]).float()
        upstream = None if grad is None else (grad.mT if tall else grad).reshape(flat.shape).float()
        y, ds = emulated_ns(flat, upstream, operand, form)
        back = (lambda t: t.reshape(wide.shape).mT) if tall else (lambda t: t.reshape(wide.shape))
        return back(y).to(s.dtype), None if ds is None else back(ds).to(s.dtype)


def scan_table(batch=1, length=128, heads=4, dh=64):
    """The token update's worst error (and its name) per case of SCAN_CASES, against the float64 scan."""
    import bench_memory_scan as bench  # this script's neighbour (found beside it when run as a script)

    from atlas_train.kernels.dispatch import triton_takes
    from atlas_train.ops import scan_chunks

    tensors, params = bench.make_inputs(batch, length, heads, dh, torch.device("cpu"), torch.float32, seed=1)
    upstream = torch.randn(batch, length, heads, dh, generator=torch.Generator().manual_seed(2))
    as64 = lambda d: {k: t.detach().double().requires_grad_() for k, t in d.items()}  # noqa: E731
    ref_y, ref_grads = bench.scan_fwd_bwd(as64(tensors), as64(params), "token", upstream.double())
    names = ["y"] + [f"d{k}" for k in list(tensors) + list(params)]
    plain, lines = scan_chunks.newton_schulz, []
    try:
        for operands, kernel_form, cublas_form, label in SCAN_CASES:
            def emulated(s, steps, half_inputs, operands=operands, kernel_form=kernel_form, cublas_form=cublas_form):
                assert steps == STEPS, steps
                form = kernel_form if triton_takes(s, operands) else cublas_form
                return _EmulatedNS.apply(s, OPERANDS[operands], form)

            scan_chunks.newton_schulz = emulated
            y, grads = bench.scan_fwd_bwd(tensors, params, "token", upstream)
            errors = [relative_error(g, r) for g, r in zip((y, *grads), (ref_y, *ref_grads))]
            worst = max(range(len(errors)), key=lambda i: errors[i])
            lines.append(f"{label:<44} kernel: {kernel_form:<10} cuBLAS: {cublas_form:<10} worst "
                         f"{names[worst]} {errors[worst]:.2e}")
            print(lines[-1], flush=True)
    finally:
        scan_chunks.newton_schulz = plain
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scan", action="store_true", help="the token update's errors instead of NS alone")
    args = parser.parse_args(argv)
    if args.scan:
        scan_table()
        return
    print(f"{'matrices':<14} {'spectrum':<10} {'operands':<14} " + "  ".join(f"{f + ' y / dS':>22}" for f in FORMS))
    for shape in SHAPES:
        for spectrum in (None, 1e-2, 1e-4):
            gen = torch.Generator().manual_seed(args.seed)
            s = random_matrices(shape, spectrum, gen)
            upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
            leaf = s.clone().requires_grad_()
            y_ref = ns_reference(leaf, STEPS)
            (ds_ref,) = torch.autograd.grad(y_ref, leaf, upstream)
            for name, operand in OPERANDS.items():
                cells = []
                for form in FORMS:
                    if form == "bf16 chain" and name != "bf16":
                        cells.append(f"{'-':>22}")
                        continue
                    y, ds = emulated_ns(s.float(), upstream.float(), operand, form)
                    cells.append(f"{relative_error(y, y_ref.detach()):>10.2e} / {relative_error(ds, ds_ref):.2e}")
                label = "Gaussian" if spectrum is None else f"to {spectrum:g}"
                print(f"{'x'.join(map(str, shape)):<14} {label:<10} {name:<14} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
