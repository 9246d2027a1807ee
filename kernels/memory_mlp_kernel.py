"""The memory MLP's token pass in Triton, forward and backward: reads f(P; z) and the inner-loss gradient factors of
every key of a chunk at one set of shared fast weights (docs/math.md §3.1-3.3).

Why a kernel: in PyTorch the gradient factors of one pass are 35 ops forward (two matmuls per layer, GELU and its
derivative, LayerNorm and its hand-written backward, the error) and 81 in the scan's backward, which differentiates
that hand-written gradient once more (second derivatives of GELU and LayerNorm); a read is 8 and 17 (aten ops other
than views, counted on CPU at dh 64). Every chunk of the scan runs them for its keys (and, with update="chunk", for
its queries), on matrices so small that launches, not arithmetic, bound the chunk update (a small fraction of the
card's matmul rate at dh 64). Here a program owns BLOCK_T tokens of one (batch, head) and streams the
hidden layer through in BLOCK_HID-wide tiles, so the hidden activations never go to memory except as outputs:

  forward   p = W2 z, a = gelu(p), o = W1 a, f = z[:dv] + LN(o);  with FACTORS also e = f - v (l2) or -v (dot),
            g_out = dLN(o)ᵀ (e ⊙ w_ln), g_pre = (W1ᵀ g_out) ⊙ gelu'(p)  (∇W1 = g_out ⊗ a, ∇W2 = g_pre ⊗ z);
  backward  given upstream gradients of (f, g_out, a, g_pre), three passes over the hidden tiles: the first
            recomputes o, the second gathers t = ∂J/∂g_out (which needs every tile), then the dv-wide LayerNorm
            algebra (second order: g_out is linear in e ⊙ w_ln with a projection that depends on the normalised
            output), and the third forms ∂J/∂p, the weight gradients of the tile and ∂J/∂z.
The weight gradients of each program go to a per-token-block buffer that the caller sums (no atomics: the sum is
deterministic, so a resumed run recomputes the same numbers).

Covers the default memory (2-layer MLP, GELU, optional LayerNorm, residual) with feature dims up to 256 and hidden
up to 1024, float32 (or float64, for the interpreter's tests) tokens and weights. The gated memory (W3) is left to
the PyTorch path (`memory_mlp_unsupported` says so, dispatch notes it once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atlas_train.kernels.triton_common import PRECISIONS, KernelCall, accumulator, mm
from atlas_train.ops.memory_mlp import LN_EPS

MAX_FEATURES = 256  # D and dv: a token's row is one register tile
MAX_HIDDEN = 1024
LOSSES = ("l2", "dot")
# Tile sizes and pipelining are set so that every launch fits Hopper's 227 KiB of shared memory with few register
# spills (benchmarks/kernel_resources.py compiles them offline; a test checks). Triton's default of 3 pipeline stages
# with 64-token blocks and 64-wide hidden tiles needed up to 664 KiB. Not yet tuned for speed on a GPU.
TILE_ELEMENTS = 4096  # a register tile holds about this many elements (BLOCK_T x the padded feature dim)
BLOCK_HID = 32
NUM_WARPS = {128: 4, 256: 8}  # by the widest padded feature tile: 8 warps keep a 256-wide one's tiles in registers
NUM_STAGES = 1  # no software pipelining of the hidden-tile loops: each stage is another copy of their tiles


@triton.jit
def _gelu_terms(p):
    """gelu(p) = p·Φ(p) and its first and second derivatives Φ + p·φ and φ·(2 − p²)."""
    cdf = 0.5 * (1.0 + tl.erf(p * 0.7071067811865476))
    pdf = tl.exp(-0.5 * p * p) * 0.3989422804014327
    return p * cdf, cdf + p * pdf, pdf * (2.0 - p * p)


@triton.jit
def _tile(base, rows, cols, n_rows, n_cols, s_row, s_col, ACC: tl.constexpr):
    """rows x cols of a strided matrix, zero outside n_rows x n_cols."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store(base, rows, cols, n_rows, n_cols, s_row, value):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * s_row + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _hidden_pre(z, W2, j, D, HIDDEN, s_w2o, s_w2i, d_cols, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """p = z W2[j]ᵀ for the hidden units j: (BLOCK_T, BLOCK_HID)."""
    return mm(z, _tile(W2, d_cols, j, D, HIDDEN, s_w2i, s_w2o, ACC), PRECISION, ACC)


@triton.jit
def _layer_out(z, W1, W2, D, DV, HIDDEN, s_w1o, s_w1i, s_w2o, s_w2i, d_cols, dv_cols, j_cols,
               BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_HID: tl.constexpr, HID_OUT, t_rows, N,
               STORE_HIDDEN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """o = W1 gelu(W2 z) over all hidden tiles: (BLOCK_T, BLOCK_DV); stores gelu(W2 z) when asked."""
    o = tl.zeros((BLOCK_T, BLOCK_DV), ACC)
    for j0 in range(0, HIDDEN, BLOCK_HID):
        j = j0 + j_cols
        a, _, _ = _gelu_terms(_hidden_pre(z, W2, j, D, HIDDEN, s_w2o, s_w2i, d_cols, PRECISION, ACC))
        if STORE_HIDDEN:
            _store(HID_OUT, t_rows, j, N, HIDDEN, HIDDEN, a)
        o += mm(a, _tile(W1, j, dv_cols, HIDDEN, DV, s_w1i, s_w1o, ACC), PRECISION, ACC)
    return o


@triton.jit
def _read(Z, W1, W2, LNW, LNB, HID_OUT, h, t_rows, N, D, DV, HIDDEN, s_zt, s_w1o, s_w1i, s_w2o, s_w2i, eps, d_cols,
          dv_cols, j_cols, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_HID: tl.constexpr,
          HAS_LN: tl.constexpr, STORE_HIDDEN: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """The tokens z, f = z[:dv] + LN(o) and the LayerNorm's normalised output, 1/σ and weight (o, 1 and 0 without
    LayerNorm) for one head's weights (pointers already at the head)."""
    z = _tile(Z, t_rows, d_cols, N, D, s_zt, 1, ACC)
    o = _layer_out(z, W1, W2, D, DV, HIDDEN, s_w1o, s_w1i, s_w2o, s_w2i, d_cols, dv_cols, j_cols, BLOCK_T, BLOCK_DV,
                   BLOCK_HID, HID_OUT, t_rows, N, STORE_HIDDEN, PRECISION, ACC)
    f = _tile(Z, t_rows, dv_cols, N, DV, s_zt, 1, ACC)
    dv_ok = dv_cols < DV
    if HAS_LN:
        lw = tl.load(LNW + h * DV + dv_cols, mask=dv_ok, other=0.0).to(ACC)[None, :]
        lb = tl.load(LNB + h * DV + dv_cols, mask=dv_ok, other=0.0).to(ACC)[None, :]
        centred = tl.where(dv_ok[None, :], o - _row_mean(o, DV), 0.0)
        rstd = 1.0 / tl.sqrt(_row_mean(centred * centred, DV) + eps)
        normed = centred * rstd
        f += normed * lw + lb
    else:
        lw = tl.zeros((1, BLOCK_DV), ACC)
        rstd = tl.full((BLOCK_T, 1), 1.0, ACC)
        normed = o
        f += o
    return z, f, normed, rstd, lw


