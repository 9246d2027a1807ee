"""Data-dependent gates of the memory (docs/math.md §4): alpha (decay), eta (inner lr), theta (momentum),
gamma (Omega-window weights).

Each gate is a low-rank projection d → gate_rank → H·n with a bias chosen so that the gate starts at its configured
value. The up-projection's outputs are head-major, so tensor parallelism can split them with the heads.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from atlas_train.model.config import ModelConfig


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class LowRankGate(nn.Module):
    """sigmoid(up(down(x))) with up's bias at logit(init): (B, T, d) -> (B, T, n_out)."""

    def __init__(self, d: int, rank: int, n_out: int, init: float):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, n_out, bias=True)
        self.init_value = init
        self.reset_bias()

    def reset_bias(self) -> None:
        nn.init.constant_(self.up.bias, _logit(self.init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.down(x)))


class MemoryGates(nn.Module):
    """All gates of one memory layer.

    `omega_gates`: "slot" gives c gates per token (γ_t[j] for token t−j, the paper's γ_i^(t)); "token" gives one gate
    per token, applied wherever that token falls in a later window (so the last c−1 token gates are cached across
    segments); "none" gives all ones. With use_momentum False, theta is pinned to 0 (plain gradient descent); with
    decay False there is no alpha gate (alpha = 1: the DeepTransformers) and alpha comes back as None.
    """

    def __init__(self, cfg: ModelConfig, decay: bool = True):
        super().__init__()
        d, H, r = cfg.d_model, cfg.n_heads, cfg.gate_rank
        self.n_heads, self.window, self.mode, self.eta_max = H, cfg.window, cfg.omega_gates, cfg.eta_max
        self.alpha = LowRankGate(d, r, H, cfg.alpha_init) if decay else None
        self.eta = LowRankGate(d, r, H, cfg.eta_init / cfg.eta_max)
        self.theta = LowRankGate(d, r, H, cfg.theta_init) if cfg.use_momentum else None
        if self.mode == "slot":
            self.gamma = LowRankGate(d, r, H * cfg.window, cfg.gamma_init)
        elif self.mode == "token":
            self.gamma = LowRankGate(d, r, H, cfg.gamma_init)
        else:
            self.gamma = None

    def forward(self, x: torch.Tensor, gamma_tail: Optional[torch.Tensor] = None):
        """x (B, T, d) -> alpha (None without decay), eta, theta (B, T, H), gamma (B, T, H, c), new gamma_tail
        (token mode) or None.

        gamma_tail: the previous segment's last c−1 token gates (B, c−1, H) in "token" mode; None at a sequence start.
        """
        B, T, _ = x.shape
        H, c = self.n_heads, self.window
        alpha = self.alpha(x) if self.alpha is not None else None
        eta = self.eta_max * self.eta(x)
        theta = self.theta(x) if self.theta is not None else x.new_zeros(B, T, H)
        new_tail = None
        if self.mode == "slot":
            gamma = self.gamma(x).view(B, T, H, c)
        elif self.mode == "token":
            g = self.gamma(x)  # (B, T, H)
            # Slots before the sequence start are never read (memory_scan masks them), so ones are a neutral pad.
            prev = gamma_tail if gamma_tail is not None else g.new_ones(B, c - 1, H)
            ext = torch.cat((prev.to(g.dtype), g), dim=1)  # (B, T+c-1, H)
            gamma = ext.unfold(1, c, 1).flip(-1)  # (B, T, H, c): slot j is token t−j
            new_tail = ext[:, ext.shape[1] - (c - 1):]
        else:
            gamma = x.new_ones(B, T, H, c)
        return alpha, eta, theta, gamma, new_tail
