"""A whole-model decode step on static buffers, optionally replayed as one CUDA graph.

A decode step of a memory model is thousands of small kernels whose launch cost dwarfs their work. Its cache has
fixed shapes (fast weights, momentum, window, conv tails), so the step can run on buffers that never move: the token
goes into a static input, the model reads the static cache, the new cache comes out in static buffers and goes back
in at the next step. Captured once as a CUDA graph (`atlas_train.ops.cuda_graphs`, the same machinery as the scan's
chunk graphs), a step is then one graph launch. Without a graph (CPU, or `use_graph=False`) the same buffer logic
runs eagerly, which is how the tests check it. Caches that grow (an attention KV cache) cannot live in static
buffers and are refused.
"""

from __future__ import annotations

import functools

import torch

from atlas_train.ops.cuda_graphs import StaticCall


class GrowingCacheError(ValueError):
    """The model's cache changes shape from step to step, so it cannot live in static buffers."""


class StaticDecodeStep:
    """`step(token)` = one T=1 forward of `model` with the carried cache; returns the (B, V) logits.

    The step is a `StaticCall` (the scan's CUDA-graph machinery) of (token, *cache) -> (logits, *new cache); the
    caller's cache is copied in once and left as it was. `cache` holds the current state, and the returned logits
    are a static buffer that the next step overwrites.
    """

    def __init__(self, model, cache: dict, use_graph: bool = False):
        self.model = model
        self._keys = list(cache)
        token = torch.zeros(_batch_size(cache), 1, dtype=torch.long, device=next(iter(cache.values())).device)
        # A function of the model and keys, not a bound method: the call would hold the step that holds the call, a
        # cycle that frees the captured graph (and its memory pool) only when the garbage collector next runs.
        forward = functools.partial(_decode_forward, model, tuple(self._keys))
        self._call = StaticCall(forward, [token, *cache.values()], graph=use_graph)
        self.cache = dict(cache)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) or (B, 1) int64 -> logits (B, V) of the next position; the cache advances by one token."""
        logits, *values = self._call(token.view(-1, 1), *(self.cache[key] for key in self._keys))
        self.cache = dict(zip(self._keys, values))  # static outputs: copied into the inputs by the next step
        return logits


@torch.no_grad()
def _decode_forward(model, keys: tuple, token: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """(token, *cache values) -> [last logits, *new cache values in the same order]; refuses a cache that changes."""
    out = model(token, cache=dict(zip(keys, values)), use_cache=True)
    if set(out.cache) != set(keys):
        raise GrowingCacheError(f"the decode step changed the cache's keys: {sorted(set(out.cache) ^ set(keys))}")
    for key, old in zip(keys, values):
        new = out.cache[key]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise GrowingCacheError(f"cache entry {key!r} changes from {tuple(old.shape)} {old.dtype} to "
                                    f"{tuple(new.shape)} {new.dtype} in a step: it cannot live in a static "
                                    "buffer (a growing attention KV cache); decode this model without a static step")
    return [out.logits[:, -1], *(out.cache[key] for key in keys)]


def _batch_size(cache: dict) -> int:
    """Every per-sequence cache entry is batch-major; 0-dim entries (positions) are shared."""
    sizes = {t.shape[0] for t in cache.values() if t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size of a cache with leading dims {sorted(sizes)}")
    return sizes.pop()
