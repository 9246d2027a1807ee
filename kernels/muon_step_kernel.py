"""The chunk update's Muon step in one Triton kernel per direction: the window gradients' sum, momentum, Newton–Schulz
and the weight step of one fast-weight matrix per (batch, head) chain (docs/math.md §3.5, §3.7).

    G  = Σ_k coef_k left_k ⊗ right_k (+ prior: the gradient sum of an earlier piece of the grid chunk)
    M' = θ·M + G,    X = NS(M'),    A' = decay·A + descent·X

Why: unfused, the step is a cuBLAS product writing G, a pass forming M', the NS kernel (reading M', writing X), and a
pass forming A', each a launch and a pass over the chain's fast weights; its backward adds autograd's passes for both
gated sums, the NS backward, and two products for the factors' gradients (`bench_memory_scan.py --count-ops`
counts a chunk step's operators and bytes with and without this kernel). Here one
program per chain forms G tile by tile from the factors (G never goes to memory), writes M' and X_0, iterates NS on
X with the NS kernel's own code (`newton_schulz_kernel`: its variants and their shared-memory limits), and writes A'
from X as it streams it; the backward is one program per chain likewise: the gates' gradients and the NS
backward's start from dA', the NS backward in place, then M's and the factors' gradients from the one gradient of
M'. Everything is written once; the gates' gradients are per-program sums (no atomics: deterministic).

The matrix is taken in the NS kernel's wide orientation (M ≤ N, a tall one through swapped strides); the factor on
its short side is "fm", the other "fn". The product forming G (and its gradients) takes the scan's product
precision, NS its own (`dispatch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atlas_train.kernels.newton_schulz_kernel import (
    launch_layout,
    newton_schulz_unsupported,
    ns_backward_steps,
    ns_norm_backward,
    ns_steps_in_registers,
    ns_steps_streamed,
    scratch_buffer,
    tile_offsets,
)
from atlas_train.kernels.triton_common import PRECISIONS, KernelCall, input_refusal, launch_precision, mm
from atlas_train.ops.newton_schulz import NS_COEFFICIENTS as NS_COEFFS
from atlas_train.ops.newton_schulz import NS_NORM_EPS as NS_EPS

KERNEL_NAME = "the fused Muon step kernel"
# Window keys per factor tile (the chunk update's K is c − 1 + chunk: 127 at the defaults), and columns of G (and of
# its gradient) per tile: narrower than the NS variant's tiles (the "registers" variant's is the whole matrix), so that
# the factor tiles stay in registers beside G's; `benchmarks/kernel_resources.py --kernels muon` shows the spills of
# each choice.
BLOCK_K = 32
G_BLOCK_N = 64
MAX_KEYS = 512


@triton.jit
def _factor_tile(F, coef, k0, keys, cols, K, W, scaled: tl.constexpr, ACC: tl.constexpr):
    """Rows k0 + keys (window keys) × cols of a (K, W) factor, times coef_k where `scaled`; zero outside."""
    k = k0 + keys
    mask = (k[:, None] < K) & (cols[None, :] < W)
    tile = tl.load(F + k[:, None] * W + cols[None, :], mask=mask, other=0.0).to(ACC)
    if scaled:
        tile = tile * tl.load(coef + k, mask=k < K, other=0.0).to(ACC)[:, None]
    return tile


@triton.jit
def _program(GATES, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """This program's chain (64-bit, for the offsets derived from it), its tiles' row, column and key ranges, the
    matrix size, and the chain's θ, descent and decay."""
    pid = tl.program_id(0).to(tl.int64)
    theta = tl.load(GATES + pid * 3).to(ACC)
    descent = tl.load(GATES + pid * 3 + 1).to(ACC)
    decay = tl.load(GATES + pid * 3 + 2).to(ACC)
    return (pid, tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K), M * N, theta, descent,
            decay)


