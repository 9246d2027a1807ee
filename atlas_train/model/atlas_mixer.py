"""The ATLAS mixer (docs/math.md §1, steps 1-8): a test-time-trained deep MLP memory in place of attention.

q, k, v projections → causal depthwise conv (document-aware) → SiLU → per-head L2 norm of q, k → feature map φ →
gates → memory_scan → per-head RMSNorm × SiLU output gate → output projection. The same class serves atlas,
atlas_pp, omeganet, titans and dla: they differ only in config (family defaults, spec section 5).

Cache (flat dict, never detached): `pos` () int64, `conv_q`/`conv_k`/`conv_v` (B, K-1, H·dh) conv inputs,
`gamma_tail` (B, c-1, H) with omega_gates "token", and memory_scan's state under `mem.<key>`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from atlas_train.model.config import ModelConfig
from atlas_train.model.conv import CausalDepthwiseConv
from atlas_train.model.fast_weights import FastWeightInit
from atlas_train.model.feature_maps import FeatureMap
from atlas_train.model.gates import MemoryGates
from atlas_train.model.norms import HeadRMSNorm
from atlas_train.ops import memory_scan

MEM_PREFIX = "mem."


class AtlasMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """cfg must be resolved (ModelConfig.resolved())."""
        super().__init__()
        d, H, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim = H, dh
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_conv = CausalDepthwiseConv(d, cfg.conv_kernel)
        self.k_conv = CausalDepthwiseConv(d, cfg.conv_kernel)
        self.v_conv = CausalDepthwiseConv(d, cfg.conv_kernel)
        self._build_memory(cfg)
        self.out_norm = HeadRMSNorm(H, dh, cfg.norm_eps)
        self.g_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.last_stats: dict[str, torch.Tensor] = {}

    def _build_memory(self, cfg: ModelConfig) -> None:
        """The scan's options, feature map, gates and initial fast weights: where memories of other kinds differ
        (DualMixer)."""
        H, dh = cfg.n_heads, cfg.head_dim
        self.scan_options = dict(chunk_size=cfg.chunk_size, ns_steps=cfg.ns_steps, update=cfg.update,
                                 loss=cfg.inner_loss)
        self.feature_map = FeatureMap(cfg.feature_map, H, dh, cfg.poly_degree, cfg.sketch_dim)
        self.gates = MemoryGates(cfg)
        self.memory = FastWeightInit(H, dh, cfg.memory_expansion * dh, self.feature_map.out_dim,
                                     gated=cfg.memory_gated, layer_norm=cfg.memory_ln)

    def _branch(self, proj: nn.Linear, conv: CausalDepthwiseConv, x, doc_start, cache, name):
        h, tail = conv(proj(x), doc_start, cache.get(name) if cache else None)
        return F.silu(h).view(*x.shape[:2], self.n_heads, self.head_dim), tail

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                return_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        B, T, _ = x.shape
        q, q_tail = self._branch(self.q_proj, self.q_conv, x, doc_start, cache, "conv_q")
        k, k_tail = self._branch(self.k_proj, self.k_conv, x, doc_start, cache, "conv_k")
        v, v_tail = self._branch(self.v_proj, self.v_conv, x, doc_start, cache, "conv_v")
        state_in = None
        if cache:
            state_in = {key[len(MEM_PREFIX):]: val for key, val in cache.items() if key.startswith(MEM_PREFIX)}
        gamma_tail = cache.get("gamma_tail") if cache else None
        y, state, gamma_tail = self._memory(x, q, k, v, doc_start, state_in, gamma_tail)
        out = self.o_proj((self.out_norm(y) * F.silu(self.g_proj(x)).view_as(y)).reshape(B, T, -1))

        new_cache = None
        if return_cache:
            pos0 = cache["pos"] if cache else torch.zeros((), dtype=torch.long, device=x.device)
            new_cache = {"pos": pos0 + T, "conv_q": q_tail, "conv_k": k_tail, "conv_v": v_tail}
            if gamma_tail is not None:
                new_cache["gamma_tail"] = gamma_tail
            new_cache.update({MEM_PREFIX + key: val for key, val in state.items()})
        return out, new_cache

    def _memory(self, x, q, k, v, doc_start, state_in, gamma_tail):
        """Steps 4-7 of spec section 1 on the activated q, k, v (B, T, H, dh): -> (y, memory state, new gamma tail)."""
        # q and k through the L2 norm and φ in one batch: half the kernel launches, which bound a decode step.
        zq, zk = self.feature_map(F.normalize(torch.cat((q, k)), dim=-1, eps=1e-6)).chunk(2)
        alpha, eta, theta, gamma, gamma_tail = self.gates(x, gamma_tail)
        y, state = memory_scan(zq, zk, v, alpha, eta, theta, gamma, self.memory.as_dict(), doc_start=doc_start,
                               state=state_in, **self.scan_options)
        if self.training:  # the trainer's logging reads them; a decode step would only pay for the extra kernels
            self._record_stats(alpha, eta, theta, state)
        return y, state, gamma_tail

    @torch.no_grad()
    def _record_stats(self, alpha, eta, theta, state: dict) -> None:
        """Detached means for logging; stays on device (no sync) until memory_stats() reads it."""
        stats = {"alpha": alpha.mean(), "eta": eta.mean(), "theta": theta.mean()}
        for name in ("W1", "W2", "W3"):  # current weights: "fast." for update="token", "anchor." for "chunk"
            weights = state.get(f"fast.{name}", state.get(f"anchor.{name}"))
            if weights is not None:
                stats[f"fast_{name}_norm"] = weights.detach().flatten(-2).norm(dim=-1).mean()
        self.last_stats = stats
