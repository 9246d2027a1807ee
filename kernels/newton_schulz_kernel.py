"""Batched Newton–Schulz (Muon) orthogonalisation in Triton, forward and backward (docs/math.md §3.7).

Why a kernel: `update="token"` runs NS once per token, head and weight matrix (docs/math.md §7), i.e. thousands of
small matrices per chunk. One launch handles all of them, one program per matrix, every product on tensor cores
(`tl.dot`: fp32 accumulation; 'ieee' fp32, 'tf32' or 'bf16' operands).

A matrix is seen as M x N with M <= N (a tall one is read through swapped strides: the spec's "transpose, iterate,
transpose back" for free). Three variants, by size (small heuristic in `launch_layout`, no autotune):
  registers  the whole (padded) matrix fits one register tile: load once, iterate, store once;
  stream     M <= 64 (M <= 128 with bf16 operands): the M x M Gram matrix A and polynomial B = bA + cA^2 in
             registers, X in the output buffer, streamed in column tiles and updated in place (X'[:, cols] only
             needs X[:, cols] and B);
  scratch    M up to 256: A and B in a per-program scratch buffer, formed ROW_BLOCK rows at a time, X updated
             one column strip at a time.
The iterations (`ns_steps_in_registers`, `ns_steps_streamed`) and their backward (`ns_backward_steps`,
`ns_norm_backward`) are jit functions that the fused Muon step kernel (`muon_step_kernel`) calls too, with this
module's launch layout (`launch_layout`). When a gradient is needed the forward also writes its iterates X_0..X_{k-1}
to a buffer, and the backward walks them in reverse (streaming column strips of X_i and G even where the forward kept
X in registers: the backward holds twice the tiles) with the analytic derivative of one step X' = aX + (bA + cA^2)X,
A = XX^T:
    dB = G X^T,  dA = b dB + c (dB A + A dB),  dX = a G + B G + (dA + dA^T) X,
then of X0 = S / (|S|_F + eps): dS = dX0 / (n + eps) - <dX0, S> S / ((n + eps)^2 n), n = |S|_F.

With tf32 or bf16 operands each Gram matrix A is rounded to that precision once, where it is formed (`as_operand`),
and the one rounded value serves bA, A^2 and the backward's products. Left in float32, A entered bA exactly but A^2
rounded: a polynomial of two different matrices, which spoils the cancellation NS relies on as it converges. On CPU,
emulating the tensor cores' operand rounding (`benchmarks/ns_rounding.py`), this cuts the error on random matrices
(in bf16 it takes dS from over the bf16 bound to within it) and leaves it about the same for matrices with decaying
spectra. It pays only if every other operand is rounded to nearest as well: Hopper's tf32 `tl.dot` truncates them,
which makes this form worse than float32 A, so `mm` rounds them first. X is not rounded for aX, nor a folded into B
as X <- (aI + B)X: either rounds the dominant aX term, which for small singular values (momentum has many) makes the
error several times larger, enough to fail the scan's tf32 check.

Hopper's 227 KiB of shared memory per program bounds every launch (tl.dot stages its operands there, once per
software-pipeline stage): benchmarks/kernel_resources.py compiles each launch of the scan's shapes offline for
sm_90 and a test fails if one does not fit.

Speed: each iteration is three dependent products (A = XX^T, A^2, BX), each waiting for the previous result to be
staged in shared memory; at 255 registers x 8 warps one program fills an SM, so nothing hides those waits (an
iteration takes several times its tensor-core work). More programs per SM (fewer warps or registers: NUM_WARPS,
MAX_REGISTERS) is the lever; `bench_memory_scan.py --ns-only --ns-sweep` compares them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from atlas_train.kernels.triton_common import (
    PRECISIONS,
    KernelCall,
    accumulator,
    as_operand,
    input_refusal,
    launch_precision,
    mm,
)
from atlas_train.ops.newton_schulz import NS_COEFFICIENTS as NS_COEFFS
from atlas_train.ops.newton_schulz import NS_NORM_EPS as NS_EPS

MAX_SHORT_SIDE = 256  # the scratch variant's column strip (M x BLOCK_N) must fit in registers
SINGLE_TILE_ELEMENTS = 64 * 256  # up to this many elements (padded) X stays in registers for all iterations
REGISTER_GRAM_MAX = 64  # up to this short side the M x M Gram matrix and its helpers stay in registers
# With bf16 operands the Gram matrix stays in registers up to 128 x 128, where the scratch variant sends A and B (and
# the backward's dA, dB) through global memory: forward+backward is faster so, in both directions, although the
# backward's four such matrices spill (benchmarks/kernel_resources.py shows how much). tf32 operands (float32 in
# registers) spill in the forward too: not timed, left to scratch.
REGISTER_GRAM_MAX_BF16 = 128
SCRATCH_TILE_ELEMENTS = 8192  # register tiles of the streamed variants hold about this many elements
# Software pipelining of the tile loops: every stage is another copy of the loop's tiles in shared memory. Triton's
# default (3) overflows Hopper's 227 KiB for most shapes; benchmarks/kernel_resources.py checks these values.
NUM_STAGES = {"forward": 2, "backward": 2}
NUM_WARPS = {"stream": 8, "scratch": 8}  # of the streamed variants (short side above 32)
# Registers per thread; None lets ptxas take up to 255, i.e. one 8-warp program per SM. 128 fits two programs per SM
# (latency hiding across matrices) at the price of some spills: `bench_memory_scan.py --ns-only --ns-sweep` times it.
MAX_REGISTERS = None


@triton.jit
def tile_offsets(rows, cols, M, N, s_m, s_n):
    """Element offsets of rows x cols of an M x N matrix with strides (s_m, s_n), and the mask of its part."""
    return rows[:, None] * s_m + cols[None, :] * s_n, (rows[:, None] < M) & (cols[None, :] < N)


@triton.jit
def _tile_ptrs(base, rows, cols, M, N, s_m, s_n):
    offsets, mask = tile_offsets(rows, cols, M, N, s_m, s_n)
    return base + offsets, mask


@triton.jit
def _copy_tiles(SRC, src_sm, src_sn, DST, dst_sm, dst_sn, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        sptrs, mask = _tile_ptrs(SRC, rows, n0 + cols, M, N, src_sm, src_sn)
        dptrs, _ = _tile_ptrs(DST, rows, n0 + cols, M, N, dst_sm, dst_sn)
        tl.store(dptrs, tl.load(sptrs, mask=mask, other=0.0).to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _load_square(BASE, rows, cols, M, BLOCK_M: tl.constexpr):
    """rows x cols of a BLOCK_M x BLOCK_M row-major scratch matrix, zero outside its M x M part."""
    mask = (rows[:, None] < M) & (cols[None, :] < M)
    return tl.load(BASE + rows[:, None] * BLOCK_M + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gram_into(P, p_sm, p_sn, Q, q_sm, q_sn, OUT, M, N, BLOCK_M: tl.constexpr, ROW_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """OUT = P Q^T (M x M scratch) for M x N operands, ROW_BLOCK rows of OUT at a time (rounded to the operand
    precision when ROUND: the Gram matrix, see the module's docstring)."""
    rb = tl.arange(0, ROW_BLOCK)
    ra = tl.arange(0, BLOCK_M)
    cn = tl.arange(0, BLOCK_N)
    for i0 in range(0, M, ROW_BLOCK):
        acc = tl.zeros((ROW_BLOCK, BLOCK_M), ACC)
        for n0 in range(0, N, BLOCK_N):
            pp, pm = _tile_ptrs(P, i0 + rb, n0 + cn, M, N, p_sm, p_sn)
            qp, qm = _tile_ptrs(Q, ra, n0 + cn, M, N, q_sm, q_sn)
            acc += mm(tl.load(pp, mask=pm, other=0.0).to(ACC), tl.trans(tl.load(qp, mask=qm, other=0.0).to(ACC)),
                       PRECISION, ACC)
        if ROUND:
            acc = as_operand(acc, PRECISION)
        tl.store(OUT + (i0 + rb)[:, None] * BLOCK_M + ra[None, :], acc)


@triton.jit
def _poly_into(Y, A, OUT, M, c_y, c_ya, c_ay, BLOCK_M: tl.constexpr, ROW_BLOCK: tl.constexpr,
               TWO_SIDED: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """OUT = c_y Y + c_ya Y A (+ c_ay A Y when TWO_SIDED) for M x M scratch matrices."""
    rb = tl.arange(0, ROW_BLOCK)
    ra = tl.arange(0, BLOCK_M)
    for i0 in range(0, M, ROW_BLOCK):
        acc = c_y * _load_square(Y, i0 + rb, ra, M, BLOCK_M)
        for k0 in range(0, M, ROW_BLOCK):
            acc += c_ya * mm(_load_square(Y, i0 + rb, k0 + rb, M, BLOCK_M), _load_square(A, k0 + rb, ra, M, BLOCK_M),
                              PRECISION, ACC)
            if TWO_SIDED:
                acc += c_ay * mm(_load_square(A, i0 + rb, k0 + rb, M, BLOCK_M),
                                  _load_square(Y, k0 + rb, ra, M, BLOCK_M), PRECISION, ACC)
        tl.store(OUT + (i0 + rb)[:, None] * BLOCK_M + ra[None, :], acc)


@triton.jit
def _strips_update(T, t_sm, t_sn, B, C, Y, y_sm, y_sn, M, N, c_t, BLOCK_M: tl.constexpr, ROW_BLOCK: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_C: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """T <- c_t T + B T (+ (C + C^T) Y when HAS_C), in place, one column strip at a time: a strip of the result only
    reads the same strip of T and Y, so strips never see each other's new values."""
    ra = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, ROW_BLOCK)
    cn = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        tp, tm = _tile_ptrs(T, ra, n0 + cn, M, N, t_sm, t_sn)
        acc = c_t * tl.load(tp, mask=tm, other=0.0).to(ACC)
        for k0 in range(0, M, ROW_BLOCK):
            kp, km = _tile_ptrs(T, k0 + rk, n0 + cn, M, N, t_sm, t_sn)
            acc += mm(_load_square(B, ra, k0 + rk, M, BLOCK_M), tl.load(kp, mask=km, other=0.0).to(ACC),
                       PRECISION, ACC)
            if HAS_C:
                c_sym = _load_square(C, ra, k0 + rk, M, BLOCK_M) + tl.trans(_load_square(C, k0 + rk, ra, M, BLOCK_M))
                yp, ym = _tile_ptrs(Y, k0 + rk, n0 + cn, M, N, y_sm, y_sn)
                acc += mm(c_sym, tl.load(yp, mask=ym, other=0.0).to(ACC), PRECISION, ACC)
        tl.debug_barrier()  # every read of this strip is done before any thread overwrites it
        tl.store(tp, acc.to(T.dtype.element_ty), mask=tm)


@triton.jit
def ns_steps_in_registers(x, save_base, save_step, rows, cols, M, N, steps, a, b, c,
                          SAVE_ITERATES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """The iterations on a normalised matrix held in one register tile x (the "registers" variant), returning the
    last; with SAVE_ITERATES each X_i is written to save_base + i·save_step first."""
    for i in range(steps):
        if SAVE_ITERATES:
            sptrs, mask = _tile_ptrs(save_base + i * save_step, rows, cols, M, N, N, 1)
            tl.store(sptrs, x.to(save_base.dtype.element_ty), mask=mask)
        gram = as_operand(mm(x, tl.trans(x), PRECISION, ACC), PRECISION)
        poly = b * gram + c * mm(gram, gram, PRECISION, ACC)
        x = a * x + mm(poly, x, PRECISION, ACC)
    return x


@triton.jit
def ns_steps_streamed(x_base, s_m, s_n, save_base, save_step, gram_s, poly_s, M, N, steps, a, b, c,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr, VARIANT: tl.constexpr,
                      SAVE_ITERATES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """The iterations on a normalised matrix X kept at x_base and updated in place, streamed in column tiles (the
    "stream" and "scratch" variants); with SAVE_ITERATES each X_i is copied to save_base + i·save_step first."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    for i in range(steps):
        if SAVE_ITERATES:
            _copy_tiles(x_base, s_m, s_n, save_base + i * save_step, N, 1, M, N, BLOCK_M, BLOCK_N)
        if VARIANT == "stream":  # Gram matrix and polynomial in registers
            gram = tl.zeros((BLOCK_M, BLOCK_M), ACC)
            for n0 in range(0, N, BLOCK_N):
                ptrs, mask = _tile_ptrs(x_base, rows, n0 + cols, M, N, s_m, s_n)
                x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
                gram += mm(x, tl.trans(x), PRECISION, ACC)
            gram = as_operand(gram, PRECISION)
            poly = b * gram + c * mm(gram, gram, PRECISION, ACC)
            for n0 in range(0, N, BLOCK_N):
                ptrs, mask = _tile_ptrs(x_base, rows, n0 + cols, M, N, s_m, s_n)
                x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
                x = a * x + mm(poly, x, PRECISION, ACC)
                tl.debug_barrier()  # the tile is fully read before it is overwritten in place
                tl.store(ptrs, x.to(x_base.dtype.element_ty), mask=mask)
        else:  # "scratch": Gram matrix and polynomial in a per-program scratch buffer, ROW_BLOCK rows at a time
            _gram_into(x_base, s_m, s_n, x_base, s_m, s_n, gram_s, M, N, BLOCK_M, ROW_BLOCK, BLOCK_N, True,
                       PRECISION, ACC)
            tl.debug_barrier()
            _poly_into(gram_s, gram_s, poly_s, M, b, c, 0.0, BLOCK_M, ROW_BLOCK, False, PRECISION, ACC)
            tl.debug_barrier()
            _strips_update(x_base, s_m, s_n, poly_s, poly_s, x_base, s_m, s_n, M, N, a, BLOCK_M, ROW_BLOCK,
                           BLOCK_N, False, PRECISION, ACC)
        tl.debug_barrier()


@triton.jit
def _ns_forward_kernel(S, X, SAVE, SCRATCH, M, N, s_b, s_m, s_n, steps, a, b, c, eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
                       VARIANT: tl.constexpr, SAVE_ITERATES: tl.constexpr, PRECISION: tl.constexpr,
                       ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    s_base = S + pid * s_b
    x_base = X + pid * s_b
    # SAVE holds X_0 .. X_{steps-1} contiguously as (steps, n_matrices, M, N) in this (wide) orientation.
    save_base = SAVE + pid * M * N
    save_step = tl.num_programs(0).to(tl.int64) * M * N
    gram_s = SCRATCH + pid * 2 * BLOCK_M * BLOCK_M
    poly_s = gram_s + BLOCK_M * BLOCK_M

    if VARIANT == "registers":  # the whole matrix is one tile: X stays in registers through every iteration
        ptrs, mask = _tile_ptrs(s_base, rows, cols, M, N, s_m, s_n)
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        x = x / (tl.sqrt(tl.sum(x * x)) + eps)
        x = ns_steps_in_registers(x, save_base, save_step, rows, cols, M, N, steps, a, b, c, SAVE_ITERATES,
                                  PRECISION, ACC)
        xptrs, _ = _tile_ptrs(x_base, rows, cols, M, N, s_m, s_n)
        tl.store(xptrs, x.to(X.dtype.element_ty), mask=mask)
    else:  # X lives in the output buffer and is streamed in column tiles
        sq = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for n0 in range(0, N, BLOCK_N):
            ptrs, mask = _tile_ptrs(s_base, rows, n0 + cols, M, N, s_m, s_n)
            s = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            sq += s * s
        scale = 1.0 / (tl.sqrt(tl.sum(sq)) + eps)
        for n0 in range(0, N, BLOCK_N):
            ptrs, mask = _tile_ptrs(s_base, rows, n0 + cols, M, N, s_m, s_n)
            s = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            xptrs, _ = _tile_ptrs(x_base, rows, n0 + cols, M, N, s_m, s_n)
            tl.store(xptrs, (s * scale).to(X.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        ns_steps_streamed(x_base, s_m, s_n, save_base, save_step, gram_s, poly_s, M, N, steps, a, b, c, BLOCK_M,
                          BLOCK_N, ROW_BLOCK, VARIANT, SAVE_ITERATES, PRECISION, ACC)


@triton.jit
def ns_backward_steps(d_base, s_m, s_n, save_base, save_step, scratch, M, N, steps, a, b, c,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
                      VARIANT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dL/dX_0 from dL/dX_steps kept at d_base (updated in place), walking the saved iterates in reverse; `scratch`:
    the program's room for four BLOCK_M² matrices (the "scratch" variant)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    square = BLOCK_M * BLOCK_M
    gram_s = scratch
    poly_s = gram_s + square
    d_poly_s = gram_s + 2 * square
    d_gram_s = gram_s + 3 * square
    for it in range(steps):
        x_i = save_base + (steps - 1 - it) * save_step
        if VARIANT == "scratch":
            _gram_into(x_i, N, 1, x_i, N, 1, gram_s, M, N, BLOCK_M, ROW_BLOCK, BLOCK_N, True, PRECISION, ACC)
            _gram_into(d_base, s_m, s_n, x_i, N, 1, d_poly_s, M, N, BLOCK_M, ROW_BLOCK, BLOCK_N, False, PRECISION,
                       ACC)
            tl.debug_barrier()
            _poly_into(gram_s, gram_s, poly_s, M, b, c, 0.0, BLOCK_M, ROW_BLOCK, False, PRECISION, ACC)
            _poly_into(d_poly_s, gram_s, d_gram_s, M, b, c, c, BLOCK_M, ROW_BLOCK, True, PRECISION, ACC)
            tl.debug_barrier()
            _strips_update(d_base, s_m, s_n, poly_s, d_gram_s, x_i, N, 1, M, N, a, BLOCK_M, ROW_BLOCK, BLOCK_N,
                           True, PRECISION, ACC)
        else:  # Gram matrix, polynomial and their gradients in registers
            gram = tl.zeros((BLOCK_M, BLOCK_M), ACC)
            d_poly = tl.zeros((BLOCK_M, BLOCK_M), ACC)
            for n0 in range(0, N, BLOCK_N):
                sptrs, mask = _tile_ptrs(x_i, rows, n0 + cols, M, N, N, 1)
                dptrs, _ = _tile_ptrs(d_base, rows, n0 + cols, M, N, s_m, s_n)
                x = tl.load(sptrs, mask=mask, other=0.0).to(ACC)
                g = tl.load(dptrs, mask=mask, other=0.0).to(ACC)
                xt = tl.trans(x)
                gram += mm(x, xt, PRECISION, ACC)
                d_poly += mm(g, xt, PRECISION, ACC)
            gram = as_operand(gram, PRECISION)
            poly = b * gram + c * mm(gram, gram, PRECISION, ACC)
            d_gram = b * d_poly + c * (mm(d_poly, gram, PRECISION, ACC) + mm(gram, d_poly, PRECISION, ACC))
            d_gram_sym = d_gram + tl.trans(d_gram)
            for n0 in range(0, N, BLOCK_N):
                sptrs, mask = _tile_ptrs(x_i, rows, n0 + cols, M, N, N, 1)
                dptrs, _ = _tile_ptrs(d_base, rows, n0 + cols, M, N, s_m, s_n)
                x = tl.load(sptrs, mask=mask, other=0.0).to(ACC)
                g = tl.load(dptrs, mask=mask, other=0.0).to(ACC)
                g = a * g + mm(poly, g, PRECISION, ACC) + mm(d_gram_sym, x, PRECISION, ACC)
                tl.debug_barrier()  # the tile is fully read before it is overwritten in place
                tl.store(dptrs, g.to(d_base.dtype.element_ty), mask=mask)
        tl.debug_barrier()


@triton.jit
def ns_norm_backward(s_base, d_base, s_m, s_n, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     ACC: tl.constexpr):
    """dS at d_base (in place) from dX0 there, for X0 = S / (n + eps), n = |S|_F:
    dS = dX0 / (n + eps) - <dX0, S> / ((n + eps)^2 n) S, the second term 0 at n = 0."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    sq = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    gs = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for n0 in range(0, N, BLOCK_N):
        ptrs, mask = _tile_ptrs(s_base, rows, n0 + cols, M, N, s_m, s_n)
        dptrs, _ = _tile_ptrs(d_base, rows, n0 + cols, M, N, s_m, s_n)
        s = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        g = tl.load(dptrs, mask=mask, other=0.0).to(ACC)
        sq += s * s
        gs += g * s
    norm = tl.sqrt(tl.sum(sq))
    inv = 1.0 / (norm + eps)
    coef = tl.where(norm > 0, tl.sum(gs) * inv * inv / tl.maximum(norm, 1e-30), 0.0)
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        ptrs, mask = _tile_ptrs(s_base, rows, n0 + cols, M, N, s_m, s_n)
        dptrs, _ = _tile_ptrs(d_base, rows, n0 + cols, M, N, s_m, s_n)
        s = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        g = tl.load(dptrs, mask=mask, other=0.0).to(ACC)
        tl.store(dptrs, (inv * g - coef * s).to(d_base.dtype.element_ty), mask=mask)


@triton.jit
def _ns_backward_kernel(S, G, DS, SAVE, SCRATCH, M, N, s_b, s_m, s_n, steps, a, b, c, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
                        VARIANT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s_base = S + pid * s_b
    d_base = DS + pid * s_b  # running gradient dL/dX_i, kept in the output buffer
    save_base = SAVE + pid * M * N
    save_step = tl.num_programs(0).to(tl.int64) * M * N
    _copy_tiles(G + pid * s_b, s_m, s_n, d_base, s_m, s_n, M, N, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    ns_backward_steps(d_base, s_m, s_n, save_base, save_step, SCRATCH + pid * 4 * BLOCK_M * BLOCK_M, M, N, steps,
                      a, b, c, BLOCK_M, BLOCK_N, ROW_BLOCK, VARIANT, PRECISION, ACC)
    ns_norm_backward(s_base, d_base, s_m, s_n, M, N, eps, BLOCK_M, BLOCK_N, ACC)


def newton_schulz_unsupported(S: torch.Tensor, precision: str = "tf32") -> str | None:
    """Why the kernel cannot take S, or None when it can."""
    reason = input_refusal(S, precision, PRECISIONS)
    if reason is not None:
        return reason
    if S.dim() < 2 or min(S.shape[-2:]) > MAX_SHORT_SIDE:
        return f"matrix shape {tuple(S.shape[-2:])}: the short side must be <= {MAX_SHORT_SIDE}"
    return None


class Launch(NamedTuple):
    """How one batch of matrices is laid out for the kernels (chosen by a small heuristic: no autotune)."""

    mats: torch.Tensor  # (n, rows, cols), contiguous
    M: int  # short side
    N: int  # long side
    strides: tuple  # (matrix, M, N) strides of mats in the wide orientation
    block_m: int
    block_n: int
    row_block: int
    variant: str  # "registers" | "stream" | "scratch"
    num_warps: int
    num_stages: int
    precision: str
    acc: object  # tl.float32 or tl.float64


def launch_layout(S: torch.Tensor, precision: str, backward: bool = False) -> Launch:
    mats = S.reshape(-1, *S.shape[-2:]).contiguous()
    rows, cols = mats.shape[-2:]
    s_b, s_r, s_c = mats.stride()
    if rows > cols:  # iterate on the transpose: swap the roles of the strides
        M, N, strides = cols, rows, (s_b, s_c, s_r)
    else:
        M, N, strides = rows, cols, (s_b, s_r, s_c)
    block_m = max(16, triton.next_power_of_2(M))
    block_n = max(16, triton.next_power_of_2(N))
    row_block = block_m
    if block_m * block_n <= SINGLE_TILE_ELEMENTS:
        variant, num_warps = "registers", 4 if block_m * block_n <= 4096 else 8
    elif block_m <= (REGISTER_GRAM_MAX_BF16 if precision == "bf16" else REGISTER_GRAM_MAX):
        variant, num_warps = "stream", 4 if block_m <= 32 else NUM_WARPS["stream"]
        block_n = max(16, min(block_n, SCRATCH_TILE_ELEMENTS // block_m))
    else:
        variant, num_warps = "scratch", NUM_WARPS["scratch"]
        block_n = max(16, min(block_n, 64, SCRATCH_TILE_ELEMENTS // block_m))
        row_block = max(16, min(block_m, SCRATCH_TILE_ELEMENTS // block_m))
    if backward and variant == "registers":  # the backward streams G and X_i: two tiles plus dot operands
        block_n = max(16, min(block_n, SCRATCH_TILE_ELEMENTS // block_m))
    return Launch(mats, M, N, strides, block_m, block_n, row_block, variant, num_warps,
                   NUM_STAGES["backward" if backward else "forward"], launch_precision(mats.dtype, precision),
                   accumulator(mats.dtype))


def scratch_buffer(cfg: Launch, squares: int) -> torch.Tensor:
    """Per-program room for `squares` block_m x block_m matrices (the scratch variant only)."""
    size = cfg.mats.shape[0] * squares * cfg.block_m**2 if cfg.variant == "scratch" else 1
    return torch.empty(size, device=cfg.mats.device, dtype=cfg.mats.dtype)


def _iterates_layout(S: torch.Tensor, steps: int, precision: str):
    """Shape and dtype of the saved forward iterates X_0..X_{steps-1}, (steps, n, M, N) in the wide orientation."""
    rows, cols = S.shape[-2:]
    shape = (steps, S.numel() // max(rows * cols, 1), min(rows, cols), max(rows, cols))
    # The backward only feeds iterates to tl.dot: with bf16 operands, storing them in bf16 loses nothing.
    bf16 = launch_precision(S.dtype, precision) == "bf16"
    return shape, torch.bfloat16 if bf16 else S.dtype


def forward_call(S: torch.Tensor, steps: int, precision: str, save: bool):
    """The forward launch for S, with its output and (if save) iterates buffers."""
    cfg = launch_layout(S, precision)
    out = torch.empty_like(cfg.mats)
    shape, dtype = _iterates_layout(S, steps, precision)
    iterates = torch.empty(shape if save else (1,), device=S.device, dtype=dtype)
    a, b, c = NS_COEFFS
    call = KernelCall(_ns_forward_kernel, (cfg.mats.shape[0],), (
        cfg.mats, out, iterates, scratch_buffer(cfg, 2), cfg.M, cfg.N, *cfg.strides, steps, a, b, c, NS_EPS), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROW_BLOCK=cfg.row_block, VARIANT=cfg.variant,
        SAVE_ITERATES=save, PRECISION=cfg.precision, ACC=cfg.acc, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, maxnreg=MAX_REGISTERS))
    return call, out, iterates


def backward_call(S: torch.Tensor, iterates: torch.Tensor, grad_out: torch.Tensor, steps: int, precision: str):
    """The backward launch for S (the forward's saved iterates, upstream gradient), with its dS buffer."""
    cfg = launch_layout(S, precision, backward=True)
    grad = grad_out.reshape(cfg.mats.shape).to(cfg.mats.dtype).contiguous()
    d_s = torch.empty_like(cfg.mats)
    a, b, c = NS_COEFFS
    scratch = scratch_buffer(cfg, 4)
    call = KernelCall(_ns_backward_kernel, (cfg.mats.shape[0],), (
        cfg.mats, grad, d_s, iterates, scratch, cfg.M, cfg.N, *cfg.strides, steps, a, b, c, NS_EPS), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROW_BLOCK=cfg.row_block, VARIANT=cfg.variant,
        PRECISION=cfg.precision, ACC=cfg.acc, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        maxnreg=MAX_REGISTERS))
    return call, d_s


def _forward(S: torch.Tensor, steps: int, precision: str, save: bool):
    call, out, iterates = forward_call(S, steps, precision, save)
    call()
    return out.view(S.shape), iterates


# Torch custom ops (not a plain autograd.Function) so that torch.compile treats them as opaque calls. Without grad
# the forward keeps nothing; with grad it also returns its iterates, which the backward then reuses (the scan already
# recomputes each chunk right before its backward, so they live only for that chunk).
@torch.library.custom_op("atlas_train::newton_schulz", mutates_args=())
def _ns_op(S: torch.Tensor, steps: int, precision: str) -> torch.Tensor:
    return _forward(S, steps, precision, save=False)[0]


@torch.library.custom_op("atlas_train::newton_schulz_saving", mutates_args=())
def _ns_saving_op(S: torch.Tensor, steps: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(S, steps, precision, save=True)


@torch.library.custom_op("atlas_train::newton_schulz_backward", mutates_args=())
def _ns_backward_op(S: torch.Tensor, iterates: torch.Tensor, grad_out: torch.Tensor, steps: int,
                    precision: str) -> torch.Tensor:
    call, d_s = backward_call(S, iterates, grad_out, steps, precision)
    call()
    return d_s.view(S.shape)


# The fakes' outputs are contiguous, as the kernels write them (empty_like would keep a transposed S's strides).
@_ns_op.register_fake
def _(S, steps, precision):
    return S.new_empty(S.shape)


@_ns_saving_op.register_fake
def _(S, steps, precision):
    shape, dtype = _iterates_layout(S, steps, precision)
    return S.new_empty(S.shape), S.new_empty(shape, dtype=dtype)


@_ns_backward_op.register_fake
def _(S, iterates, grad_out, steps, precision):
    return S.new_empty(S.shape)


def _setup_context(ctx, inputs, output):
    S, ctx.steps, ctx.precision = inputs
    ctx.save_for_backward(S, output[1])
    ctx.mark_non_differentiable(output[1])
    # The iterates never get a gradient: without this autograd would fill a zero tensor of their size (steps times
    # the input's) for every backward, only for `_backward` to ignore it.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_iterates):
    if grad_out is None:  # not materialised: nothing flows back through the output either
        return None, None, None
    S, iterates = ctx.saved_tensors
    return _ns_backward_op(S, iterates, grad_out, ctx.steps, ctx.precision), None, None


_ns_saving_op.register_autograd(_backward, setup_context=_setup_context)


def newton_schulz(S: torch.Tensor, steps: int, precision: str = "tf32") -> torch.Tensor:
    """NS_steps(S) over the last two dims of S, batched over all leading dims; differentiable.

    `precision`: 'ieee' (exact fp32 products), 'tf32' or 'bf16' operands (fp32 accumulation). Callers check
    `newton_schulz_unsupported(S)` first; steps == 0 is the identity (docs/math.md §3.4).
    """
    reason = newton_schulz_unsupported(S, precision)
    if reason is not None:
        raise ValueError(f"newton_schulz kernel: {reason}")
    if steps == 0:
        return S
    S = S.contiguous()
    if torch.is_grad_enabled() and S.requires_grad:
        return _ns_saving_op(S, int(steps), precision)[0]
    return _ns_op(S, int(steps), precision)
