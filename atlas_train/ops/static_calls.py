"""Replaying a tensor function on fixed buffers: the CUDA-graph path of `memory_scan`'s chunk loop.

The PyTorch scan runs a few hundred small kernels per chunk (forward, then recompute + backward); launched one by one
from Python they leave an H100 idle most of the time. Every chunk of a scan (and of every layer with the same shapes)
runs the same kernels on different data, so each distinct chunk computation is captured once as a CUDA graph and
replayed: inputs are copied into the graph's static buffers, the graph runs, results come out of static buffers.

Design choices, and why:
* Outputs are copied into buffers allocated *outside* the capture. Then a capture's private memory holds only
  temporaries that are dead between replays, so all graphs can share one memory pool and be replayed in any order
  (a graph output living in the pool could be overwritten by another graph's temporaries).
* The same `StaticCall` runs without a graph on CPU (and wherever graphs are switched off), so the buffer plumbing —
  the part that can go wrong besides capture itself — is exercised by the CPU test suite.
* Capture uses `capture_error_mode="thread_local"`, so data-loader or communication threads that touch CUDA while a
  graph is first captured are not an error.
* Python's cyclic garbage collector is paused while a graph is captured. A collection can run at any allocation; if
  it frees a dead graph (one held in a reference cycle), the graph's destructor calls a CUDA API that is not
  permitted during capture, which invalidates the capture in progress. PyTorch no longer collects before a capture
  (`torch.compiler.config.force_cudagraph_gc`, off by default). Seen on an H100: the decode bench's fourth graph
  failed to capture whenever Triton's on-disk cache was cold, i.e. whenever compiling had shifted the collector's
  timing (benchmarks/RESULTS.md, eighth session).
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Callable, Sequence

import torch

_ENV = "ATLAS_SCAN_CUDA_GRAPHS"


def static_call_mode(device: torch.device) -> str:
    """How chunk computations run on `device`: "graph" (CUDA graphs, the default on CUDA), "eager" (the default
    on CPU; ATLAS_SCAN_CUDA_GRAPHS=0 anywhere) or "static" (ATLAS_SCAN_CUDA_GRAPHS=static: the static-buffer
    plumbing without capture, for tests and debugging)."""
    setting = os.environ.get(_ENV, "1")
    if setting == "static":
        return "static"
    return "graph" if device.type == "cuda" and setting != "0" else "eager"


@contextlib.contextmanager
def forced_scan_mode(setting: str | None):
    """ATLAS_SCAN_CUDA_GRAPHS=setting inside the block, the previous value after it (None: leave it as it is);
    for benchmarks and tests that compare the modes in one process."""
    before = os.environ.get(_ENV)
    if setting is not None:
        os.environ[_ENV] = setting
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection inside the block (the collector's previous state after it): see the module's
    docstring for why a capture needs this."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StaticCall:
    """`fn(*inputs) -> list of tensors` bound to static input and output buffers, replayed as a CUDA graph on GPU.

    The returned tensors are the static output buffers: the next call overwrites them, so the caller consumes or
    copies them first.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], examples: Sequence[torch.Tensor], graph: bool,
                 pool=None):
        self._fn = fn
        self._inputs = [t.detach().clone() for t in examples]
        self._graph = None
        self.calls = 0  # how often it ran: tests check that backward calls are found, not silently missed
        # Building runs fn (a backward included) inside the caller's forward, which may be an activation-checkpointed
        # block: identity hooks keep checkpoint's saved-tensor bookkeeping from seeing these extra tensors.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            if graph:
                self._outputs = self._capture(pool)
            else:
                self._outputs = [r.detach().clone() for r in fn(*self._inputs)]

    def _capture(self, pool) -> list[torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, autograd's device threads
            results = [r.detach() for r in self._fn(*self._inputs)]
        torch.cuda.current_stream().wait_stream(side)
        outputs = [torch.empty_like(r) for r in results]
        del results
        self._graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(self._graph, pool=pool, capture_error_mode="thread_local"):
            for out, r in zip(outputs, self._fn(*self._inputs)):
                out.copy_(r.detach())
        return outputs

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        for buffer, t in zip(self._inputs, inputs, strict=True):
            buffer.copy_(t)
        if self._graph is not None:
            self._graph.replay()
        else:
            for out, r in zip(self._outputs, self._fn(*self._inputs)):
                out.copy_(r.detach())
        return self._outputs

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The static output buffers (shapes and dtypes of the results)."""
        return self._outputs


class StaticCallCache:
    """StaticCalls by key (what the computation is: options, flags, shapes, dtypes), sharing one graph pool."""

    def __init__(self):
        self._calls: dict = {}
        self._pools: dict = {}

    def get(self, key) -> StaticCall | None:
        return self._calls.get(key)

    def add(self, key, fn, examples: Sequence[torch.Tensor], graph: bool) -> StaticCall:
        """Bind `fn` to buffers shaped like `examples` (capturing its graph if asked) and keep it under `key`."""
        pool = None
        if graph:
            pool = self._pools.setdefault(examples[0].device, torch.cuda.graph_pool_handle())
        call = self._calls[key] = StaticCall(fn, examples, graph, pool)
        return call

    def clear(self) -> None:
        """Drop every captured graph and buffer (frees their GPU memory once nothing else holds it)."""
        self._calls.clear()
        self._pools.clear()

    def __len__(self) -> int:
        return len(self._calls)

    def values(self):
        return self._calls.values()


def signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """Shapes, dtypes and device of a tensor list: part of a StaticCall's cache key."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