@triton.jit
def _row_mean(x, DV):
    return (tl.sum(x, axis=1) / DV)[:, None]


@triton.jit
def _project(x, n, dv_ok, DV):
    """x − mean(x) − n·mean(x ⊙ n) per row (LayerNorm's backward without its 1/σ), zero in padded columns."""
    return tl.where(dv_ok[None, :], x - _row_mean(x, DV) - n * _row_mean(x * n, DV), 0.0)


@triton.jit
def _program(H, W1, W2, s_w1b, s_w1h, s_w2b, s_w2h, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, BLOCK_HID: tl.constexpr):
    """This program's (batch·head, token block), batch, head, token rows, the column ranges of its tiles, and its
    head's weights (W1, W2 moved to them).

    The batch·head index is 64-bit so that every buffer offset derived from it is: the per-token-block weight
    gradients pass 2^31 elements at large decode batches (e.g. 8192 batch·heads x 4 blocks x 256 x 512)."""
    pid_bh, pid_t = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    t_rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    return (pid_bh, pid_t, b, h, t_rows, tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_HID),
            W1 + b * s_w1b + h * s_w1h, W2 + b * s_w2b + h * s_w2h)


@triton.jit
def _token_pass_forward(Z, V, W1, W2, LNW, LNB, F, GO, HID, GP, H, N, D, DV, HIDDEN,
                        s_zb, s_zh, s_zt, s_vb, s_vh, s_vt, s_w1b, s_w1h, s_w1o, s_w1i, s_w2b, s_w2h, s_w2o, s_w2i,
                        eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_HID: tl.constexpr, HAS_LN: tl.constexpr, L2: tl.constexpr, FACTORS: tl.constexpr,
                        PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_bh, pid_t, b, h, t_rows, d_cols, dv_cols, j_cols, W1, W2 = _program(
        H, W1, W2, s_w1b, s_w1h, s_w2b, s_w2h, BLOCK_T, BLOCK_D, BLOCK_DV, BLOCK_HID)
    dv_ok = dv_cols < DV
    z, f, normed, rstd, lw = _read(Z + b * s_zb + h * s_zh, W1, W2, LNW, LNB, HID + pid_bh * N * HIDDEN, h, t_rows, N,
                                   D, DV, HIDDEN, s_zt, s_w1o, s_w1i, s_w2o, s_w2i, eps, d_cols, dv_cols, j_cols,
                                   BLOCK_T, BLOCK_DV, BLOCK_HID, HAS_LN, FACTORS, PRECISION, ACC)
    _store(F + pid_bh * N * DV, t_rows, dv_cols, N, DV, DV, f)
    if FACTORS:
        v = _tile(V + b * s_vb + h * s_vh, t_rows, dv_cols, N, DV, s_vt, 1, ACC)
        err = f - v if L2 else -v
        if HAS_LN:
            g_out = rstd * _project(err * lw, normed, dv_ok, DV)
        else:
            g_out = err
        _store(GO + pid_bh * N * DV, t_rows, dv_cols, N, DV, DV, g_out)
        GP += pid_bh * N * HIDDEN
        for j0 in range(0, HIDDEN, BLOCK_HID):
            j = j0 + j_cols
            _, d1, _ = _gelu_terms(_hidden_pre(z, W2, j, D, HIDDEN, s_w2o, s_w2i, d_cols, PRECISION, ACC))
            g_hid = mm(g_out, _tile(W1, dv_cols, j, DV, HIDDEN, s_w1o, s_w1i, ACC), PRECISION, ACC)
            _store(GP, t_rows, j, N, HIDDEN, HIDDEN, g_hid * d1)


@triton.jit
def _token_pass_backward(Z, V, W1, W2, LNW, LNB, DF, DGO, DA, DGP, DZ, DV_OUT, DW1, DW2, DLNW, DLNB,
                         H, N, D, DV, HIDDEN, n_blocks,
                         s_zb, s_zh, s_zt, s_vb, s_vh, s_vt, s_w1b, s_w1h, s_w1o, s_w1i, s_w2b, s_w2h, s_w2o, s_w2i,
                         eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_HID: tl.constexpr, HAS_LN: tl.constexpr, L2: tl.constexpr, FACTORS: tl.constexpr,
                         PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_bh, pid_t, b, h, t_rows, d_cols, dv_cols, j_cols, W1, W2 = _program(
        H, W1, W2, s_w1b, s_w1h, s_w2b, s_w2h, BLOCK_T, BLOCK_D, BLOCK_DV, BLOCK_HID)
    dv_ok = dv_cols < DV
    z, f, normed, rstd, lw = _read(Z + b * s_zb + h * s_zh, W1, W2, LNW, LNB, DA, h, t_rows, N, D, DV, HIDDEN, s_zt,
                                   s_w1o, s_w1i, s_w2o, s_w2i, eps, d_cols, dv_cols, j_cols, BLOCK_T, BLOCK_DV,
                                   BLOCK_HID, HAS_LN, False, PRECISION, ACC)
    d_f = _tile(DF + pid_bh * N * DV, t_rows, dv_cols, N, DV, DV, 1, ACC)  # ∂J/∂f, then everything reaching f
    g_out = tl.zeros((BLOCK_T, BLOCK_DV), ACC)
    d_normed = tl.zeros((BLOCK_T, BLOCK_DV), ACC)  # ∂J/∂(normalised o) other than through f
    d_rstd = tl.zeros((BLOCK_T, 1), ACC)  # ∂J/∂rstd where rstd is used directly (g_out's scale)
    d_lnw = tl.zeros((BLOCK_T, BLOCK_DV), ACC)
    DA += pid_bh * N * HIDDEN
    DGP += pid_bh * N * HIDDEN
    if FACTORS:
        v = _tile(V + b * s_vb + h * s_vh, t_rows, dv_cols, N, DV, s_vt, 1, ACC)
        err = f - v if L2 else -v
        # t = ∂J/∂g_out: its own upstream plus the path through g_pre = (W1ᵀ g_out) ⊙ gelu'(p)
        t = _tile(DGO + pid_bh * N * DV, t_rows, dv_cols, N, DV, DV, 1, ACC)
        for j0 in range(0, HIDDEN, BLOCK_HID):
            j = j0 + j_cols
            _, d1, _ = _gelu_terms(_hidden_pre(z, W2, j, D, HIDDEN, s_w2o, s_w2i, d_cols, PRECISION, ACC))
            q = _tile(DGP, t_rows, j, N, HIDDEN, HIDDEN, 1, ACC) * d1
            t += mm(q, _tile(W1, j, dv_cols, HIDDEN, DV, s_w1i, s_w1o, ACC), PRECISION, ACC)
        if HAS_LN:
            g_normed = err * lw
            projected = _project(g_normed, normed, dv_ok, DV)
            g_out = rstd * projected
            d_g_normed = rstd * _project(t, normed, dv_ok, DV)  # the projection is symmetric
            d_normed -= rstd * (g_normed * _row_mean(t * normed, DV) + t * _row_mean(g_normed * normed, DV))
            d_rstd += tl.sum(t * projected, axis=1)[:, None]
            d_err = d_g_normed * lw
            d_lnw += d_g_normed * err
        else:
            g_out = err
            d_err = t
        _store(DV_OUT + pid_bh * N * DV, t_rows, dv_cols, N, DV, DV, -d_err)
        if L2:
            d_f += d_err
    if HAS_LN:
        d_lnw += d_f * normed
        tl.store(DLNW + (pid_bh * n_blocks + pid_t) * DV + dv_cols, tl.sum(d_lnw, axis=0), mask=dv_ok)
        tl.store(DLNB + (pid_bh * n_blocks + pid_t) * DV + dv_cols, tl.sum(d_f, axis=0), mask=dv_ok)
        d_normed += d_f * lw
        d_o = rstd * _project(d_normed, normed, dv_ok, DV) - d_rstd * rstd * rstd * normed / DV
    else:
        d_o = d_f
    DW1 += (pid_bh * n_blocks + pid_t) * DV * HIDDEN
    DW2 += (pid_bh * n_blocks + pid_t) * HIDDEN * D
    d_z = tl.zeros((BLOCK_T, BLOCK_D), ACC)
    for j0 in range(0, HIDDEN, BLOCK_HID):
        j = j0 + j_cols
        a, d1, d2 = _gelu_terms(_hidden_pre(z, W2, j, D, HIDDEN, s_w2o, s_w2i, d_cols, PRECISION, ACC))
        w1 = _tile(W1, dv_cols, j, DV, HIDDEN, s_w1o, s_w1i, ACC)
        d_a = mm(d_o, w1, PRECISION, ACC)
        d_w1 = mm(tl.trans(d_o), a, PRECISION, ACC)
        if FACTORS:
            d_a += _tile(DA, t_rows, j, N, HIDDEN, HIDDEN, 1, ACC)
            d_gp = _tile(DGP, t_rows, j, N, HIDDEN, HIDDEN, 1, ACC)
            d_pre = d_a * d1 + d_gp * mm(g_out, w1, PRECISION, ACC) * d2
            d_w1 += mm(tl.trans(g_out), d_gp * d1, PRECISION, ACC)
        else:
            d_pre = d_a * d1
        _store(DW1, dv_cols, j, DV, HIDDEN, HIDDEN, d_w1)
        _store(DW2, j, d_cols, HIDDEN, D, D, mm(tl.trans(d_pre), z, PRECISION, ACC))
        d_z += mm(d_pre, _tile(W2, j, d_cols, HIDDEN, D, s_w2o, s_w2i, ACC), PRECISION, ACC)
    DZ += pid_bh * N * D
    _store(DZ, t_rows, d_cols, N, D, D, d_z)
    tl.debug_barrier()  # the residual z[:dv] adds ∂J/∂f to the first dv columns just stored by this program
    _store(DZ, t_rows, dv_cols, N, DV, D, _tile(DZ, t_rows, dv_cols, N, DV, D, 1, ACC) + d_f)


def memory_mlp_unsupported(w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, gated: bool, loss: str | None,
                           precision: str) -> str | None:
    """Why the kernel cannot take this pass (None if it can)."""
    if gated:
        return "the gated memory (W3) is not covered"
    if z.dtype not in (torch.float32, torch.float64) or w1.dtype != z.dtype or w2.dtype != z.dtype:
        return f"dtype {z.dtype} (weights {w1.dtype}, {w2.dtype}); float32 or float64 only"
    if precision not in PRECISIONS:
        return f"precision {precision!r} is not one of {PRECISIONS}"
    if loss is not None and loss not in LOSSES:
        return f"loss {loss!r}"
    dim, dv, hidden = z.shape[-1], w1.shape[-2], w1.shape[-1]
    if max(dim, dv) > MAX_FEATURES or hidden > MAX_HIDDEN:
        return f"D={dim}, dv={dv}, hidden={hidden} beyond {MAX_FEATURES}/{MAX_FEATURES}/{MAX_HIDDEN}"
    return None


def _blocks(n: int, dim: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_DV, n_blocks) for n tokens; tl.dot needs every side ≥ 16."""
    block_d = max(16, triton.next_power_of_2(dim))
    block_dv = max(16, triton.next_power_of_2(dv))
    block_t = max(16, min(64, triton.next_power_of_2(n), TILE_ELEMENTS // max(block_d, block_dv)))
    return block_t, block_d, block_dv, triton.cdiv(n, block_t)


def _weight_strides(w: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, row, col) strides, batch 0 for weights shared by every row (`params`)."""
    return (0 if w.shape[0] == 1 else w.stride(0)), w.stride(1), w.stride(2), w.stride(3)


def _common(z, v, w1, w2, ln_weight, loss, factors, precision):
    """Launch arguments both kernels share: grid, sizes, strides and ε, compile-time switches, token blocks."""
    batch, heads, n, dim = z.shape
    dv, hidden = w1.shape[-2:]
    block_t, block_d, block_dv, n_blocks = _blocks(n, dim, dv)
    vv = v if v is not None else z
    sizes = (heads, n, dim, dv, hidden)
    strides = (z.stride(0), z.stride(1), z.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
               *_weight_strides(w1), *_weight_strides(w2), LN_EPS)
    switches = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_HID=BLOCK_HID,
                    HAS_LN=ln_weight is not None, L2=loss == "l2", FACTORS=factors, PRECISION=precision,
                    ACC=accumulator(z.dtype),
                    num_warps=NUM_WARPS[max(128, block_d, block_dv)], num_stages=NUM_STAGES)
    return (batch * heads, n_blocks), sizes, strides, switches, n_blocks


def forward_call(z, v, w1, w2, ln_weight, ln_bias, loss, factors, precision):
    """The forward launch, with its output buffers (f, g_out, hidden, g_pre; the last three are f without factors)."""
    batch, heads, n, _ = z.shape
    dv, hidden = w1.shape[-2:]
    grid, sizes, strides, switches, _ = _common(z, v, w1, w2, ln_weight, loss, factors, precision)
    f = z.new_empty(batch, heads, n, dv)
    g_out = z.new_empty(batch, heads, n, dv) if factors else f
    hid = z.new_empty(batch, heads, n, hidden) if factors else f
    g_pre = z.new_empty(batch, heads, n, hidden) if factors else f
    ln_w, ln_b = (ln_weight, ln_bias) if ln_weight is not None else (z, z)
    call = KernelCall(_token_pass_forward, grid, (z, v if v is not None else z, w1, w2, ln_w, ln_b, f, g_out, hid,
                                                  g_pre, *sizes, *strides), switches)
    return call, (f, g_out, hid, g_pre)


def backward_call(z, v, w1, w2, ln_weight, ln_bias, d_f, d_g_out, d_hidden, d_g_pre, loss, factors, precision):
    """The backward launch, with its buffers: d_z, d_v, per-token-block d_W1 and d_W2, and the LayerNorm's."""
    batch, heads, n, dim = z.shape
    dv, hidden = w1.shape[-2:]
    grid, sizes, strides, switches, n_blocks = _common(z, v, w1, w2, ln_weight, loss, factors, precision)
    d_z = torch.empty_like(z, memory_format=torch.contiguous_format)
    d_v = z.new_empty(batch, heads, n, dv) if factors else d_z
    d_w1 = z.new_empty(batch, heads, n_blocks, dv, hidden)
    d_w2 = z.new_empty(batch, heads, n_blocks, hidden, dim)
    d_ln = z.new_empty(2, batch, heads, n_blocks, dv) if ln_weight is not None else d_z.new_empty(2, 1, 1, 1, 1)
    ln_w, ln_b = (ln_weight, ln_bias) if ln_weight is not None else (z, z)
    call = KernelCall(_token_pass_backward, grid, (z, v if v is not None else z, w1, w2, ln_w, ln_b, d_f, d_g_out,
                                                   d_hidden, d_g_pre, d_z, d_v, d_w1, d_w2, d_ln[0], d_ln[1], *sizes,
                                                   n_blocks, *strides), switches)
    return call, (d_z, d_v, d_w1, d_w2, d_ln)


def _backward(z, v, w1, w2, ln_weight, ln_bias, d_f, d_g_out, d_hidden, d_g_pre, loss, factors, precision):
    call, (d_z, d_v, d_w1, d_w2, d_ln) = backward_call(z, v, w1, w2, ln_weight, ln_bias, d_f, d_g_out, d_hidden,
                                                       d_g_pre, loss, factors, precision)
    call()
    d_w1, d_w2 = d_w1.sum(2), d_w2.sum(2)
    if w1.shape[0] == 1:
        d_w1 = d_w1.sum(0, keepdim=True)
    if w2.shape[0] == 1:
        d_w2 = d_w2.sum(0, keepdim=True)
    d_ln = d_ln.sum((1, 3)) if ln_weight is not None else None
    return d_z, (d_v if factors else None), d_w1, d_w2, d_ln


# A torch custom op (opaque to torch.compile, like the NS kernel's): always four outputs, the last three empty when no
# factors are asked for (their gradients are then ignored).
@torch.library.custom_op("atlas_train::memory_mlp_pass", mutates_args=())
def _pass_op(z: torch.Tensor, v: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
             ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, loss: str, factors: bool,
             precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    call, (f, g_out, hid, g_pre) = forward_call(z, v, w1, w2, ln_weight, ln_bias, loss, factors, precision)
    call()
    if not factors:  # a custom op's outputs may not alias each other
        return f, f.new_empty(0), f.new_empty(0), f.new_empty(0)
    return f, g_out, hid, g_pre


@_pass_op.register_fake
def _(z, v, w1, w2, ln_weight, ln_bias, loss, factors, precision):
    batch, heads, n, _ = z.shape
    dv, hidden = w1.shape[-2:]
    if not factors:
        return z.new_empty(batch, heads, n, dv), z.new_empty(0), z.new_empty(0), z.new_empty(0)
    return (z.new_empty(batch, heads, n, dv), z.new_empty(batch, heads, n, dv), z.new_empty(batch, heads, n, hidden),
            z.new_empty(batch, heads, n, hidden))


@torch.library.custom_op("atlas_train::memory_mlp_pass_backward", mutates_args=())
def _pass_backward_op(z: torch.Tensor, v: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                      ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, d_f: torch.Tensor,
                      d_g_out: torch.Tensor, d_hidden: torch.Tensor, d_g_pre: torch.Tensor, loss: str, factors: bool,
                      precision: str) -> list[torch.Tensor]:
    d_z, d_v, d_w1, d_w2, d_ln = _backward(z, v, w1, w2, ln_weight, ln_bias, d_f, d_g_out, d_hidden, d_g_pre, loss,
                                           factors, precision)
    return [d_z, d_v if d_v is not None else z.new_empty(0), d_w1, d_w2,
            d_ln if d_ln is not None else z.new_empty(0)]


@_pass_backward_op.register_fake
def _(z, v, w1, w2, ln_weight, ln_bias, d_f, d_g_out, d_hidden, d_g_pre, loss, factors, precision):
    d_v = z.new_empty(*z.shape[:3], w1.shape[-2]) if factors else z.new_empty(0)
    d_ln = z.new_empty(2, *ln_weight.shape) if ln_weight is not None else z.new_empty(0)
    # contiguous, as the kernel and its sums write them (empty_like would keep a transposed input's strides)
    return [z.new_empty(z.shape), d_v, z.new_empty(w1.shape), z.new_empty(w2.shape), d_ln]


def _setup_context(ctx, inputs, output):
    z, v, w1, w2, ln_weight, ln_bias, ctx.loss, ctx.factors, ctx.precision = inputs
    ctx.has_v, ctx.has_ln = v is not None, ln_weight is not None
    ctx.save_for_backward(z, v, w1, w2, ln_weight, ln_bias)


def _pass_backward(ctx, d_f, d_g_out, d_hidden, d_g_pre):
    z, v, w1, w2, ln_weight, ln_bias = ctx.saved_tensors
    batch, heads, n, _ = z.shape
    dv, hidden = w1.shape[-2:]

    def upstream(grad, width):
        if not ctx.factors:
            return d_f  # not read by the kernel
        return z.new_zeros(batch, heads, n, width) if grad is None else grad.contiguous()

    d_f = z.new_zeros(batch, heads, n, dv) if d_f is None else d_f.contiguous()
    d_z, d_v, d_w1, d_w2, d_ln = _pass_backward_op(z, v, w1, w2, ln_weight, ln_bias, d_f, upstream(d_g_out, dv),
                                                   upstream(d_hidden, hidden), upstream(d_g_pre, hidden), ctx.loss,
                                                   ctx.factors, ctx.precision)
    d_v = d_v if ctx.factors and ctx.has_v else None
    d_lnw, d_lnb = (d_ln[0], d_ln[1]) if ctx.has_ln else (None, None)
    return d_z, d_v, d_w1, d_w2, d_lnw, d_lnb, None, None, None


_pass_op.register_autograd(_pass_backward, setup_context=_setup_context)


def memory_mlp_pass(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ln: dict | None, *,
                    v: torch.Tensor | None = None, loss: str | None = None, precision: str = "tf32"):
    """f(P; z) for tokens z (B, H, N, D) at weights W1 (B|1, H, dv, hid), W2 (B|1, H, hid, D); with v (B, H, N, dv)
    and a loss also the gradient factors (g_out, hidden, g_pre) of ℓ(P; z, v), as `memory_mlp.loss_gradient_factors`
    defines them. Differentiable in z, v, the weights and the LayerNorm; callers check `memory_mlp_unsupported`."""
    factors = v is not None
    if z.stride(-1) != 1:
        z = z.contiguous()
    if factors and v.stride(-1) != 1:
        v = v.contiguous()
    ln_weight, ln_bias = (ln["ln_weight"].contiguous(), ln["ln_bias"].contiguous()) if ln is not None else (None, None)
    f, g_out, hidden, g_pre = _pass_op(z, v, w1, w2, ln_weight, ln_bias, loss or "l2", factors, precision)
    return (f, g_out, hidden, g_pre) if factors else f
