"""Replaying a tensor function on fixed buffers: the CUDA-graph path of `memory_scan`'s chunk loop.

The PyTorch scan runs a few hundred small kernels per chunk (forward, then recompute + backward); launched one by one
from Python they leave the GPU idle most of the time. Every chunk of a scan (and of every layer with the same shapes)
runs the same kernels on different data, so each distinct chunk computation is captured once as a CUDA graph and
replayed: inputs are copied into the graph's static buffers, the graph runs, results come out of static buffers.
`run_forward` and `run_backward` are what the chunked scan calls per chunk; `StaticCall` is the machinery, also used
for a whole-model decode step (eval/static_decode.py). ATLAS_SCAN_CUDA_GRAPHS=0 switches the graphs off.

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
  (`torch.compiler.config.force_cudagraph_gc`, off by default), and when a collection happens depends on everything
  else the process allocates (compiling kernels on a cold Triton cache, say), so a capture would fail now and then.
* A chunk's forward and backward graphs are both captured when its forward first runs: capturing from inside the
  autograd engine (a backward, or a checkpointed forward recomputed there) is not permitted by CUDA, while a forward
  always runs before its backward on the caller's thread.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Callable, Sequence

import torch

from atlas_train.ops.registry import fast_path

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


_SCAN_CALLS = StaticCallCache()  # the chunk computations of every scan so far, by computation, settings and shapes


def clear_scan_graphs() -> None:
    """Release the captured chunk graphs and their buffers (they are kept for reuse by every later scan)."""
    _SCAN_CALLS.clear()


def run_forward(computation, tensors: Sequence[torch.Tensor], need_backward: bool = True) -> list[torch.Tensor]:
    """computation.forward(*tensors), eagerly or on static buffers (a replayed CUDA graph) as `static_call_mode`
    says. `computation` (chunked_scan.ChunkStep) is hashable, equal for every chunk that runs the same code, and has
    forward(*tensors), backward(*forward's tensors, *gradients of its outputs) and output_gradients(outputs) (zero
    gradients shaped as backward takes them): what its graphs are captured from. need_backward: whether a forward
    captured now gets its backward captured too (not for inference). The caller keeps the results (saved carries,
    y), so they are copied out of the static buffers."""
    mode = static_call_mode(tensors[0].device)
    call = None if mode == "eager" else _forward_call(computation, tensors, mode == "graph", need_backward)
    if call is None:
        return computation.forward(*tensors)
    return [t.clone() for t in call(*tensors)]


def run_backward(computation, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """computation.backward(*tensors), replayed where its forward captured it, else eagerly. The caller consumes the
    results before the next replay (adds them up, or copies them into the next call's inputs), so they are not
    copied out of the static buffers."""
    mode = static_call_mode(tensors[0].device)
    call = None if mode == "eager" else _SCAN_CALLS.get(_key("backward", computation, tensors))
    return computation.backward(*tensors) if call is None else list(call(*tensors))


def _key(kind: str, computation, tensors: Sequence[torch.Tensor]) -> tuple:
    """A captured graph holds the fast path chosen at capture (kernel or cuBLAS, operand precision): keyed on the
    fast paths' settings, a change of those captures anew instead of replaying the old choice."""
    return kind, computation, fast_path("settings"), signature(tensors)


def _forward_call(computation, tensors: Sequence[torch.Tensor], graph: bool, need_backward: bool) -> StaticCall | None:
    """The cached StaticCall of the computation's forward, or None where it cannot be made: a computation first met
    inside the autograd engine runs eagerly (see the module's docstring), as does the backward of a forward first
    captured when no gradient was wanted (inference)."""
    key = _key("forward", computation, tensors)
    call = _SCAN_CALLS.get(key)
    if call is not None or torch._C._current_graph_task_id() != -1:
        return call
    call = _SCAN_CALLS.add(key, computation.forward, tensors, graph)
    if need_backward:
        backward_tensors = [*tensors, *computation.output_gradients(call.outputs)]
        _SCAN_CALLS.add(_key("backward", computation, backward_tensors), computation.backward, backward_tensors,
                        graph)
    return call
