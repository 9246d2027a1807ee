"""The attention pass of `dual_memory_scan` in Triton, forward and backward, flash-style (docs/math.md §8).

    out[i] = Σ_{j < lim[i], doc_k[j] = doc_x[i]} exp(θ_h·(x_i·k_j − 1)) · v_j

for points x (B, H, M, d), keys k (B, H, N, d), values v (B, H, N, e) (e = hid: the first memory layer's
coefficients), `lim` (M,) nondecreasing on the device (a point sees the keys written before its chunk) and document
ids; the contract of `atlas_train.ops.dual_attention` for its "exp" kernel. No softmax, so no running maximum: with
unit x and k every term is at most 1, and fp32 accumulation holds the sum. Nothing of size M × N is ever written:

* forward: one program per (block of points, head, block of e) walks the key blocks its points may see;
* backward, with z = x·k, κ = exp(θ(z − 1)) and dP = dout·vᵀ (so dZ = θ·κ·dP):
      dv[j] = Σ_i κ_ij dout_i          (`_dv_kernel`, per key block and e block; skipped when not needed)
      dk[j] = Σ_i dZ_ij x_i,  dθ = Σ dP·κ·(z − 1)   (`_dk_kernel`, per key block)
      dx[i] = Σ_j dZ_ij k_j             (`_dx_kernel`, per block of points)
  each recomputing κ. Programs own their outputs (dθ: one part per key block, summed by PyTorch): no atomics, so a
  rerun gives the same numbers. The key-side kernels start at the first point that can see their block (`lim` is
  nondecreasing).

Products take `precision` ("ieee", "tf32", "bf16"; "ieee" under the interpreter and for float64), accumulation is
float32 (float64 for float64 tensors, the interpreter's exact checks). `implementation(precision)` gives the scan the
two functions it calls; `dispatch.dual_attention_fast` adds a first-use probe against the PyTorch path, as for the
other kernels, and `dispatch.dual_attention_or_none` is the registry's fast path "dual_attention".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atlas_train.kernels.triton_common import PRECISIONS, accumulator, input_refusal, launch_precision, mm
from atlas_train.ops.dual_attention import Implementation

# Launch constants (benchmarks/bench_dual_scan.py times the scan with them; benchmarks/bench_dual_attention.py --sweep
# times the passes alone under other values).
BLOCK = {"points": 64, "keys": 64, "values": 128}
NUM_WARPS = {"forward": 4, "dv": 4, "dk": 8, "dx": 8}
NUM_STAGES = {"forward": 3, "dv": 3, "dk": 3, "dx": 3}  # software-pipeline stages of the key or point loop
MAX_DIM = 256  # d and the e block are single register tiles
KERNEL_NAME = "the dual attention kernel"  # its name in fallback notes


@triton.jit
def _tile(base, rows, cols, n_rows, n_cols, ACC: tl.constexpr):
    """A (rows, cols) tile of a row-major (n_rows, n_cols) matrix, zeros outside, in the accumulation dtype."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _points(X, LIM, XDOC, THETA, bh, batch, head, points, dims, M, D, ACC: tl.constexpr):
    """A block of points: (x (BM, BD), their limits, their documents, θ of the head)."""
    x = _tile(X + bh * M * D, points, dims, M, D, ACC)
    lim = tl.load(LIM + points, mask=points < M, other=0)
    x_doc = tl.load(XDOC + batch * M + points, mask=points < M, other=0)
    return x, lim, x_doc, tl.load(THETA + head).to(ACC)


@triton.jit
def _keys(K, KDOC, bh, batch, keys, dims, N, D, ACC: tl.constexpr):
    """A block of keys: (k (BN, BD), their documents)."""
    return _tile(K + bh * N * D, keys, dims, N, D, ACC), tl.load(KDOC + batch * N + keys, mask=keys < N, other=0)


@triton.jit
def _kernel_values(x, k, points, keys, lim, x_doc, k_doc, n_keys, theta, PRECISION: tl.constexpr,
                   ACC: tl.constexpr):
    """(κ masked to the pairs that count, z − 1) for a block of points x (BM, BD) and keys k (BN, BD)."""
    shifted = mm(x, tl.trans(k), PRECISION, ACC) - 1.0
    seen = (keys[None, :] < lim[:, None]) & (x_doc[:, None] == k_doc[None, :]) & (keys[None, :] < n_keys)
    return tl.where(seen, tl.exp(theta * shifted), 0.0), shifted


