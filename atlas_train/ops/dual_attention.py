"""The attention pass of `dual_memory_scan` (docs/math.md §8): h at a set of points from the written keys.

    out[i] = Σ_{j < lim[i], doc_k[j] = doc_x[i]} κ(x_i, k_j) · v_j,     κ(x, y) = exp(θ·(x·y − 1))  ("exp")
                                                                          or (x·y) + θ·(x·y)²   ("poly2", tests)

for points x (B, H, M, dh), keys k (B, H, N, dh) and values v (B, H, N, e) (coefficients of the first memory layer,
e = hid, or gradients flowing back to them), θ (H,) per head. `lim` (M,) int64 on the points' device,
nondecreasing, or None for no limit: the keys a point may see by position (a chunk sees the keys written before it).
Document ids (B, M), (B, N) keep documents apart. Unnormalised (no softmax): with unit keys and points every exp term
is at most 1.

The scan uses it as the reads' and anchors' pull over J and, with the roles of points and keys swapped, to carry
gradients back to the coefficients. The PyTorch implementation below works on blocks of points, so that it never
holds more than BLOCK × N kernel values; its backward recomputes a block under autograd. A fast implementation (a
flash-style Triton kernel) provides the same two functions; `implementation` is where the scan gets them from
(the registry's "dual_attention").
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from atlas_train.ops.registry import fast_path

KERNELS = ("exp", "poly2")
BLOCK = 512  # points per block of the PyTorch implementation


def kernel_values(dots: torch.Tensor, kind: str, theta: torch.Tensor) -> torch.Tensor:
    """κ from the dot products x·y (B|1, H, ..., M, N), θ (H,)."""
    t = theta.view(1, -1, *([1] * (dots.dim() - 2)))
    if kind == "exp":
        return torch.exp(t * (dots - 1.0))
    return dots + t * dots * dots


def _block_values(x, k, lim, x_doc, k_doc, kind, theta):
    """Masked κ (B, H, m, n) of a block of points against the keys they may see."""
    values = kernel_values(x @ k.transpose(-1, -2), kind, theta)
    mask = x_doc[:, :, None] == k_doc[:, None, :]
    if lim is not None:
        mask = mask & (torch.arange(k.shape[2], device=k.device)[None, :] < lim[:, None])
    return values * mask[:, None].to(values.dtype)


def _blocks(lim: torch.Tensor | None, n_points: int, n_keys: int):
    """(start, end, keys seen) of each block of points (on a GPU, reading the limits costs a sync per block: this is
    the fallback there)."""
    for start in range(0, n_points, BLOCK):
        end = min(n_points, start + BLOCK)
        seen = n_keys if lim is None else min(n_keys, int(lim[start:end].max()))
        yield start, end, seen


def attend_torch(x, k, v, lim, x_doc, k_doc, kind, theta) -> torch.Tensor:
    """`out` of the module's docstring, block by block, in PyTorch."""
    out = x.new_zeros(*x.shape[:-1], v.shape[-1])
    for start, end, seen in _blocks(lim, x.shape[2], k.shape[2]):
        if seen == 0:
            continue
        values = _block_values(x[:, :, start:end], k[:, :, :seen], None if lim is None else lim[start:end],
                               x_doc[:, start:end], k_doc[:, :seen], kind, theta)
        out[:, :, start:end] = values @ v[:, :, :seen]
    return out


def attend_backward_torch(x, k, v, lim, x_doc, k_doc, kind, theta, grad_out, need_v: bool = True):
    """Gradients (dx, dk, dv or None, dθ) of <grad_out, out>, block by block: each block recomputed under autograd."""
    dx, dk = torch.zeros_like(x), torch.zeros_like(k)
    dv = torch.zeros_like(v) if need_v else None
    dtheta = torch.zeros_like(theta)
    for start, end, seen in _blocks(lim, x.shape[2], k.shape[2]):
        if seen == 0:
            continue
        leaves = [t.detach().requires_grad_() for t in (x[:, :, start:end], k[:, :, :seen], v[:, :, :seen], theta)]
        with torch.enable_grad():
            values = _block_values(leaves[0], leaves[1], None if lim is None else lim[start:end],
                                   x_doc[:, start:end], k_doc[:, :seen], kind, leaves[3])
            out = values @ (leaves[2] if need_v else leaves[2].detach())
            wanted = [leaves[0], leaves[1], leaves[3]] + ([leaves[2]] if need_v else [])
            grads = torch.autograd.grad(out, wanted, grad_out[:, :, start:end])
        dx[:, :, start:end] += grads[0]
        dk[:, :, :seen] += grads[1]
        dtheta += grads[2]
        if need_v:
            dv[:, :, :seen] += grads[3]
    return dx, dk, dv, dtheta


class _Attend(torch.autograd.Function):
    """One pass by an implementation, differentiable: its backward is the implementation's."""

    @staticmethod
    def forward(ctx, impl, kind, lim, x, k, v, x_doc, k_doc, theta):
        ctx.impl, ctx.kind, ctx.lim = impl, kind, lim
        ctx.save_for_backward(x, k, v, x_doc, k_doc, theta)
        return impl.forward(x, k, v, lim, x_doc, k_doc, kind, theta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, k, v, x_doc, k_doc, theta = ctx.saved_tensors
        dx, dk, dv, dtheta = ctx.impl.backward(x, k, v, ctx.lim, x_doc, k_doc, ctx.kind, theta, grad_out,
                                               ctx.needs_input_grad[5])
        return None, None, None, dx, dk, dv, None, None, dtheta


def attend(impl, x, k, v, lim, x_doc, k_doc, kind, theta) -> torch.Tensor:
    """`impl.forward` under autograd (the decode step's passes; the chunked scan calls the two functions itself)."""
    return _Attend.apply(impl, kind, lim, x, k, v, x_doc, k_doc, theta)


class Implementation(NamedTuple):
    """One implementation of the pass: `forward(x, k, v, lim, x_doc, k_doc, kind, theta)` -> out, and
    `backward(..., theta, grad_out, need_v)` -> (dx, dk, dv or None, dθ)."""

    forward: Callable
    backward: Callable


TORCH = Implementation(attend_torch, attend_backward_torch)


def implementation(x: torch.Tensor, width: int, kind: str, half_inputs: bool) -> Implementation:
    """The implementation the scan uses for points like x (B, H, M, d) with values `width` wide, for a model in half
    precision or not: the fast path "dual_attention" of the registry on CUDA where it takes the pass (the kernels'
    Triton pass), else the PyTorch one."""
    fast = fast_path("dual_attention", x, width, kind, half_inputs) if x.is_cuda else None
    return TORCH if fast is None else fast
