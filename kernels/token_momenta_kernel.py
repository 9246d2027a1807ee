"""Every token's momentum of a chunk in Triton, forward and backward (update="token", docs/math.md §3.4).

    M_t = Σ_k mix[t, k] · left_k ⊗ right_k + scale_t · prev        for t < L, k < K = c − 1 + L

(B, H, L, out, in) from mix (B, H, L, K), the window gradients' factors left (B, H, K, out) and right (B, H, K, in),
the carried momentum's decay scale (B, H, L) and the momentum carried in, prev (B, H, out, in). The same function
(K = L) is the gradient of the token update's per-token updates (`memory_mlp._TokenReads`): mix there is the reads'
mixing matrix transposed, left and right the reads' output gradients and inputs, prev the last matrix's gradient.

Why a kernel: the PyTorch path (`outer_sums.outer_sum`, an einsum, then an addcmul) writes a (K, out) intermediate
per token, copies it into the layout its batched GEMM wants, writes the momenta and rewrites them with the carried
term; its backward, autograd's, forms dM·rightᵀ for every token, (L, out, K) per head, and reduces it with further
elementwise passes. Those are the largest tensors of the token update (the W2 momenta of dh 64 are 134 MB per chunk)
and these passes a large part of its elementwise time in a profile of the scan. Here the forward writes
each momentum once, and the backward reads the momenta's gradient dM four times and writes no tensor of its size:

    dleft[k, o]  = Σ_t mix[t, k] Σ_i right[k, i] dM_t[o, i]      (`_weighted_contraction`, m = i, j = o)
    dright[k, i] = Σ_t mix[t, k] Σ_o left[k, o] dM_t[o, i]       (`_weighted_contraction`, m = o, j = i)
    dmix[t, k]   = Σ_o left[k, o] (dM_t rightᵀ)[o, k],  dscale_t = <dM_t, prev>      (`_mix_grad_kernel`)
    dprev        = Σ_t scale_t dM_t                              (one batched GEMV in PyTorch)

Programs that share an output write their parts to a buffer that PyTorch sums (over token groups, or over out
blocks): no atomics, so a resumed run recomputes the same numbers. All of K is one register tile (K ≤ MAX_KEYS).
Products take the scan's product precision ('ieee' for a float32 model, 'tf32' where Newton–Schulz runs in bf16:
`dispatch.scan_product_precision`), accumulated in float32 (float64 for the interpreter's checks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from atlas_train.kernels.triton_common import KernelCall, accumulator, input_refusal, launch_precision, mm

MAX_KEYS = 256  # K = c − 1 + L in one register tile: window c ≤ 128 with chunks of 64 gives K ≤ 191
SCAN_PRECISIONS = ("ieee", "tf32")  # the scan's products are never bf16 (dispatch.scan_product_precision)
# Launch constants (benchmarks/bench_momenta.py --sweep compares others on a GPU; kernel_resources.py compiles them):
# The forward's tiles: each program writes one (out, in) tile of one M_t; 64x64 tiles made the token scan a little
# faster than 64x128 at dh 64 and 128.
BLOCK = {"out": 64, "in": 64, "keys": 32}
NUM_WARPS = {"forward": 4, "contraction": 8, "mix": 4}
MIX_BLOCK_OUT = 32  # out rows per program of the dmix kernel (16 where K needs a 256-wide key tile)
TARGET_PROGRAMS = 512  # the weighted contraction splits the tokens into groups until its grid has about this many


@triton.jit
def _load(base, rows, cols, n_rows, n_cols, s_row, s_col, ACC: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0).to(ACC)


@triton.jit
def _momenta_kernel(MIX, LEFT, RIGHT, SCALE, PREV, OUT, L, K, N_OUT, N_IN,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, ACC: tl.constexpr):
    """One (out, in) tile of M_t for one token row = (b·H + h)·L + t. (Programs of 2, 4 or 8 tokens, loading the
    carried tile once, are no faster in the scan.)"""
    row = tl.program_id(0).to(tl.int64)
    head = row // L
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.load(SCALE + row).to(ACC) * _load(PREV + head * N_OUT * N_IN, o, i, N_OUT, N_IN, N_IN, 1, ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        weight = tl.load(MIX + row * K + k, mask=k < K, other=0.0).to(ACC)
        left = _load(LEFT + head * K * N_OUT, k, o, K, N_OUT, N_OUT, 1, ACC) * weight[:, None]  # (BLOCK_K, BLOCK_O)
        right = _load(RIGHT + head * K * N_IN, k, i, K, N_IN, N_IN, 1, ACC)  # (BLOCK_K, BLOCK_I)
        acc += mm(tl.trans(left), right, PRECISION, ACC)
    mask = (o[:, None] < N_OUT) & (i[None, :] < N_IN)
    tl.store(OUT + row * N_OUT * N_IN + o[:, None] * N_IN + i[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_contraction(MIX, F, G, PART, L, K, MD, JD, s_gm, s_gj, tokens_per_group,
                          BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                          PRECISION: tl.constexpr, ACC: tl.constexpr):
    """PART[group, head, k, j] = Σ_{t in group} mix[t, k] Σ_m F[k, m] G_t[m, j]: F (K, MD) per head, G_t the
    gradient dM_t read through strides (s_gm, s_gj), so that (m, j) = (o, i) or (i, o)."""
    head = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    group = tl.program_id(2)
    k = tl.arange(0, BLOCK_K)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    mm_ = tl.arange(0, BLOCK_M)
    f_base = F + head * K * MD
    acc = tl.zeros((BLOCK_K, BLOCK_J), ACC)
    t_start = group * tokens_per_group
    t_end = tl.minimum(t_start + tokens_per_group, L)
    for m0 in range(0, MD, BLOCK_M):  # F's tile is loaded once for the group's tokens
        f = _load(f_base, k, m0 + mm_, K, MD, MD, 1, ACC)  # (BLOCK_K, BLOCK_M)
        for t in range(t_start, t_end):
            row = head * L + t
            g = _load(G + row * MD * JD, m0 + mm_, j, MD, JD, s_gm, s_gj, ACC)  # (BLOCK_M, BLOCK_J)
            weight = tl.load(MIX + row * K + k, mask=k < K, other=0.0).to(ACC)
            acc += weight[:, None] * mm(f, g, PRECISION, ACC)
    n_heads = tl.num_programs(0).to(tl.int64)
    mask = (k[:, None] < K) & (j[None, :] < JD)
    out = PART + (group * n_heads + head) * K * JD
    tl.store(out + k[:, None] * JD + j[None, :], acc.to(PART.dtype.element_ty), mask=mask)


@triton.jit
def _mix_grad_kernel(DM, LEFT, RIGHT, PREV, DMIX_PART, DSCALE_PART, L, K, N_OUT, N_IN,
                     BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                     PRECISION: tl.constexpr, ACC: tl.constexpr):
    """For one token row and one block of out rows: the block's part of dmix[t, :] and of dscale_t."""
    row = tl.program_id(0).to(tl.int64)
    ob = tl.program_id(1)
    head = row // L
    k = tl.arange(0, BLOCK_K)
    o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
    ii = tl.arange(0, BLOCK_I)
    p = tl.zeros((BLOCK_O, BLOCK_K), ACC)  # (dM_t rightᵀ)[o, k] for this block's o
    dot_prev = tl.zeros((BLOCK_O, BLOCK_I), ACC)
    for i0 in range(0, N_IN, BLOCK_I):
        g = _load(DM + row * N_OUT * N_IN, o, i0 + ii, N_OUT, N_IN, N_IN, 1, ACC)  # (BLOCK_O, BLOCK_I)
        right = _load(RIGHT + head * K * N_IN, k, i0 + ii, K, N_IN, N_IN, 1, ACC)  # (BLOCK_K, BLOCK_I)
        p += mm(g, tl.trans(right), PRECISION, ACC)
        dot_prev += g * _load(PREV + head * N_OUT * N_IN, o, i0 + ii, N_OUT, N_IN, N_IN, 1, ACC)
    left = _load(LEFT + head * K * N_OUT, o, k, N_OUT, K, 1, N_OUT, ACC)  # leftᵀ: (BLOCK_O, BLOCK_K)
    n_rows = tl.num_programs(0).to(tl.int64)
    tl.store(DMIX_PART + (ob * n_rows + row) * K + k, tl.sum(left * p, axis=0).to(DMIX_PART.dtype.element_ty),
             mask=k < K)
    tl.store(DSCALE_PART + ob * n_rows + row, tl.sum(tl.sum(dot_prev, axis=1), axis=0).to(DSCALE_PART.dtype.element_ty))