@triton.jit
def _muon_forward_kernel(COEF, FM, FN, PRIOR, MOM, ANCHOR, GATES, MOM_OUT, X, ANCHOR_OUT, SAVE, SCRATCH,
                         K, M, N, s_m, s_n, steps, a, b, c, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         G_BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr, VARIANT: tl.constexpr,
                         HAS_PRIOR: tl.constexpr, ORTHOGONALISE: tl.constexpr,
                         SAVE_ITERATES: tl.constexpr, PRODUCT_PRECISION: tl.constexpr, PRECISION: tl.constexpr,
                         ACC: tl.constexpr):
    pid, rows, cols, keys, size, theta, descent, decay = _program(GATES, M, N, BLOCK_M, BLOCK_N, BLOCK_K, ACC)
    coef, fm, fn = COEF + pid * K, FM + pid * K * M, FN + pid * K * N
    mom, m_out, x_base = MOM + pid * size, MOM_OUT + pid * size, X + pid * size
    save_base = SAVE + pid * size  # the iterates, (steps, n_matrices, M, N) as the NS kernel saves them
    save_step = tl.num_programs(0).to(tl.int64) * size
    scratch = SCRATCH + pid * 2 * BLOCK_M * BLOCK_M

    # M' = θ·M + G (+ prior), G formed from the factors in column tiles of G_BLOCK_N; |M'|_F on the way
    g_cols = tl.arange(0, G_BLOCK_N)
    sq = tl.zeros((BLOCK_M, G_BLOCK_N), ACC)
    for n0 in range(0, N, G_BLOCK_N):
        g = tl.zeros((BLOCK_M, G_BLOCK_N), ACC)
        for k0 in range(0, K, BLOCK_K):
            left = _factor_tile(fm, coef, k0, keys, rows, K, M, True, ACC)
            right = _factor_tile(fn, coef, k0, keys, n0 + g_cols, K, N, False, ACC)
            g += mm(tl.trans(left), right, PRODUCT_PRECISION, ACC)
        offsets, mask = tile_offsets(rows, n0 + g_cols, M, N, s_m, s_n)
        m_new = theta * tl.load(mom + offsets, mask=mask, other=0.0).to(ACC) + g
        if HAS_PRIOR:
            m_new += tl.load(PRIOR + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(m_out + offsets, m_new.to(MOM_OUT.dtype.element_ty), mask=mask)
        sq += m_new * m_new
    if ORTHOGONALISE:
        scale = 1.0 / (tl.sqrt(tl.sum(sq)) + eps)
    else:  # steps = 0: X = M'
        scale = 1.0
    tl.debug_barrier()

    # X = NS(M'), then A' = decay·A + descent·X
    if VARIANT == "registers":  # one tile: X stays in registers
        offsets, mask = tile_offsets(rows, cols, M, N, s_m, s_n)
        x = tl.load(m_out + offsets, mask=mask, other=0.0).to(ACC) * scale
        x = ns_steps_in_registers(x, save_base, save_step, rows, cols, M, N, steps, a, b, c, SAVE_ITERATES,
                                  PRECISION, ACC)
        if SAVE_ITERATES:  # the backward's dL/d(descent) needs X
            tl.store(x_base + offsets, x.to(X.dtype.element_ty), mask=mask)
        start = tl.load(ANCHOR + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(ANCHOR_OUT + pid * size + offsets, (decay * start + descent * x).to(ANCHOR_OUT.dtype.element_ty),
                 mask=mask)
    else:  # X in its buffer, streamed in column tiles
        for n0 in range(0, N, BLOCK_N):
            offsets, mask = tile_offsets(rows, n0 + cols, M, N, s_m, s_n)
            x = tl.load(m_out + offsets, mask=mask, other=0.0).to(ACC) * scale
            tl.store(x_base + offsets, x.to(X.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        ns_steps_streamed(x_base, s_m, s_n, save_base, save_step, scratch, scratch + BLOCK_M * BLOCK_M, M, N,
                          steps, a, b, c, BLOCK_M, BLOCK_N, ROW_BLOCK, VARIANT, SAVE_ITERATES, PRECISION, ACC)
        for n0 in range(0, N, BLOCK_N):
            offsets, mask = tile_offsets(rows, n0 + cols, M, N, s_m, s_n)
            x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC)
            start = tl.load(ANCHOR + pid * size + offsets, mask=mask, other=0.0).to(ACC)
            tl.store(ANCHOR_OUT + pid * size + offsets,
                     (decay * start + descent * x).to(ANCHOR_OUT.dtype.element_ty), mask=mask)


@triton.jit
def _muon_backward_kernel(COEF, FM, FN, MOM, ANCHOR, GATES, MOM_OUT, X, SAVE, SCRATCH, G_MOM, G_ANCHOR,
                          D, D_MOM, D_ANCHOR, D_FM, D_FN, D_COEF, D_GATES,
                          K, M, N, s_m, s_n, steps, a, b, c, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          G_BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr, VARIANT: tl.constexpr,
                          HAS_G_MOM: tl.constexpr, ORTHOGONALISE: tl.constexpr,
                          PRODUCT_PRECISION: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid, rows, cols, keys, size, theta, descent, decay = _program(GATES, M, N, BLOCK_M, BLOCK_N, BLOCK_K, ACC)
    d_base = D + pid * size  # dL/dX_i while NS is walked back, then dL/dM' (also G's and the prior's gradient)

    # A' = decay·A + descent·X: the gates' gradients, dA, and dL/dX to start the NS backward from
    d_decay = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    d_descent = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for n0 in range(0, N, BLOCK_N):
        offsets, mask = tile_offsets(rows, n0 + cols, M, N, s_m, s_n)
        g = tl.load(G_ANCHOR + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        d_decay += g * tl.load(ANCHOR + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        d_descent += g * tl.load(X + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(D_ANCHOR + pid * size + offsets, (decay * g).to(D_ANCHOR.dtype.element_ty), mask=mask)
        tl.store(d_base + offsets, (descent * g).to(D.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    ns_backward_steps(d_base, s_m, s_n, SAVE + pid * size, tl.num_programs(0).to(tl.int64) * size,
                      SCRATCH + pid * 4 * BLOCK_M * BLOCK_M, M, N, steps, a, b, c, BLOCK_M, BLOCK_N, ROW_BLOCK,
                      VARIANT, PRECISION, ACC)
    if ORTHOGONALISE:  # steps = 0: X = M', no normalisation
        ns_norm_backward(MOM_OUT + pid * size, d_base, s_m, s_n, M, N, eps, BLOCK_M, BLOCK_N, ACC)
    tl.debug_barrier()

    # M' = θ·M + G: dL/dM' = NS's gradient + the upstream one; dθ, dM
    d_theta = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for n0 in range(0, N, BLOCK_N):
        offsets, mask = tile_offsets(rows, n0 + cols, M, N, s_m, s_n)
        g = tl.load(d_base + offsets, mask=mask, other=0.0).to(ACC)
        if HAS_G_MOM:
            g += tl.load(G_MOM + pid * size + offsets, mask=mask, other=0.0).to(ACC)
            tl.store(d_base + offsets, g.to(D.dtype.element_ty), mask=mask)
        d_theta += g * tl.load(MOM + pid * size + offsets, mask=mask, other=0.0).to(ACC)
        tl.store(D_MOM + pid * size + offsets, (theta * g).to(D_MOM.dtype.element_ty), mask=mask)
    gate_ty = D_GATES.dtype.element_ty
    tl.store(D_GATES + pid * 3, tl.sum(d_theta).to(gate_ty))
    tl.store(D_GATES + pid * 3 + 1, tl.sum(d_descent).to(gate_ty))
    tl.store(D_GATES + pid * 3 + 2, tl.sum(d_decay).to(gate_ty))
    tl.debug_barrier()

    # G = (coef ⊙ fm)ᵀ fn: d fn = (coef ⊙ fm) dG, d(coef ⊙ fm) = fn dGᵀ, then coef's and fm's parts
    coef, fm, fn = COEF + pid * K, FM + pid * K * M, FN + pid * K * N
    g_cols = tl.arange(0, G_BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + keys
        left = _factor_tile(fm, coef, k0, keys, rows, K, M, False, ACC)
        weight = tl.load(coef + k, mask=k < K, other=0.0).to(ACC)
        d_scaled = tl.zeros((BLOCK_K, BLOCK_M), ACC)
        for n0 in range(0, N, G_BLOCK_N):
            offsets, mask = tile_offsets(rows, n0 + g_cols, M, N, s_m, s_n)
            g = tl.load(d_base + offsets, mask=mask, other=0.0).to(ACC)
            right = _factor_tile(fn, coef, k0, keys, n0 + g_cols, K, N, False, ACC)
            d_right = mm(left * weight[:, None], g, PRODUCT_PRECISION, ACC)
            n_mask = (k[:, None] < K) & ((n0 + g_cols)[None, :] < N)
            tl.store(D_FN + pid * K * N + k[:, None] * N + (n0 + g_cols)[None, :],
                     d_right.to(D_FN.dtype.element_ty), mask=n_mask)
            d_scaled += mm(right, tl.trans(g), PRODUCT_PRECISION, ACC)
        m_mask = (k[:, None] < K) & (rows[None, :] < M)
        tl.store(D_FM + pid * K * M + k[:, None] * M + rows[None, :],
                 (d_scaled * weight[:, None]).to(D_FM.dtype.element_ty), mask=m_mask)
        tl.store(D_COEF + pid * K + k, tl.sum(d_scaled * left, axis=1).to(D_COEF.dtype.element_ty), mask=k < K)


def muon_step_unsupported(momentum: torch.Tensor, keys: int, steps: int, product_precision: str,
                          precision: str) -> str | None:
    """Why the kernel cannot take this step, or None."""
    reason = (input_refusal(momentum, product_precision, PRECISIONS) or
              newton_schulz_unsupported(momentum, precision))
    if reason is not None:
        return reason
    if keys > MAX_KEYS:
        return f"{keys} window keys: at most {MAX_KEYS}"
    if steps < 0:
        return f"{steps} Newton-Schulz steps"
    return None


class _Layout:
    """A step's matrices as the kernels take them: (n, out, in) contiguous, read in the wide orientation, and its
    NS launch (variant, tiles, warps) as the NS kernel would choose it for these matrices."""

    def __init__(self, momentum: torch.Tensor, keys: int, precision: str, backward: bool):
        self.cfg = launch_layout(momentum, precision, backward)
        self.n, self.out, self.inp = self.cfg.mats.shape
        self.keys = keys
        self.tall = self.out > self.inp

    def meta(self, product_precision: str, steps: int) -> dict:
        cfg = self.cfg
        block_k = min(BLOCK_K, max(16, triton.next_power_of_2(self.keys)))
        return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, G_BLOCK_N=min(G_BLOCK_N, cfg.block_n),
                    ROW_BLOCK=cfg.row_block,
                    VARIANT=cfg.variant, PRODUCT_PRECISION=launch_precision(cfg.mats.dtype, product_precision),
                    PRECISION=cfg.precision, ACC=cfg.acc, ORTHOGONALISE=steps > 0, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)

    def sizes(self) -> tuple:
        cfg = self.cfg
        return self.keys, cfg.M, cfg.N, cfg.strides[1], cfg.strides[2]


def _short_long(left: torch.Tensor, right: torch.Tensor, tall: bool):
    """The factors on the short and the long side of the wide orientation."""
    return (right, left) if tall else (left, right)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def forward_call(coef, left, right, prior, momentum, anchor, gates, steps: int, product_precision: str,
                 precision: str, save: bool):
    """The forward launch on (n, ...) inputs, with its buffers: M', A', X and the iterates."""
    coef, left, right, prior, momentum, anchor, gates = _contiguous(coef, left, right, prior, momentum, anchor, gates)
    layout = _Layout(momentum, coef.shape[-1], precision, backward=False)
    fm, fn = _short_long(left, right, layout.tall)
    mom_out, anchor_out = torch.empty_like(momentum), torch.empty_like(anchor)
    x = torch.empty_like(momentum)
    shape = (steps, layout.n, layout.cfg.M, layout.cfg.N) if save else (1,)
    iterates = momentum.new_empty(shape, dtype=torch.bfloat16 if layout.cfg.precision == "bf16" and save
                                  else momentum.dtype)
    a, b, c = NS_COEFFS
    call = KernelCall(_muon_forward_kernel, (layout.n,), (
        coef, fm, fn, momentum if prior is None else prior, momentum, anchor, gates, mom_out, x, anchor_out,
        iterates, scratch_buffer(layout.cfg, 2), *layout.sizes(), steps, a, b, c, NS_EPS), dict(
        layout.meta(product_precision, steps), HAS_PRIOR=prior is not None, SAVE_ITERATES=save))
    return call, mom_out, anchor_out, x, iterates


def backward_call(coef, left, right, momentum, anchor, gates, mom_out, x, iterates, g_mom, g_anchor, steps: int,
                  product_precision: str, precision: str):
    """The backward launch, with its buffers: dM' (the gradient of G and of the prior), dM, dA, d fm, d fn, d coef
    and the gates' gradients (n, 3)."""
    coef, left, right, momentum, anchor, gates, mom_out, x, g_mom, g_anchor = _contiguous(
        coef, left, right, momentum, anchor, gates, mom_out, x, g_mom, g_anchor)
    layout = _Layout(momentum, coef.shape[-1], precision, backward=True)
    fm, fn = _short_long(left, right, layout.tall)
    d, d_mom, d_anchor = (torch.empty_like(momentum) for _ in range(3))
    d_fm, d_fn, d_coef, d_gates = (torch.empty_like(t) for t in (fm, fn, coef, gates))
    a, b, c = NS_COEFFS
    call = KernelCall(_muon_backward_kernel, (layout.n,), (
        coef, fm, fn, momentum, anchor, gates, mom_out, x, iterates, scratch_buffer(layout.cfg, 4),
        momentum if g_mom is None else g_mom, g_anchor, d, d_mom, d_anchor, d_fm, d_fn, d_coef, d_gates,
        *layout.sizes(), steps, a, b, c, NS_EPS), dict(layout.meta(product_precision, steps),
                                                       HAS_G_MOM=g_mom is not None))
    d_left, d_right = _short_long(d_fm, d_fn, layout.tall)
    return call, [d, d_mom, d_anchor, d_left, d_right, d_coef, d_gates]


# Torch custom ops (like newton_schulz_kernel's) so that torch.compile treats the kernels as opaque calls. The forward
# with grad also returns X and the iterates, which the backward reuses (the scan recomputes each chunk right before
# its backward, so they live only for that chunk).
@torch.library.custom_op("atlas_train::muon_step", mutates_args=())
def _muon_op(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor, prior: torch.Tensor | None,
             momentum: torch.Tensor, anchor: torch.Tensor, gates: torch.Tensor, steps: int, product_precision: str,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    call, mom_out, anchor_out, _, _ = forward_call(coef, left, right, prior, momentum, anchor, gates, steps,
                                                   product_precision, precision, save=False)
    call()
    return mom_out, anchor_out


@torch.library.custom_op("atlas_train::muon_step_saving", mutates_args=())
def _muon_saving_op(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor, prior: torch.Tensor | None,
                    momentum: torch.Tensor, anchor: torch.Tensor, gates: torch.Tensor, steps: int,
                    product_precision: str, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    call, *outputs = forward_call(coef, left, right, prior, momentum, anchor, gates, steps, product_precision,
                                  precision, save=True)
    call()
    return tuple(outputs)


@torch.library.custom_op("atlas_train::muon_step_backward", mutates_args=())
def _muon_backward_op(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor, momentum: torch.Tensor,
                      anchor: torch.Tensor, gates: torch.Tensor, mom_out: torch.Tensor, x: torch.Tensor,
                      iterates: torch.Tensor, g_mom: torch.Tensor | None, g_anchor: torch.Tensor, steps: int,
                      product_precision: str, precision: str) -> list[torch.Tensor]:
    call, grads = backward_call(coef, left, right, momentum, anchor, gates, mom_out, x, iterates, g_mom, g_anchor,
                                steps, product_precision, precision)
    call()
    return grads


# The fakes' outputs are contiguous, as the kernels write them.
@_muon_op.register_fake
def _(coef, left, right, prior, momentum, anchor, gates, steps, product_precision, precision):
    return momentum.new_empty(momentum.shape), anchor.new_empty(anchor.shape)


@_muon_saving_op.register_fake
def _(coef, left, right, prior, momentum, anchor, gates, steps, product_precision, precision):
    n, out, inp = momentum.shape
    bf16 = launch_precision(momentum.dtype, precision) == "bf16"
    iterates = momentum.new_empty((steps, n, min(out, inp), max(out, inp)),
                                  dtype=torch.bfloat16 if bf16 else momentum.dtype)
    return (momentum.new_empty(momentum.shape), anchor.new_empty(anchor.shape), momentum.new_empty(momentum.shape),
            iterates)


@_muon_backward_op.register_fake
def _(coef, left, right, momentum, anchor, gates, mom_out, x, iterates, g_mom, g_anchor, steps, product_precision,
      precision):
    return [t.new_empty(t.shape) for t in (momentum, momentum, anchor, left, right, coef, gates)]


def _setup_context(ctx, inputs, output):
    coef, left, right, prior, momentum, anchor, gates, ctx.steps, ctx.product_precision, ctx.precision = inputs
    mom_out, _, x, iterates = output
    ctx.has_prior = prior is not None
    ctx.save_for_backward(coef, left, right, momentum, anchor, gates, mom_out, x, iterates)
    ctx.mark_non_differentiable(x, iterates)
    ctx.set_materialize_grads(False)  # an absent gradient stays None: no zero tensors of the weights' size


def _backward(ctx, g_mom, g_anchor, _g_x, _g_iterates):
    if g_mom is None and g_anchor is None:  # nothing flows back through either output
        return (None,) * 10
    coef, left, right, momentum, anchor, gates, mom_out, x, iterates = ctx.saved_tensors
    if g_anchor is None:  # A' unused: M' alone carries gradient; the kernel starts from a zero dA'
        g_anchor = torch.zeros_like(anchor)
    d, d_mom, d_anchor, d_left, d_right, d_coef, d_gates = _muon_backward_op(
        coef, left, right, momentum, anchor, gates, mom_out, x, iterates, g_mom, g_anchor, ctx.steps,
        ctx.product_precision, ctx.precision)
    return d_coef, d_left, d_right, d if ctx.has_prior else None, d_mom, d_anchor, d_gates, None, None, None


_muon_saving_op.register_autograd(_backward, setup_context=_setup_context)


def muon_step(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps: int,
              product_precision: str, precision: str):
    """(M', A') of the module's docstring for coef (B, H, K), left (B, H, K, out), right (B, H, K, in), prior (None
    or like momentum), momentum and anchor (B|1, H, out, in) and per-chain gates (B|1, H, 1, 1); differentiable in
    every tensor; steps = 0 (the members without Muon: titans, omeganet, dla) steps with the raw momentum. Callers
    check `muon_step_unsupported` first."""
    batch, heads, keys = coef.shape
    out, inp = momentum.shape[-2:]
    reason = muon_step_unsupported(momentum, keys, steps, product_precision, precision)
    if reason is not None:
        raise ValueError(f"muon step kernel: {reason}")
    n = batch * heads

    def flat(t, *shape):  # an expanded input (zeros shared over the batch) becomes a copy; autograd sums back
        return t.expand(batch, heads, *shape).reshape(n, *shape).contiguous()

    gates = torch.cat([g.expand(batch, heads, 1, 1) for g in (momentum_gate, descent, decay)], dim=-1).view(n, 3)
    tensors = (flat(coef, keys), flat(left, keys, out), flat(right, keys, inp),
               None if prior is None else flat(prior, out, inp), flat(momentum, out, inp), flat(anchor, out, inp),
               gates)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        mom_out, anchor_out, _, _ = _muon_saving_op(*tensors, int(steps), product_precision, precision)
    else:
        mom_out, anchor_out = _muon_op(*tensors, int(steps), product_precision, precision)
    return mom_out.view(batch, heads, out, inp), anchor_out.view(batch, heads, out, inp)
