"""Batched Newton–Schulz on cuBLAS tensor cores, forward and a hand-written backward (docs/math.md §3.7).

Why, beside the Triton kernel: that kernel runs one program per matrix, so it only pays where many small matrices
come at once. Timed forward+backward over many matrices in tf32, it beats this path at a short side of 64 (the token
update's W1 at dh 64), while this path is faster at a short side of 128 and above; at the chunk update's batch (B·H
matrices, one per head) the kernel leaves most of the card idle (benchmarks/RESULTS.md keeps the timings).

Why not autograd through the PyTorch chain: the operand precision ('tf32' is a cuBLAS mode, not a dtype) has to hold
in the backward's products too, which autograd runs later, outside any context set here. So the forward saves the
iterates X_0..X_{k-1} and the backward replays the Triton kernel's analytic derivative with the same products:
    dB = G Xᵀ,  dA = b dB + c (dB A + A dB),  dX = a G + B G + (dA + dAᵀ) X
(a tall X, iterated as X ← aX + X B with A = Xᵀ X: dB = Xᵀ G and dX = a G + G B + X (dA + dAᵀ)),
then of X0 = S / (n + eps): dS = dX0 / (n + eps) − <dX0, S> S / ((n + eps)² n), n = ‖S‖_F.
'bf16' multiplies bfloat16 copies of the iterate X (and of the gradient G) and keeps X and G themselves in float32:
aX and the product BX add up in float32 (`_bf16_step`, in cuBLAS's float32 epilogue). The Gram matrix A, B and the
backward's small products are bfloat16 results: each is rounded once and that one value serves every use.
Why not a chain stored in bfloat16 (as Muon implementations do): that rounds the dominant aX term at every step,
which for matrices with small singular values (momentum) is about ten times less exact; emulated on CPU
(benchmarks/ns_rounding.py --scan) it makes the token update fail its bf16 bound, which the float32 iterate keeps.
The normalisation, its derivative and the result are float32.
"""

from __future__ import annotations

import contextlib

import torch

from atlas_train.ops.newton_schulz import NS_COEFFICIENTS as NS_COEFFS
from atlas_train.ops.newton_schulz import NS_NORM_EPS as NS_EPS


@contextlib.contextmanager
def cublas_precision(precision: str):
    """cuBLAS may use TF32 tensor cores for float32 products inside this block when precision is 'tf32', and
    multiplies exactly in float32 otherwise; the caller's settings after it.

    PyTorch keeps this switch twice: the legacy `allow_tf32`/`set_float32_matmul_precision` and the newer
    `fp32_precision` attributes. cuBLAS asks both and raises if they disagree, and so does reading the legacy one:
    a caller who used only the new API (`torch.backends.cuda.matmul.fp32_precision = "tf32"`) would make a plain
    read of `allow_tf32` raise. So the block sets the switch through the legacy setter, which keeps both in step,
    and saves and restores what either API can change (the legacy enum where it can be read)."""
    matmul, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision, mkldnn.fp32_precision
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the two APIs: the legacy value cannot be read
        legacy = None
    matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision, mkldnn.fp32_precision = saved


