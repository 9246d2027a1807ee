"""AtlasForCausalLM: the native AtlasLM behind the transformers `PreTrainedModel` / `GenerationMixin` interface.

The native model is wrapped, not re-implemented: `self.model` is an AtlasLM built by `build_model` from the
config's native ModelConfig, so every family member works, with the same weights (state-dict keys gain a `model.`
prefix) and the same logits. `generate()` carries the model's recurrent cache in an AtlasCache: one T=1 forward per
new token, as atlas-generate decodes.

Padding. An unpadded batch runs as one native call. A left-padded batch (the padding side batched generation
uses) runs as one native call per distinct padding length, on the unpadded rows, because the memory's chunk grid
and the positions are shared by a batch: each row then gets exactly the logits (and cache) it would get alone.
Right padding (ones then zeros) is exact for the real positions of a scoring call, but its cache would have read
the padding, so no cache is returned for it and asking for one is an error. Any other mask is refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from atlas_train.hf.cache import AtlasCache, CacheGroup
from atlas_train.hf.configuration import AtlasConfig


class AtlasPreTrainedModel(PreTrainedModel):
    config_class = AtlasConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted decoding

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes its own AtlasCache

    def _init_weights(self, module):
        """The native model initialises its own parameters when built. What transformers' loader leaves
        uninitialised is the non-persistent buffers (it builds the model on the meta device and does not save
        them): they are rebuilt here from a CPU build of the native model (only models that have any pay for it)."""
        own = [name for name in module._buffers if name in module._non_persistent_buffers_set]
        if not own:
            return
        prefix = next(name for name, sub in self.named_modules() if sub is module)
        reference = self._reference_buffers()
        for name in own:
            module._buffers[name] = reference[f"{prefix}.{name}" if prefix else name].to(module._buffers[name].device)

    def _reference_buffers(self) -> dict[str, torch.Tensor]:
        if getattr(self, "_buffers_built", None) is None:
            from atlas_train.model import build_model

            with torch.device("cpu"):
                native = build_model(self.config.to_native())
            self._buffers_built = {f"{self.base_model_prefix}.{name}": buf for name, buf in native.named_buffers()}
        return self._buffers_built


class AtlasForCausalLM(AtlasPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: AtlasConfig, native=None):
        """`native`: an existing AtlasLM to wrap (its config must be the config's); otherwise one is built."""
        super().__init__(config)
        from atlas_train.model import build_model

        if native is None:
            native = build_model(config.to_native())
        elif native.config != config.to_native():
            raise ValueError("the native model's config differs from the AtlasConfig's")
        self.model = native
        self.post_init()

    @classmethod
    def from_native(cls, native, **config_kwargs) -> "AtlasForCausalLM":
        """Wrap an AtlasLM (no copy of its weights); config_kwargs go to AtlasConfig (token ids)."""
        import dataclasses

        config = AtlasConfig(atlas=dataclasses.asdict(native.config), **config_kwargs)
        return cls(config, native=native).to(next(native.parameters()).dtype)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ):
        """Causal LM forward. `labels` are the input ids (-100 ignored), shifted here as transformers does;
        `position_ids` are ignored (positions come from the cache); see the module docstring for padding."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("AtlasForCausalLM takes input_ids (inputs_embeds are not supported)")
        if output_attentions or output_hidden_states:
            raise ValueError("AtlasForCausalLM returns no attentions or hidden states")
        cache = past_key_values
        if cache is not None and not isinstance(cache, AtlasCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"AtlasForCausalLM needs an AtlasCache, got a filled {type(cache).__name__}")
            cache = None  # an empty cache of another kind: start afresh
        want_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        runs, right_padded = _plan_runs(input_ids, attention_mask, cache)
        if right_padded and use_cache:
            raise ValueError("a right-padded batch cannot be continued from its cache: pad on the left")
        want_cache = want_cache and not right_padded

        batch, length = input_ids.shape
        logits, groups = None, []
        for rows, start, state in runs:
            whole = start == 0 and len(rows) == batch and len(runs) == 1
            ids = input_ids if whole else input_ids[rows.to(input_ids.device), start:]
            out = self.model(ids, cache=state, use_cache=want_cache)
            if whole:
                logits = out.logits
            else:
                if logits is None:
                    logits = out.logits.new_zeros(batch, length, out.logits.shape[-1])
                logits[rows.to(logits.device), start:] = out.logits
            if want_cache:
                groups.append(CacheGroup(rows, out.cache))

        loss = None
        if labels is not None:
            shifted = torch.cat((labels[:, 1:], labels.new_full((batch, 1), -100)), dim=1)
            loss = self.model.cross_entropy(logits, shifted.to(logits.device))
        if want_cache:
            seen = cache.seen_tokens if cache is not None else 0
            cache = cache if cache is not None else AtlasCache()
            cache.groups, cache.seen_tokens = groups, seen + length
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep.to(logits.device)]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if want_cache else None)
        return out if return_dict is not False else out.to_tuple()


def _plan_runs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cache: Optional[AtlasCache]):
    """([(rows, first column, native cache or None)], right_padded): the native calls one forward makes."""
    batch, length = input_ids.shape
    if cache is not None and cache.groups:
        if attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            raise ValueError("tokens after the prompt must all be attended (attention_mask 1)")
        return [(group.rows, 0, group.state) for group in cache.groups], False
    if attention_mask is None or bool(attention_mask.all()):
        return [(torch.arange(batch), 0, None)], False
    mask = attention_mask.bool().cpu()
    lead = (mask.cumsum(1) == 0).sum(1)  # leading padding per row
    real = mask.sum(1)
    columns = torch.arange(length)
    if not torch.equal(mask, (columns >= lead[:, None]) & (columns < (lead + real)[:, None])) or not bool(real.all()):
        raise ValueError("each attention_mask row must be one run of ones, padded on the left or the right")
    runs = [(torch.nonzero(lead == start).flatten(), int(start), None) for start in torch.unique(lead)]
    return runs, bool((lead + real < length).any())
