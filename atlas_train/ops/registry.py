"""Fast paths of the ops by name: how an op reaches a faster implementation of itself without naming where it lives.

The ops are plain PyTorch. A faster implementation of one of their steps (the Triton kernels of
`atlas_train.kernels`, say) registers a function under one of the names of FAST_PATHS, and the op asks for it with
`fast_path(name, ...)`: None means "run your own PyTorch path", because nothing is registered under the name or the
registered function declines these arguments. So `ops` never imports its accelerators; they import `ops`.

Accelerators are found as plugins: every entry point of the group "atlas_train.fast_paths" (pyproject.toml names
`atlas_train.kernels:register`) is a function that calls `register`. The group is loaded once, on the first lookup,
which the ops make only where a fast path could apply (CUDA tensors, or the CUDA-graph mode), so that a CPU run
imports no accelerator (and Triton is not imported before a test has chosen its interpreter).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Callable

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "atlas_train.fast_paths"
# What each name means: the arguments the op passes, and what the fast path returns (None: it declines).
FAST_PATHS = {
    "newton_schulz": "(s, steps, half_inputs) -> NS(s) as ops.newton_schulz computes it",
    "memory_mlp_pass": "(weights, z, ln, v=None, loss=None) -> the memory MLP's reads f, or with v and a loss "
                       "(f, g_out, hidden, g_pre): ops.memory_mlp's token pass",
    "weighted_outer_sums": "(coef, left, right, scale, prev, half_inputs) -> "
                           "ops.outer_sums.weighted_outer_sums_reference's result",
    "scan_products": "(half_inputs) -> a context in which the scan's own float32 products take the fast paths' "
                     "operand precision",
    "settings": "() -> a hashable value of everything that decides the fast paths' numbers (a captured CUDA graph "
                "is replayed only under the settings it was captured with)",
    "muon_step": "(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps, half_inputs) -> "
                 "ops.muon_step.muon_step_reference's (M', A')",
    "dual_attention": "(x, width, kind, half_inputs) -> an ops.dual_attention.Implementation for the dual memory's "
                      "attention passes, or None",
}
_registered: dict[str, Callable] = {}
_plugins_loaded = False


def register(name: str, fn: Callable) -> None:
    """Make `fn` the fast path `name` (one of FAST_PATHS; a later registration replaces an earlier one)."""
    if name not in FAST_PATHS:
        raise ValueError(f"unknown fast path {name!r}; known: {', '.join(FAST_PATHS)}")
    _registered[name] = fn


def fast_path(name: str, *args, **kwargs):
    """What the fast path `name` returns for these arguments, or None where none is registered or it declines."""
    if not _plugins_loaded:
        _load_plugins()
    fn = _registered.get(name)
    return None if fn is None else fn(*args, **kwargs)


def _load_plugins() -> None:
    """Call the register function of every entry point of ENTRY_POINT_GROUP (once; a failure raises, and the next
    lookup tries again). Finding none is noted once: an atlas-train that is on the path but not installed has no
    entry points, and its ops then run their PyTorch paths on a GPU too."""
    global _plugins_loaded
    plugins = entry_points(group=ENTRY_POINT_GROUP)
    for plugin in plugins:
        plugin.load()()
    if not plugins:
        log.warning("no fast paths: no entry point in the group %r (install atlas-train, e.g. pip install ., so "
                    "that its kernels register); the ops run their PyTorch paths", ENTRY_POINT_GROUP)
    _plugins_loaded = True