def _compute(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for float64 inputs (the reference tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(n, rows, cols) in the compute dtype, in t's own layout."""
    return _compute(t).reshape(-1, *t.shape[-2:])


def _small(p: torch.Tensor, q: torch.Tensor, tall: bool) -> torch.Tensor:
    """The product over the long side, short x short: P Qᵀ for a wide matrix, Pᵀ Q for a tall one."""
    return torch.bmm(p.transpose(1, 2), q) if tall else torch.bmm(p, q.transpose(1, 2))


def _apply(m: torch.Tensor, y: torch.Tensor, tall: bool, beta: float) -> torch.Tensor:
    """beta·y + m·y for a wide y, beta·y + y·m for a tall one (m short x short)."""
    return torch.baddbmm(y, y, m, beta=beta) if tall else torch.baddbmm(y, m, y, beta=beta)


def _bf16_step(m: torch.Tensor, y: torch.Tensor, master: torch.Tensor, tall: bool, beta: float) -> torch.Tensor:
    """master ← beta·master + m·y (y·m for a tall y), bfloat16 operands m and y, float32 master, in place: one GEMM
    that accumulates in float32 and adds beta·master in its float32 epilogue (baddbmm's out_dtype, CUDA only). A
    float32 product followed by a separate add read and wrote the matrices twice more. On CPU the operands are
    upcast to master's dtype, which multiplies the same values."""
    p, q = (y, m) if tall else (m, y)
    if p.is_cuda:
        return torch.baddbmm(master, p, q, out_dtype=torch.float32, beta=beta, out=master)
    return master.baddbmm_(p.to(master.dtype), q.to(master.dtype), beta=beta)


def _step(m: torch.Tensor, y: torch.Tensor, master: torch.Tensor, tall: bool, beta: float) -> torch.Tensor:
    """beta·master + m·y, y being master itself or (bf16) its bfloat16 copy, whose product adds up in float32
    (then master itself is updated: the caller owns it)."""
    if y.dtype == master.dtype:
        return _apply(m, master, tall, beta)
    return _bf16_step(m, y, master, tall, beta)


def _add_product(out: torch.Tensor, m: torch.Tensor, y: torch.Tensor, tall: bool) -> torch.Tensor:
    """out += m·y (y·m for a tall y) in place: no copy of out, as a baddbmm into a new tensor would make."""
    if y.dtype != out.dtype:
        return _bf16_step(m, y, out, tall, 1.0)
    return out.baddbmm_(y, m) if tall else out.baddbmm_(m, y)


def _poly(x: torch.Tensor, tall: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A = X Xᵀ (Xᵀ X for a tall X) and B = bA + cA² of one iteration (the scalings fused into the GEMM).

    The step X ← aX + B X (aX + X B) stays one baddbmm, which copies X into its output before the product. Two ways
    around the copy lose: folding a into B (X ← (aI + B) X, one bmm) is faster but rounds a with B's tf32 operands,
    and the scan then fails its tf32 check; a Triton GEMM adding aX in its float32 epilogue is slower than cuBLAS
    and fails the tf32 bound too."""
    _, b, c = NS_COEFFS
    gram = _small(x, x, tall)
    return gram, torch.baddbmm(gram, gram, gram, beta=b, alpha=c)


class _NewtonSchulz(torch.autograd.Function):
    """Iterates and gradients in float32 (float64 in the tests); with 'bf16' their bfloat16 copies are the products'
    operands and the saved iterates. Every elementwise step is fused into a GEMM (baddbmm): at these sizes separate
    elementwise passes over the iterates would cost more memory traffic than the products themselves.

    A tall matrix is iterated as it lies (X ← aX + X B(XᵀX), the spec's transposed iteration written without
    transposes), so the result keeps the input's layout: iterating its transpose would return a transposed view that
    every later reshape of the token update copies (a visible share of a token-update step)."""

    @staticmethod
    def forward(ctx, s, steps, precision):
        a = NS_COEFFS[0]
        tall = s.shape[-2] > s.shape[-1]
        x = _flat(s)
        norm = torch.linalg.matrix_norm(x, keepdim=True)
        operand_dtype = torch.bfloat16 if precision == "bf16" else x.dtype
        x = x / (norm + NS_EPS)
        iterates = []
        with cublas_precision(precision):
            for _ in range(steps):
                operand = x.to(operand_dtype)
                iterates.append(operand)
                _, poly = _poly(operand, tall)
                x = _step(poly, operand, x, tall, a)
        ctx.save_for_backward(s, norm, *iterates)
        ctx.precision, ctx.tall = precision, tall
        return x.reshape(s.shape).to(s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        s, norm, *iterates = ctx.saved_tensors
        a, b, c = NS_COEFFS
        tall = ctx.tall
        g = _flat(grad_out)
        if ctx.precision == "bf16":
            g = g.clone()  # the bf16 steps update g in place, and it may be autograd's own gradient tensor
        with cublas_precision(ctx.precision):
            for x in reversed(iterates):
                gram, poly = _poly(x, tall)
                g_operand = g.to(x.dtype)
                d_poly = _small(x, g_operand, tall) if tall else _small(g_operand, x, tall)
                # the second GEMM of each sum accumulates in place (baddbmm_) rather than copying its addend first
                d_gram = torch.baddbmm(d_poly, d_poly, gram, beta=b, alpha=c).baddbmm_(gram, d_poly, alpha=c)
                g = _add_product(_step(poly, g_operand, g, tall, a), d_gram + d_gram.transpose(1, 2), x, tall)
        raw = _flat(s)
        g = g.to(raw.dtype)
        scale = norm + NS_EPS
        inner = (g * raw).sum(dim=(1, 2), keepdim=True)
        # (dX0 − <dX0, S> S / ((n + eps) n)) / (n + eps): two passes over the matrices (the written-out form took 4)
        grad_s = torch.addcmul(g, raw, -inner / (scale * norm.clamp_min(1e-30))).div_(scale)
        return grad_s.reshape(s.shape).to(s.dtype), None, None


@torch.compiler.disable
def newton_schulz(s: torch.Tensor, steps: int, precision: str = "tf32") -> torch.Tensor:
    """NS(s) for every matrix of s (..., rows, cols), products in `precision` ('ieee', 'tf32' or 'bf16');
    steps >= 1 (steps = 0 is the identity, which the caller handles).

    A compiled caller (torch.compile around the scan's chunk steps) runs it as it is, between its graphs: dynamo
    can trace neither the precision switch (`cublas_precision` reads a pybind getter) nor, with fake tensors,
    baddbmm's out_dtype, and would otherwise fall back to eager for the caller's whole frame."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _NewtonSchulz.apply(s, steps, precision)
