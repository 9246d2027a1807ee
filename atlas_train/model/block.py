"""Pre-norm residual block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (docs/math.md §1).

For atlas_mal each block runs the memory and then sliding-window attention, each in its own pre-norm residual
sub-layer (x += Atlas(norm(x)); x += SWA(norm(x)); x += SwiGLU(norm(x))): the Titans "memory as layer" order inside
every block, so n_layers keeps meaning the number of blocks and every block sees both kinds of mixing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from atlas_train.model.attention import Attention
from atlas_train.model.config import ModelConfig
from atlas_train.model.family import build_mixer
from atlas_train.model.hybrid import join_cache, split_cache
from atlas_train.model.norms import RMSNorm
from atlas_train.model.recompute import RECOMPUTE_MODES, selective_context


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg)
        if cfg.mixer == "atlas_mal":
            self.swa_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.swa = Attention(cfg, window=cfg.swa_window)
        else:
            self.swa_norm = self.swa = None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.recompute = "none"  # set from outside: set_activation_checkpointing
        self.has_memory = not isinstance(self.mixer, Attention)  # a scan inside: `selective` does not apply

    def forward(self, x: torch.Tensor, doc_start: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                return_cache: bool = False) -> tuple[torch.Tensor, Optional[dict]]:
        """With activation checkpointing, backward recomputes the body (all of it, or its element-wise work).

        The checkpoint wraps the body, not the module call, so hooks on the block (context parallelism's state
        exchange) run once per step, never again during recomputation.
        """
        if self.recompute != "none" and self.training and torch.is_grad_enabled():
            kwargs = {"context_fn": selective_context} if self.recompute == "selective" else {}
            return checkpoint(self._body, x, doc_start, cache, return_cache, use_reentrant=False, **kwargs)
        return self._body(x, doc_start, cache, return_cache)

    def _body(self, x: torch.Tensor, doc_start: Optional[torch.Tensor], cache: Optional[dict],
              return_cache: bool) -> tuple[torch.Tensor, Optional[dict]]:
        y, mixer_cache = self.mixer(self.mixer_norm(x), doc_start, split_cache(cache, "mixer."), return_cache)
        x = x + y
        swa_cache = None
        if self.swa is not None:
            y, swa_cache = self.swa(self.swa_norm(x), doc_start, split_cache(cache, "swa."), return_cache)
            x = x + y
        x = x + self.ffn(self.ffn_norm(x))
        return x, (join_cache({"mixer.": mixer_cache, "swa.": swa_cache}) if return_cache else None)


def set_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Make every block of `model` recompute in `mode`: "none", "selective" or "full" (see recompute.py)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {list(RECOMPUTE_MODES)}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if mode == "selective" and any(block.has_memory for block in blocks):
        raise ValueError("activation checkpointing 'selective' covers attention-only blocks; a model with a memory "
                         "layer uses 'full' (or 'none' where it fits)")
    for block in blocks:
        block.recompute = mode
