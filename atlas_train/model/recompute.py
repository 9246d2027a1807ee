"""Activation checkpointing of the blocks: `none`, `selective` or `full`, chosen from outside the model.

- `full`: a block keeps only its input for backward and recomputes its whole body there (Megatron's "full"
  recompute): about one extra forward per step for the activation memory of one block at a time. Memory members
  need it at production shapes, because their scan keeps a fast-weight snapshot per chunk and head.
- `selective`: a block keeps the outputs of its matrix products and attention kernels and recomputes only the
  element-wise work between them (norms, activations, rotary embedding, gating) in backward, which is cheap in
  FLOPs but large in bytes (torch.utils.checkpoint's selective policy; torch.compile honours it). It applies to
  blocks without a memory scan: the scan is a custom autograd function whose internals a per-operator policy
  cannot see, so it would be recomputed whole, and its in-place work on products would corrupt the saved ones.
- `none`: keep everything (the fastest where it fits).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

RECOMPUTE_MODES = ("none", "selective", "full")


@lru_cache(maxsize=None)
def _saved_operators() -> frozenset:
    """Matrix products and attention kernels: the operators whose outputs `selective` keeps."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def _keep_products(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in _saved_operators() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """torch.utils.checkpoint's `context_fn` for the `selective` mode."""
    return create_selective_checkpoint_contexts(_keep_products)
