"""Weighted sums of outer products for every token of a chunk, Σ_k coef[t, k] left_k ⊗ right_k (+ scale_t·prev).

The token update forms two tensors of this shape, the largest it has ((B, H, L, out, in): 134 MB per chunk for the
W2 of dh 64): the momenta of its tokens (docs/math.md §3.4: window gradients are sums of outer products, memory_mlp)
and, in backward, the gradient of the tokens' Newton–Schulz updates (memory_mlp.TokenWeights). On a GPU both go to the
fast path "weighted_outer_sums" (registry.py: the kernels' Triton kernel, which writes the result once); elsewhere,
or where it declines, PyTorch's einsum computes the same function. Callers reach `weighted_outer_sums` through this
module's attribute, so that tests can stand a kernel in for it on CPU.
"""

from __future__ import annotations

import torch

from atlas_train.ops.registry import fast_path


def outer_sum(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_k coef[..., t, k] left_k ⊗ right_k for coef (B, H, L, K), left (B, H, K, out), right (B, H, K, in) →
    (B, H, L, out, in)."""
    return torch.einsum("bhtk,bhko,bhki->bhtoi", coef, left, right)


def outer_sum_of_keys(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_k coef[..., k] left_k ⊗ right_k for one set of weights coef (B, H, K) → (B, H, out, in): `outer_sum` with a
    single row, taken out with squeeze, whose backward is a view (indexing [:, :, 0] would write a zero tensor)."""
    return outer_sum(coef.unsqueeze(-2), left, right).squeeze(2)


def weighted_outer_sums_reference(coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor,
                                  prev: torch.Tensor) -> torch.Tensor:
    """Σ_k coef[t, k] left_k ⊗ right_k + scale_t·prev for every t (scale (B, H, L), prev (B, H, out, in)), in
    PyTorch: the reference of the kernel."""
    return torch.addcmul(outer_sum(coef, left, right), scale[..., None, None], prev[:, :, None])


def weighted_outer_sums(coef, left, right, scale, prev, half_inputs: bool) -> torch.Tensor:
    """`weighted_outer_sums_reference` by the registered fast path on CUDA where it takes these tensors (in the
    scan's product precision for a model in half precision or not), else by PyTorch."""
    if coef.is_cuda:
        fast = fast_path("weighted_outer_sums", coef, left, right, scale, prev, half_inputs)
        if fast is not None:
            return fast
    return weighted_outer_sums_reference(coef, left, right, scale, prev)
