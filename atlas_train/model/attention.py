"""Softmax attention with RoPE, through SDPA or FlexAttention: full causal (Transformer++ baseline) or
sliding-window (hybrids).

Documents never see each other: a query attends to key j only when j is causal, inside the window, and in the same
document. Which kernel does it, for a call without a cache (training, prefill):
- no documents (`doc_start=None`) and a window that covers the call: SDPA's `is_causal` fast path (cuDNN on GPUs);
- otherwise, on GPUs with ATLAS_FLEX_ATTENTION=1: compiled FlexAttention with a block-sparse mask shared by all
  layers (document_mask.py). A `doc_start` that marks token 0 only also goes there: pass None instead (the trainer
  does) for the fast path;
- otherwise (CPU, where FlexAttention has no backward): SDPA with a dense (B, T, Tk) mask, or the fast path when no
  row has a document start after token 0.
Calls with a cache (decoding, context parallelism) give SDPA a dense mask over the cached and new keys.

Cache (flat dict, not detached so context parallelism can pass it between ranks with gradients):
`pos` () int64 tokens seen; `k`, `v` (B, H, Tc, dh) the last keys/values after RoPE (all of them for full
attention, the last window-1 for SWA); `k_doc` (B, Tc) their document index; `doc` (B,) the current document index.
Without autograd (decoding) `k`, `v` and `k_doc` are views of buffers with spare room that the next call fills in
place (`_append`), so a generated token costs amortised O(1) copying instead of a copy of the whole cache.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from atlas_train.model.config import ModelConfig
from atlas_train.model.document_mask import block_mask_for, flex_attend
from atlas_train.model.rope import RotaryTable, apply_rope, rope_cos_sin, rope_dtype

# On GPUs cuDNN's fused attention first (the fastest on Hopper), then flash, memory-efficient and math: SDPA's own
# default order would take flash. On CPU SDPA keeps its own choice.
CUDA_BACKEND_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    if q.is_cuda:
        with sdpa_kernel(CUDA_BACKEND_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


# Devices where calls without a cache that need a document or window mask take FlexAttention (see the docstring).
# Opt-in (ATLAS_FLEX_ATTENTION=1) until benchmarks/bench_attention.py's GPU checks have passed on the project's GPU
# stack; off, GPUs take the dense-mask SDPA path as CPUs do.
FLEX_DEVICE_TYPES = ("cuda",) if os.environ.get("ATLAS_FLEX_ATTENTION", "0") == "1" else ()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        """window None: full causal attention; window w: query i sees keys i-w+1 .. i."""
        super().__init__()
        d, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.window, self.rope_theta = window, cfg.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rope = RotaryTable(cfg.max_seq_len, self.head_dim // 2, self.rope_theta)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], -1, self.head_dim)

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                return_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        B, T, _ = x.shape
        pos0 = cache["pos"] if cache else torch.zeros((), dtype=torch.long, device=x.device)
        positions = pos0 + torch.arange(T, device=x.device)
        table = None if cache else self.rope.lookup(T, x.dtype)  # positions 0..T-1
        cos, sin = table or rope_cos_sin(positions, self.head_dim // 2, self.rope_theta, rope_dtype(x.dtype))
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin).transpose(1, 2)
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin).transpose(1, 2)
        v = self._heads(self.v_proj(x)).transpose(1, 2)  # (B, H, T, dh)

        starts = doc_start.long() if doc_start is not None else x.new_zeros(B, T, dtype=torch.long)
        doc0 = cache["doc"] if cache else x.new_zeros(B, dtype=torch.long)
        q_doc = doc0[:, None] + starts.cumsum(1)  # (B, T)
        n_cached = cache["k"].shape[2] if cache else 0
        keep = n_cached + T if self.window is None else min(n_cached + T, self.window - 1)
        if cache:
            k, k_keep = _append(cache["k"], k, 2, keep)
            v, v_keep = _append(cache["v"], v, 2, keep)
            k_doc, doc_keep = _append(cache["k_doc"], q_doc, 1, keep)
        else:
            k_doc = q_doc
            k_keep, v_keep, doc_keep = k[:, :, T - keep:], v[:, :, T - keep:], q_doc[:, T - keep:]

        window = self.window if self.window is not None and T > self.window else None  # None: nothing falls out
        if n_cached == 0 and q.device.type in FLEX_DEVICE_TYPES and (doc_start is not None or window is not None):
            out = flex_attend(q, k, v, block_mask_for(doc_start, T, window, x.device))
        elif n_cached == 0 and window is None and (doc_start is None or not bool(doc_start[:, 1:].any())):
            out = _attend(q, k, v, is_causal=True)
        else:
            k_pos = pos0 - n_cached + torch.arange(k.shape[2], device=x.device)
            lag = positions[:, None] - k_pos[None, :]  # (T, Tk)
            allowed = lag >= 0
            if self.window is not None:
                allowed = allowed & (lag < self.window)
            allowed = allowed[None] & (q_doc[:, :, None] == k_doc[:, None, :])  # (B, T, Tk)
            out = _attend(q, k, v, attn_mask=allowed[:, None])
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

        new_cache = None
        if return_cache:
            new_cache = {"pos": pos0 + T, "k": k_keep, "v": v_keep, "k_doc": doc_keep, "doc": q_doc[:, -1]}
        return y, new_cache


def _append(cached: torch.Tensor, new: torch.Tensor, dim: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.cat((cached, new), dim)` and its last `keep` entries (the next cache).

    Without autograd the result is written into a buffer with spare room along `dim`, and the kept view is tagged
    with it: the next call writes `new` in place after `cached` when `cached` is that view and nothing has been
    written after it yet (a cache used a second time gets a fresh buffer, so every cache handed out stays valid);
    otherwise it copies into a buffer twice the needed size. Decoding then copies amortised O(1) per token instead
    of the whole cache. With autograd (training, context parallelism) in-place writes would clobber tensors saved
    for backward, so it stays a plain cat.
    """
    if torch.is_grad_enabled():
        full = torch.cat((cached, new), dim)
        return full, full.narrow(dim, full.shape[dim] - keep, keep)
    n, t = cached.shape[dim], new.shape[dim]
    dtype = torch.promote_types(cached.dtype, new.dtype)  # what cat would give
    buf, start = getattr(cached, "_append_slot", (None, 0))
    if buf is None or buf._append_end != start + n or start + n + t > buf.shape[dim] or buf.dtype != dtype:
        size = list(cached.shape)
        size[dim] = 2 * (n + t)
        buf = cached.new_empty(size, dtype=dtype)
        buf.narrow(dim, 0, n).copy_(cached)
        start = 0
    end = start + n + t
    buf.narrow(dim, start + n, t).copy_(new)
    buf._append_end = end
    kept = buf.narrow(dim, end - keep, keep)
    kept._append_slot = (buf, end - keep)
    return buf.narrow(dim, start, n + t), kept
