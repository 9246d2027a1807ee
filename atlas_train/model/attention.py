"""Softmax attention with RoPE and SDPA: full causal (Transformer++ baseline) or sliding-window (hybrids).

Documents never see each other: a query attends to key j only when j is causal, inside the window, and in the same
document. Rows whose only document start is token 0 use SDPA's `is_causal` fast path (flash kernels on GPU).

Cache (flat dict, not detached so context parallelism can pass it between ranks with gradients):
`pos` () int64 tokens seen; `k`, `v` (B, H, Tc, dh) the last keys/values after RoPE (all of them for full
attention, the last window-1 for SWA); `k_doc` (B, Tc) their document index; `doc` (B,) the current document index.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from atlas_train.model.config import ModelConfig
from atlas_train.model.rope import apply_rope


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

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], -1, self.head_dim)

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                return_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        B, T, _ = x.shape
        pos0 = cache["pos"] if cache else torch.zeros((), dtype=torch.long, device=x.device)
        positions = pos0 + torch.arange(T, device=x.device)
        q = apply_rope(self._heads(self.q_proj(x)), positions, self.rope_theta).transpose(1, 2)
        k = apply_rope(self._heads(self.k_proj(x)), positions, self.rope_theta).transpose(1, 2)
        v = self._heads(self.v_proj(x)).transpose(1, 2)  # (B, H, T, dh)

        starts = doc_start.long() if doc_start is not None else x.new_zeros(B, T, dtype=torch.long)
        doc0 = cache["doc"] if cache else x.new_zeros(B, dtype=torch.long)
        q_doc = doc0[:, None] + starts.cumsum(1)  # (B, T)
        if cache:
            k = torch.cat((cache["k"], k), dim=2)
            v = torch.cat((cache["v"], v), dim=2)
            k_doc = torch.cat((cache["k_doc"], q_doc), dim=1)
        else:
            k_doc = q_doc
        n_cached = k.shape[2] - T

        causal_only = n_cached == 0 and (self.window is None or T <= self.window) and (
            doc_start is None or not bool(doc_start[:, 1:].any()))
        if causal_only:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_pos = pos0 - n_cached + torch.arange(k.shape[2], device=x.device)
            lag = positions[:, None] - k_pos[None, :]  # (T, Tk)
            allowed = lag >= 0
            if self.window is not None:
                allowed = allowed & (lag < self.window)
            allowed = allowed[None] & (q_doc[:, :, None] == k_doc[:, None, :])  # (B, T, Tk)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

        new_cache = None
        if return_cache:
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            start = k.shape[2] - keep
            new_cache = {"pos": pos0 + T, "k": k[:, :, start:], "v": v[:, :, start:], "k_doc": k_doc[:, start:],
                         "doc": q_doc[:, -1]}
        return y, new_cache
