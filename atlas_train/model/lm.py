"""AtlasLM: embedding → blocks → final RMSNorm → LM head (tied to the embedding by config).

The model knows nothing of parallelism (torchtitan style): the parallel helper swaps its nn.Linear/nn.Embedding
modules from outside. Every projection is a separate, head-major Linear so heads split cleanly.

Cache: one flat dict[str, Tensor] for the whole model, keys `layers.<i>.<block key>`, never detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.block import Block
from atlas_train.model.config import ModelConfig
from atlas_train.model.fast_weights import FastWeightInit
from atlas_train.model.flops import training_flops_per_token
from atlas_train.model.hybrid import join_cache, split_cache
from atlas_train.model.norms import RMSNorm
from atlas_train.model.rope import share_rotary_tables

OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # residual-branch outputs, init scaled by 1/sqrt(2·n_layers)


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # (B, T, V)
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over labels != -100
    cache: Optional[dict] = None


class AtlasLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        """cfg must be resolved (build_model does that)."""
        super().__init__()
        if cfg.vocab_size == "auto":
            raise ValueError("model.vocab_size is auto, which a training run resolves from its dataset: give a number "
                             "to build a model on its own")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        share_rotary_tables(self)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # (hidden (N, d), head weight (V, d), labels (N,)) -> mean loss without the (N, V) logits; set from outside
        # (training on a GPU: a fused linear + cross-entropy), None: logits, then `cross_entropy`.
        self.fused_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def _init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                output_projection = name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS
                scale = 1.0 / math.sqrt(2 * self.config.n_layers) if output_projection else 1
                nn.init.normal_(module.weight, std=std * scale)

    def forward(self, input_ids: torch.Tensor, doc_start: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                use_cache: bool = False) -> LMOutput:
        """input_ids (B, T); doc_start (B, T) bool (True where a document starts; token 0 is one unless a cache is
        given); labels (B, T) with -100 ignored. Decoding = T=1 with the previous call's cache."""
        h = self.embed(input_ids)
        caches = {}
        for i, layer in enumerate(self.layers):
            h, caches[f"layers.{i}."] = layer(h, doc_start, split_cache(cache, f"layers.{i}."), use_cache)
        h = self.norm(h)
        if labels is not None and self.fused_loss is not None and self.training and not use_cache:
            return LMOutput(logits=None, loss=self.fused_loss(h.flatten(0, 1), self.lm_head.weight, labels.flatten()))
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.cross_entropy(logits, labels)
        return LMOutput(logits=logits, loss=loss, cache=join_cache(caches) if use_cache else None)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labels != -100. Tensor parallelism replaces it with the vocab-parallel loss."""
        flat = logits.flatten(0, 1)
        if flat.dtype in (torch.bfloat16, torch.float16):  # the softmax over a 32K vocabulary wants fp32
            flat = flat.float()
        return F.cross_entropy(flat, labels.flatten(), ignore_index=-100)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters AdamW must not decay: norms' gains, biases, initial fast weights, feature-map coefficients.

        All of these are the 1-D parameters plus every FastWeightInit parameter; weight matrices, embeddings,
        convolution filters and sketch matrices are decayed.
        """
        fast = {f"{mod_name}.{p_name}" for mod_name, module in self.named_modules()
                if isinstance(module, FastWeightInit) for p_name, _ in module.named_parameters()}
        return {name for name, p in self.named_parameters() if p.dim() < 2 or name in fast}

    def memory_stats(self) -> dict[str, float]:
        """Mean gates and fast-weight norms of the last forward over all memory layers ({} without memory)."""
        per_key: dict[str, list[torch.Tensor]] = {}
        for module in self.modules():
            if isinstance(module, AtlasMixer):
                for key, value in module.last_stats.items():
                    per_key.setdefault(key, []).append(value.float())
        if not per_key:
            return {}
        means = torch.stack([torch.stack(vals).mean() for vals in per_key.values()]).tolist()  # one device sync
        return dict(zip(per_key, means))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context seq_len; see flops.py for what is counted."""
        return training_flops_per_token(self, seq_len)