@triton.jit
def _forward_kernel(X, K, V, LIM, XDOC, KDOC, THETA, OUT, H, M, N, D, E,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                    PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_m, bh, pid_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    batch, head = bh // H, bh % H
    points = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    values = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    x, lim, x_doc, theta = _points(X, LIM, XDOC, THETA, bh, batch, head, points, dims, M, D, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_E), ACC)
    for start in range(0, tl.max(lim, axis=0), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k, k_doc = _keys(K, KDOC, bh, batch, keys, dims, N, D, ACC)
        kappa, _ = _kernel_values(x, k, points, keys, lim, x_doc, k_doc, N, theta, PRECISION, ACC)
        acc += mm(kappa, _tile(V + bh * N * E, keys, values, N, E, ACC), PRECISION, ACC)
    mask = (points[:, None] < M) & (values[None, :] < E)
    tl.store(OUT + bh * M * E + points[:, None] * E + values[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dv_kernel(X, K, LIM, XDOC, KDOC, THETA, GRAD, FIRST, DV, H, M, N, D, E,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_n, bh, pid_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    batch, head = bh // H, bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    values = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    k, k_doc = _keys(K, KDOC, bh, batch, keys, dims, N, D, ACC)
    theta = tl.load(THETA + head).to(ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_E), ACC)
    for start in range(tl.load(FIRST + pid_n), M, BLOCK_M):
        points = start + tl.arange(0, BLOCK_M)
        x, lim, x_doc, _ = _points(X, LIM, XDOC, THETA, bh, batch, head, points, dims, M, D, ACC)
        kappa, _ = _kernel_values(x, k, points, keys, lim, x_doc, k_doc, N, theta, PRECISION, ACC)
        acc += mm(tl.trans(kappa), _tile(GRAD + bh * M * E, points, values, M, E, ACC), PRECISION, ACC)
    mask = (keys[:, None] < N) & (values[None, :] < E)
    tl.store(DV + bh * N * E + keys[:, None] * E + values[None, :], acc.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _grad_products(GRAD, V, bh, points, keys, M, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dP = dout · vᵀ (BM, BN) over every block of e."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for start in range(0, E, BLOCK_E):
        values = start + tl.arange(0, BLOCK_E)
        grad = _tile(GRAD + bh * M * E, points, values, M, E, ACC)
        acc += mm(grad, tl.trans(_tile(V + bh * N * E, keys, values, N, E, ACC)), PRECISION, ACC)
    return acc


@triton.jit
def _dk_kernel(X, K, V, LIM, XDOC, KDOC, THETA, GRAD, FIRST, DK, DTHETA, H, M, N, D, E,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    batch, head = bh // H, bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k, k_doc = _keys(K, KDOC, bh, batch, keys, dims, N, D, ACC)
    theta = tl.load(THETA + head).to(ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dtheta = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for start in range(tl.load(FIRST + pid_n), M, BLOCK_M):
        points = start + tl.arange(0, BLOCK_M)
        x, lim, x_doc, _ = _points(X, LIM, XDOC, THETA, bh, batch, head, points, dims, M, D, ACC)
        kappa, shifted = _kernel_values(x, k, points, keys, lim, x_doc, k_doc, N, theta, PRECISION, ACC)
        weighted = kappa * _grad_products(GRAD, V, bh, points, keys, M, N, E, BLOCK_M, BLOCK_N, BLOCK_E,
                                          PRECISION, ACC)
        acc += mm(tl.trans(weighted * theta), x, PRECISION, ACC)
        dtheta += weighted * shifted
    mask = (keys[:, None] < N) & (dims[None, :] < D)
    tl.store(DK + bh * N * D + keys[:, None] * D + dims[None, :], acc.to(DK.dtype.element_ty), mask=mask)
    n_blocks = tl.num_programs(0)
    tl.store(DTHETA + bh * n_blocks + pid_n, tl.sum(tl.sum(dtheta, axis=1), axis=0).to(DTHETA.dtype.element_ty))


@triton.jit
def _dx_kernel(X, K, V, LIM, XDOC, KDOC, THETA, GRAD, DX, H, M, N, D, E,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    batch, head = bh // H, bh % H
    points = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    x, lim, x_doc, theta = _points(X, LIM, XDOC, THETA, bh, batch, head, points, dims, M, D, ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for start in range(0, tl.max(lim, axis=0), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k, k_doc = _keys(K, KDOC, bh, batch, keys, dims, N, D, ACC)
        kappa, _ = _kernel_values(x, k, points, keys, lim, x_doc, k_doc, N, theta, PRECISION, ACC)
        weighted = kappa * _grad_products(GRAD, V, bh, points, keys, M, N, E, BLOCK_M, BLOCK_N, BLOCK_E,
                                          PRECISION, ACC)
        acc += mm(weighted * theta, k, PRECISION, ACC)
    mask = (points[:, None] < M) & (dims[None, :] < D)
    tl.store(DX + bh * M * D + points[:, None] * D + dims[None, :], acc.to(DX.dtype.element_ty), mask=mask)


def dual_attention_unsupported(x: torch.Tensor, kind: str, precision: str) -> str | None:
    """Why the kernel cannot take such a pass, or None when it can."""
    if kind != "exp":
        return f"kernel {kind!r} (the Triton pass computes the exp kernel only)"
    if x.shape[-1] > MAX_DIM:
        return f"head dim {x.shape[-1]} > {MAX_DIM}"
    return input_refusal(x, precision, PRECISIONS)


def _block(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(size)))


class _Launch:
    """The sizes, contiguous inputs and limits of one pass, shared by its forward and backward launches."""

    def __init__(self, x, k, v, lim, x_doc, k_doc, theta, precision: str):
        self.batch, self.heads, self.m, self.d = x.shape
        self.n, self.e = k.shape[2], v.shape[-1]
        self.x, self.k, self.v = x.contiguous(), k.contiguous(), v.contiguous()
        limits = torch.full((self.m,), self.n, device=x.device) if lim is None else lim.clamp(max=self.n)
        self.lim = limits.to(torch.int32)
        self.x_doc, self.k_doc = x_doc.contiguous(), k_doc.contiguous()
        self.theta = theta.detach().contiguous()
        self.meta = dict(BLOCK_M=BLOCK["points"], BLOCK_N=BLOCK["keys"], BLOCK_D=_block(self.d, MAX_DIM),
                         BLOCK_E=_block(self.e, BLOCK["values"]), PRECISION=launch_precision(x.dtype, precision),
                         ACC=accumulator(x.dtype))
        self.sizes = (self.heads, self.m, self.n, self.d, self.e)

    def first_points(self) -> torch.Tensor:
        """Per key block, the first block of points that can see any of its keys (lim is nondecreasing)."""
        starts = torch.arange(0, self.n, BLOCK["keys"], dtype=torch.int32, device=self.x.device)
        first = torch.searchsorted(self.lim, starts, right=True)
        return (first // BLOCK["points"] * BLOCK["points"]).to(torch.int32)

    def grid(self, rows: int, block: str, *more) -> tuple:
        return (triton.cdiv(rows, BLOCK[block]), self.batch * self.heads, *more)


def dual_attention_forward(x, k, v, lim, x_doc, k_doc, kind, theta, precision: str = "ieee") -> torch.Tensor:
    """`out` (B, H, M, e) of the module's docstring."""
    _refuse(x, kind, precision, lim)
    run = _Launch(x, k, v, lim, x_doc, k_doc, theta, precision)
    out = x.new_zeros(run.batch, run.heads, run.m, run.e)
    if run.m == 0 or run.n == 0:  # nothing to launch (a state without keys, say)
        return out
    _forward_kernel[run.grid(run.m, "points", triton.cdiv(run.e, run.meta["BLOCK_E"]))](
        run.x, run.k, run.v, run.lim, run.x_doc, run.k_doc, run.theta, out, *run.sizes, **run.meta,
        num_warps=NUM_WARPS["forward"], num_stages=NUM_STAGES["forward"])
    return out


def dual_attention_backward(x, k, v, lim, x_doc, k_doc, kind, theta, grad_out, need_v: bool = True,
                            precision: str = "ieee"):
    """(dx, dk, dv or None, dθ (H,)) of <grad_out, out>."""
    _refuse(x, kind, precision, lim)
    run = _Launch(x, k, v, lim, x_doc, k_doc, theta, precision)
    if run.m == 0 or run.n == 0:  # nothing to launch: every gradient is zero
        return torch.zeros_like(x), torch.zeros_like(k), torch.zeros_like(v) if need_v else None, torch.zeros_like(
            theta)
    grad = grad_out.contiguous()
    first = run.first_points()
    dx, dk = torch.empty_like(run.x), torch.empty_like(run.k)
    dtheta = x.new_empty(run.batch, run.heads, triton.cdiv(run.n, BLOCK["keys"]))
    common = (run.lim, run.x_doc, run.k_doc, run.theta, grad)
    _dk_kernel[run.grid(run.n, "keys")](run.x, run.k, run.v, *common, first, dk, dtheta, *run.sizes, **run.meta,
                                        num_warps=NUM_WARPS["dk"], num_stages=NUM_STAGES["dk"])
    _dx_kernel[run.grid(run.m, "points")](run.x, run.k, run.v, *common, dx, *run.sizes, **run.meta,
                                          num_warps=NUM_WARPS["dx"], num_stages=NUM_STAGES["dx"])
    dv = None
    if need_v:
        dv = torch.empty_like(run.v)
        _dv_kernel[run.grid(run.n, "keys", triton.cdiv(run.e, run.meta["BLOCK_E"]))](
            run.x, run.k, *common, first, dv, *run.sizes, **run.meta, num_warps=NUM_WARPS["dv"],
            num_stages=NUM_STAGES["dv"])
    return dx, dk, dv, dtheta.sum(dim=(0, 2))


def _refuse(x, kind, precision, lim) -> None:
    reason = dual_attention_unsupported(x, kind, precision)
    if reason is None and lim is not None and not x.is_cuda and bool((lim[1:] < lim[:-1]).any()):
        reason = "limits must be nondecreasing"  # checked off the GPU only: on it, reading them back would sync
    if reason is not None:
        raise ValueError(f"dual attention kernel: {reason}")


def implementation(precision: str) -> Implementation:
    """The kernel as the scan's attention pass, with products in `precision`."""
    def forward(x, k, v, lim, x_doc, k_doc, kind, theta):
        return dual_attention_forward(x, k, v, lim, x_doc, k_doc, kind, theta, precision)

    def backward(x, k, v, lim, x_doc, k_doc, kind, theta, grad_out, need_v=True):
        return dual_attention_backward(x, k, v, lim, x_doc, k_doc, kind, theta, grad_out, need_v, precision)

    return Implementation(forward, backward)


def pass_results(impl: Implementation, inputs: dict, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """out and then dx, dk, dv, dθ of one pass by `impl`: what the probe and the tests compare."""
    out = impl.forward(**inputs)
    return [out, *impl.backward(**inputs, grad_out=grad_out, need_v=True)]


def random_pass(batch: int, heads: int, points: int, keys: int, d: int, e: int, *, device,
                dtype) -> tuple[dict, torch.Tensor]:
    """Random inputs of one pass (unit points and keys, two documents, limits rising by chunk) and an upstream
    gradient: the arguments of `pass_results`."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    chunk = max(1, points // 4)
    inputs = dict(x=torch.nn.functional.normalize(randn(batch, heads, points, d), dim=-1),
                  k=torch.nn.functional.normalize(randn(batch, heads, keys, d), dim=-1), v=randn(batch, heads, keys, e),
                  lim=torch.arange(points, device=device) // chunk * keys // 4 + 1,
                  x_doc=(torch.arange(points, device=device) >= points // 2).long().expand(batch, points),
                  k_doc=(torch.arange(keys, device=device) >= keys // 3).long().expand(batch, keys), kind="exp",
                  theta=(1.0 + 7.0 * torch.rand(heads, generator=gen, dtype=torch.float64)).to(device=device,
                                                                                              dtype=dtype))
    return inputs, randn(batch, heads, points, e)
