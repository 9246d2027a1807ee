"""The DeepTransformers' mixer (docs/math.md §8): deep_transformer, swdt and dot.

The ATLAS mixer's pipeline (§1, AtlasMixer) with another memory: no feature map, gates eta and gamma only
(§4; no decay, no momentum), and dual_memory_scan, whose first layer lives on the exponential kernel's infinite
features, kept in dual form (J: the written keys with their coefficients). The members differ only in config (the
inner loss and the Omega window, §8's table).

Cache: AtlasMixer's, with dual_memory_scan's state under `mem.<key>`. That state holds every written key, as a KV
cache does, so it grows by one key per token. Context parallelism passes it like every block cache: rank r receives J
of all earlier segments (every key with its coefficient) and W1, and sends their gradient back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.config import ModelConfig
from atlas_train.model.fast_weights import FastWeightInit
from atlas_train.model.gates import MemoryGates
from atlas_train.ops import dual_memory_scan


class DualMixer(AtlasMixer):
    def _build_memory(self, cfg: ModelConfig) -> None:
        """Gates eta and gamma; W1, the persistent pairs (K0, A0) and LN; the kernel's scale s_h per head, stored
        softplus-inverse and starting at sqrt(dh) (§8)."""
        H, dh = cfg.n_heads, cfg.head_dim
        self.scan_options = dict(chunk_size=cfg.chunk_size, loss=cfg.inner_loss)
        self.gates = MemoryGates(cfg, decay=False)
        self.memory = FastWeightInit(H, dh, cfg.memory_expansion * dh, dh, gated=False, layer_norm=cfg.memory_ln,
                                     persistent=cfg.n_persistent)
        self.scale_raw = nn.Parameter(torch.full((H,), math.log(math.expm1(math.sqrt(dh)))))

    def _memory(self, x, q, k, v, doc_start, state_in, gamma_tail):
        q, k = F.normalize(torch.cat((q, k)), dim=-1, eps=1e-6).chunk(2)
        _, eta, _, gamma, gamma_tail = self.gates(x, gamma_tail)
        params = {**self.memory.as_dict(), "scale": F.softplus(self.scale_raw)}
        y, state = dual_memory_scan(q, k, v, eta, gamma, params, doc_start=doc_start, state=state_in,
                                    **self.scan_options)
        if self.training:  # for the trainer's logging, as AtlasMixer's
            with torch.no_grad():
                self.last_stats = {"eta": eta.mean(), "fast_W1_norm": state["W1"].flatten(-2).norm(dim=-1).mean()}
        return y, state, gamma_tail
