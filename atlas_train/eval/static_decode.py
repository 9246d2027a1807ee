"""A whole-model decode step on static buffers, optionally replayed as one CUDA graph.

A decode step of a memory model is thousands of small kernels whose launch cost dwarfs their work. Its cache has
fixed shapes (fast weights, momentum, window, conv tails), so the step can run on buffers that never move: the token
goes into a static input, the model reads the static cache, and the step ends by copying the new cache into those
same buffers. Captured once with `torch.cuda.CUDAGraph`, a step is then one graph launch. Without a graph (CPU, or
`use_graph=False`) the same buffer logic runs eagerly, which is how the tests check it. Caches that grow (an
attention KV cache) cannot live in static buffers and are refused.
"""

from __future__ import annotations

import torch


class GrowingCacheError(ValueError):
    """The model's cache changes shape from step to step, so it cannot live in static buffers."""


class StaticDecodeStep:
    """`step(token)` = one T=1 forward of `model` with the carried cache; returns the (B, V) logits.

    The cache passed in is copied (the caller's dict is left as it was); `cache` holds the current state. With a
    graph, the returned logits tensor is a static buffer that the next step overwrites.
    """

    def __init__(self, model, cache: dict, use_graph: bool = False, warmup: int = 2):
        self.model = model
        self.cache = {key: t.clone() for key, t in cache.items()}
        batch = _batch_size(self.cache)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=next(iter(self.cache.values())).device)
        self.graph = None
        self.logits = None
        if use_graph:
            self._capture(warmup)

    @torch.no_grad()
    def _forward_and_store(self) -> torch.Tensor:
        out = self.model(self.token, cache=self.cache, use_cache=True)
        if out.cache.keys() != self.cache.keys():
            raise GrowingCacheError(f"the decode step changed the cache's keys: {sorted(set(out.cache) ^ set(self.cache))}")
        for key, new in out.cache.items():
            old = self.cache[key]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise GrowingCacheError(f"cache entry {key!r} changes from {tuple(old.shape)} {old.dtype} to "
                                 f"{tuple(new.shape)} {new.dtype} in a step: it cannot live in a static buffer "
                                 "(a growing attention KV cache); decode this model without a static step")
            old.copy_(new)
        return out.logits[:, -1]

    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (first-use probes, allocator), restore the state, then record one step."""
        saved = {key: t.clone() for key, t in self.cache.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._forward_and_store()
        torch.cuda.current_stream().wait_stream(stream)
        for key, t in saved.items():
            self.cache[key].copy_(t)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward_and_store()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) or (B, 1) int64 -> logits (B, V) of the next position; the cache advances by one token."""
        self.token.copy_(token.view(-1, 1))
        if self.graph is None:
            return self._forward_and_store()
        self.graph.replay()
        return self.logits


def _batch_size(cache: dict) -> int:
    """Every per-sequence cache entry is batch-major; 0-dim entries (positions) are shared."""
    sizes = {t.shape[0] for t in cache.values() if t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the batch size of a cache with leading dims {sorted(sizes)}")
    return sizes.pop()