def token_momenta_unsupported(mix: torch.Tensor, left: torch.Tensor, right: torch.Tensor, precision: str) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    reason = input_refusal(mix, precision, SCAN_PRECISIONS)
    if reason is not None:
        return reason
    if mix.shape[-1] > MAX_KEYS:
        return f"{mix.shape[-1]} window keys per chunk (c - 1 + L): the kernel takes up to {MAX_KEYS}"
    return None


def _sizes(mix: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    heads = mix.numel() // (mix.shape[-2] * mix.shape[-1])
    return heads, mix.shape[-2], mix.shape[-1], left.shape[-1], right.shape[-1]  # B·H, L, K, out, in


def _key_block(keys: int) -> int:
    return max(16, triton.next_power_of_2(keys))


def forward_call(mix, left, right, scale, prev, precision: str):
    """The forward launch on contiguous inputs, with its output buffer (B, H, L, out, in)."""
    heads, length, keys, n_out, n_in = _sizes(mix, left, right)
    out = mix.new_empty(*mix.shape[:-1], n_out, n_in)
    block_o = min(BLOCK["out"], max(16, triton.next_power_of_2(n_out)))
    block_i = min(BLOCK["in"], max(16, triton.next_power_of_2(n_in)))
    grid = (heads * length, triton.cdiv(n_out, block_o), triton.cdiv(n_in, block_i))
    call = KernelCall(_momenta_kernel, grid, (mix, left, right, scale, prev, out, length, keys, n_out, n_in), dict(
        BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_K=BLOCK["keys"], PRECISION=launch_precision(mix.dtype, precision),
        ACC=accumulator(mix.dtype), num_warps=NUM_WARPS["forward"], num_stages=2))
    return call, out


def contraction_call(mix, factor, grad, precision: str, transpose: bool):
    """The launch of `_weighted_contraction` for dright (factor = left) or, with `transpose`, dleft (factor = right),
    with its buffer of per-token-group parts (groups, B·H, K, j)."""
    heads, length, keys = mix.numel() // (mix.shape[-2] * mix.shape[-1]), mix.shape[-2], mix.shape[-1]
    n_o, n_i = grad.shape[-2:]
    m_dim, j_dim, strides = (n_i, n_o, (1, n_i)) if transpose else (n_o, n_i, (n_i, 1))
    block_k = _key_block(keys)
    block_j = min(64 if block_k <= 128 else 32, max(16, triton.next_power_of_2(j_dim)))
    block_m = min(32, max(16, triton.next_power_of_2(m_dim)))
    j_blocks = triton.cdiv(j_dim, block_j)
    groups = max(1, min(length, TARGET_PROGRAMS // (heads * j_blocks)))
    per_group = triton.cdiv(length, groups)
    groups = triton.cdiv(length, per_group)
    part = mix.new_empty(groups, heads, keys, j_dim)
    call = KernelCall(_weighted_contraction, (heads, j_blocks, groups), (
        mix, factor, grad, part, length, keys, m_dim, j_dim, *strides, per_group), dict(
        BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_J=block_j, PRECISION=launch_precision(mix.dtype, precision),
        ACC=accumulator(mix.dtype), num_warps=NUM_WARPS["contraction"], num_stages=2))
    return call, part


def mix_grad_call(grad, left, right, prev, mix, precision: str):
    """The launch of `_mix_grad_kernel`, with its buffers of per-out-block parts of dmix and dscale."""
    heads, length, keys, n_out, n_in = _sizes(mix, left, right)
    block_k = _key_block(keys)
    block_o = min(MIX_BLOCK_OUT if block_k <= 128 else 16, max(16, triton.next_power_of_2(n_out)))
    block_i = min(64, max(16, triton.next_power_of_2(n_in)))
    o_blocks = triton.cdiv(n_out, block_o)
    dmix_part = mix.new_empty(o_blocks, heads * length, keys)
    dscale_part = mix.new_empty(o_blocks, heads * length)
    call = KernelCall(_mix_grad_kernel, (heads * length, o_blocks), (
        grad, left, right, prev, dmix_part, dscale_part, length, keys, n_out, n_in), dict(
        BLOCK_K=block_k, BLOCK_O=block_o, BLOCK_I=block_i, PRECISION=launch_precision(mix.dtype, precision),
        ACC=accumulator(mix.dtype), num_warps=NUM_WARPS["mix"], num_stages=2))
    return call, dmix_part, dscale_part


def _inputs(*tensors):
    return [t.contiguous() for t in tensors]


# Torch custom ops (like newton_schulz_kernel's) so that torch.compile treats the kernels as opaque calls.
@torch.library.custom_op("atlas_train::token_momenta", mutates_args=())
def _momenta_op(mix: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, prev: torch.Tensor,
                precision: str) -> torch.Tensor:
    call, out = forward_call(*_inputs(mix, left, right, scale, prev), precision)
    call()
    return out


@_momenta_op.register_fake
def _(mix, left, right, scale, prev, precision):
    return mix.new_empty(*mix.shape[:-1], left.shape[-1], right.shape[-1])


@torch.library.custom_op("atlas_train::token_momenta_backward", mutates_args=())
def _momenta_backward_op(grad: torch.Tensor, mix: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                         scale: torch.Tensor, prev: torch.Tensor, precision: str) -> list[torch.Tensor]:
    grad, mix, left, right, scale, prev = _inputs(grad, mix, left, right, scale, prev)
    d_right_call, d_right = contraction_call(mix, left, grad, precision, transpose=False)
    d_left_call, d_left = contraction_call(mix, right, grad, precision, transpose=True)
    mix_call, d_mix, d_scale = mix_grad_call(grad, left, right, prev, mix, precision)
    for call in (d_right_call, d_left_call, mix_call):
        call()
    d_prev = (scale.unsqueeze(-2) @ grad.flatten(-2)).view(prev.shape)  # Σ_t scale_t dM_t
    return [d_mix.sum(0).view(mix.shape), d_left.sum(0).view(left.shape), d_right.sum(0).view(right.shape),
            d_scale.sum(0).view(scale.shape), d_prev]


@_momenta_backward_op.register_fake
def _(grad, mix, left, right, scale, prev, precision):
    return [t.new_empty(t.shape) for t in (mix, left, right, scale, prev)]  # contiguous, as the kernels write them


def _setup_context(ctx, inputs, output):
    *tensors, ctx.precision = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad):
    return (*_momenta_backward_op(grad, *ctx.saved_tensors, ctx.precision), None)


_momenta_op.register_autograd(_backward, setup_context=_setup_context)


def token_momenta(mix: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor, prev: torch.Tensor,
                  precision: str) -> torch.Tensor:
    """M (B, H, L, out, in) as in the module's docstring, differentiable in every input; callers check
    `token_momenta_unsupported` first."""
    reason = token_momenta_unsupported(mix, left, right, precision)
    if reason is not None:
        raise ValueError(f"token momenta kernel: {reason}")
    return _momenta_op(mix, left, right, scale, prev, precision)
