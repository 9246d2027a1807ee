"""AtlasConfig: the Hugging Face config of an ATLAS-family model.

It carries the native `ModelConfig` whole, as a dict under `atlas` (every field, the family defaults filled in), so
any member that `build_model` builds, present or future, round-trips without code here; the usual Hugging Face
names (hidden_size, num_hidden_layers, ...) are derived from it for tools that read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

MODEL_TYPE = "atlas_lm"


def native_config(fields: dict[str, Any]):
    """The validated, resolved native ModelConfig of `fields` (unknown keys and bad values rejected by name)."""
    from atlas_train.config import build_dataclass
    from atlas_train.model.config import ModelConfig

    cfg = build_dataclass(ModelConfig, dict(fields), "atlas").resolved()
    cfg.validate()
    return cfg


class AtlasConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    atlas: dict | None = None  # the native ModelConfig as a dict; None: its defaults
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        cfg = native_config(self.atlas or {})
        self.atlas = dataclasses.asdict(cfg)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.num_attention_heads = cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    def to_native(self):
        """The native ModelConfig this config describes."""
        return native_config(self.atlas)
