"""Model configuration: one dataclass for every member of the family (docs/math.md §§1, 2, 4, 5).

Fields left as None take the family default of `mixer` (spec section 5 table) when the model is built; `resolved()`
returns the config with every such field filled in, and that resolved form is what runs save with checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

MIXERS = ("atlas", "atlas_pp", "omeganet", "titans", "dla", "transformer", "atlas_mag", "atlas_mal", "deep_transformer",
          "swdt", "dot")
DUAL_MIXERS = ("deep_transformer", "swdt", "dot")  # the DeepTransformers (§8): dual_memory_scan

# Spec section 5: what each member fixes. Keys are ModelConfig fields; values replace None in the user's config.
FAMILY_DEFAULTS: dict[str, dict] = {
    "atlas": dict(memory_gated=False, feature_map="sketch", inner_loss="l2", ns_steps=5, use_momentum=True, window=64),
    "atlas_pp": dict(memory_gated=True, feature_map="sketch", inner_loss="l2", ns_steps=5, use_momentum=True,
                     window=64),
    "omeganet": dict(memory_gated=False, feature_map="sketch", inner_loss="l2", ns_steps=0, use_momentum=False,
                     window=64),
    "titans": dict(memory_gated=False, feature_map="identity", inner_loss="l2", ns_steps=0, use_momentum=True,
                   window=1),
    "dla": dict(memory_gated=False, feature_map="identity", inner_loss="dot", ns_steps=0, use_momentum=False, window=1),
    "transformer": dict(memory_gated=False, feature_map="identity", inner_loss="l2", ns_steps=0, use_momentum=False,
                        window=1),
    "atlas_mag": dict(memory_gated=False, feature_map="sketch", inner_loss="l2", ns_steps=5, use_momentum=True,
                      window=64),
    "atlas_mal": dict(memory_gated=False, feature_map="sketch", inner_loss="l2", ns_steps=5, use_momentum=True,
                      window=64),
    # §8: plain gradient descent (theta 0, no Newton–Schulz, no decay) on the exp kernel's features.
    "deep_transformer": dict(memory_gated=False, feature_map="identity", inner_loss="dot", ns_steps=0,
                             use_momentum=False, window=1),
    "swdt": dict(memory_gated=False, feature_map="identity", inner_loss="dot", ns_steps=0, use_momentum=False,
                 window=64),
    "dot": dict(memory_gated=False, feature_map="identity", inner_loss="l2", ns_steps=0, use_momentum=False, window=64),
}


@dataclass
class ModelConfig:
    mixer: str = "atlas"
    vocab_size: int | Literal["auto"] = "auto"  # auto: the dataset's (its manifest's vocab_size), set when a run starts
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: Optional[int] = None  # SwiGLU hidden; None: 8/3·d rounded up to mlp_multiple_of
    mlp_multiple_of: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    max_seq_len: int = 4096  # RoPE table length and the longest context the model is built for
    rope_theta: float = 10000.0

    # ATLAS memory (spec sections 1-4). None means "family default" (FAMILY_DEFAULTS).
    memory_expansion: int = 4  # hid = expansion · dh
    memory_gated: Optional[bool] = None  # Atlas++ gated MLP
    memory_ln: bool = True
    feature_map: Optional[Literal["identity", "elementwise", "sketch", "exact"]] = None
    poly_degree: int = 2
    sketch_dim: Optional[int] = None  # None: dh
    window: Optional[int] = None  # Omega window c
    chunk_size: int = 64
    ns_steps: Optional[int] = None
    use_momentum: Optional[bool] = None  # False pins theta = 0 (plain GD: OmegaNet, DLA)
    update: Literal["token", "chunk"] = "token"  # memory_scan members; the DeepTransformers always update per token
    inner_loss: Optional[Literal["l2", "dot"]] = None
    omega_gates: Literal["slot", "token", "none"] = "slot"
    eta_max: float = 1.0
    gate_rank: int = 32
    alpha_init: float = 0.999
    theta_init: float = 0.9
    eta_init: float = 0.01
    gamma_init: float = 0.5  # Omega-window gates at init (spec 4 leaves it open; sigmoid(0))
    conv_kernel: int = 4
    n_persistent: int = 64  # DeepTransformers: learnable (key, coefficient) pairs that start J (§8)

    # Attention (transformer baseline and the hybrids' sliding-window attention).
    swa_window: int = 2048  # query i sees keys i-swa_window+1 .. i

    def validate(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer {self.mixer!r} is not one of {list(MIXERS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vocab_size != "auto" and self.vocab_size <= 0:
            raise ValueError("vocab_size must be positive (or auto)")
        for name in ("d_model", "n_layers", "n_heads", "chunk_size", "memory_expansion", "conv_kernel",
                     "gate_rank", "swa_window", "max_seq_len", "mlp_multiple_of"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("eta_max", "init_std", "norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("alpha_init", "theta_init", "gamma_init"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1)")
        if not 0 < self.eta_init < self.eta_max:
            raise ValueError(f"eta_init must be in (0, eta_max={self.eta_max})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embedding)")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ValueError("mlp_hidden must be positive")
        if self.sketch_dim is not None and self.sketch_dim <= 0:
            raise ValueError("sketch_dim must be positive")
        if self.window is not None and self.window < 1:
            raise ValueError("window must be >= 1")
        if self.feature_map == "exact" and self.poly_degree != 2:
            raise ValueError("feature_map 'exact' supports poly_degree 2 only")
        if self.poly_degree < 1:
            raise ValueError("poly_degree must be >= 1")
        if self.n_persistent < 0:
            raise ValueError("n_persistent must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        raw = int(8 * self.d_model / 3)
        m = self.mlp_multiple_of
        return m * ((raw + m - 1) // m)

    def resolved(self) -> "ModelConfig":
        """This config with every None family field filled from FAMILY_DEFAULTS[mixer] (and sketch_dim = dh).
        A vocab_size of `auto` stays: a run replaces it with its dataset's before it builds the model."""
        fills = {k: v for k, v in FAMILY_DEFAULTS[self.mixer].items() if getattr(self, k) is None}
        if self.sketch_dim is None:
            fills["sketch_dim"] = self.head_dim
        return dataclasses.replace(self, **fills)
