"""`memory_scan`, the ATLAS memory run over a sequence (docs/math.md §3): its public contract.

Tools outside the package call this function, so its signature and meaning stay fixed. This module checks the inputs
and picks the implementation: `chunked_scan` (chunked_scan.py: chunk-parallel, with its own autograd and CUDA
graphs) for a segment, `memory_step` (memory_step.py) for one token decoded without gradients. Both compute the
function that naive.py writes out the way docs/math.md states it: read `memory_scan_naive` first. Faster
implementations of their steps plug in through registry.py.
"""

from __future__ import annotations

import torch

from atlas_train.ops.chunked_scan import chunked_scan, grad_wanted
from atlas_train.ops.memory_step import memory_step
from atlas_train.ops.precision import is_half, scan_precision

UPDATES = ("token", "chunk")
LOSSES = ("l2", "dot")
_PARAM_KEYS = ("W1", "W2", "W3", "ln_weight", "ln_bias")


def memory_scan(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start=None, state=None, chunk_size=64,
                ns_steps=5, update="token", loss="l2"):
    """Run the ATLAS memory over a segment of tokens: each token's read of the fast-weight memory.

    The memory f(P; z) = z[:dv] + LN(W1·gelu(W2·z)) (gated: ⊙ W3·z) is trained as the tokens go by, on an inner loss
    over a window of c keys (§3.1-3.2), with momentum and a Newton–Schulz step (§3.4-3.7). Gradients flow to
    every input, `params` and an incoming `state` included.

    Args:
        zq: (B, T, H, D) queries, floating point.
        zk: (B, T, H, D) keys, zq's dtype.
        v: (B, T, H, dv) values, 1 ≤ dv ≤ D.
        alpha: (B, T, H) retention gate of the fast weights, in (0, 1).
        eta: (B, T, H) inner learning rate, > 0.
        theta: (B, T, H) momentum gate, in (0, 1).
        gamma: (B, T, H, c) window weights: gamma[b, t, h, j] weighs key t − j in token t's window of c keys.
        params: the initial fast weights (learned, shared by all sequences), float tensors: "W1" (H, dv, hid),
            "W2" (H, hid, D), optional "W3" (H, hid, D) (gated memory), optional "ln_weight" and "ln_bias" (H, dv)
            (the memory's LayerNorm; without them it has none).
        doc_start: (B, T) bool, True at the first token of each document: the memory restarts there (§3.6). Token 0
            of a call without `state` starts one in any case.
        state: the state that the previous call returned for the preceding tokens, or None for a fresh sequence.
            Any split point works (T = 1 calls decode one token at a time); the state is not detached, so gradients
            flow through it in both directions.
        chunk_size: the chunk grid: boundaries at multiples of it counted from the sequence's first token (§3.3).
        ns_steps: Newton–Schulz iterations per update (0: no orthogonalisation).
        update: "token" (every token updates the memory, §3.4) or "chunk" (one update per chunk, §3.5).
        loss: the inner loss, "l2" (½‖f(zk) − v‖², §3.2) or "dot" (−⟨f(zk), v⟩).

    Returns:
        (y, state): y (B, T, H, dv) in zq's dtype, and the state to pass to the next call. Its tensors are float32
        (float64 for float64 inputs) unless noted; per weight w in W1, W2 (, W3):
            update="token": "fast.w" (B, H, out, in) current weights, "momentum.w", "anchor.w" (the open chunk's
                anchor);
            update="chunk": "anchor.w" (current weights, read by the open chunk), "momentum.w", "grad_sum.w" (the
                open chunk's gradient sum), "gate_sum" (B, H, 3: sums of alpha, theta, eta), "count" (B,) int64;
            both: "window_zk" (B, H, c−1, D), "window_v" (B, H, c−1, dv), "window_valid" (B, c−1) bool (key in the
                current document), "pos" 0-dim int64 (tokens seen; the chunk grid continues across calls).

    Raises:
        ValueError: one line naming the input that breaks this contract.

    Example:
        >>> import torch
        >>> from atlas_train.ops import memory_scan
        >>> B, T, H, D, hid, c = 2, 16, 4, 8, 32, 3
        >>> zq, zk, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
        >>> alpha, eta, theta = torch.full((B, T, H), 0.9), torch.full((B, T, H), 0.1), torch.full((B, T, H), 0.5)
        >>> params = {"W1": torch.randn(H, D, hid) / hid**0.5, "W2": torch.randn(H, hid, D) / D**0.5}
        >>> y, state = memory_scan(zq, zk, v, alpha, eta, theta, torch.ones(B, T, H, c), params, chunk_size=8)
        >>> y.shape, int(state["pos"])
        (torch.Size([2, 16, 4, 8]), 16)
    """
    check_inputs(zq, zk, v, alpha, eta, theta, gamma, params, doc_start, chunk_size, ns_steps, update, loss)
    inputs = (zq, zk, v, alpha, eta, theta, gamma, *params.values(), *(state or {}).values())
    if zq.shape[1] == 1 and state is not None and not grad_wanted(inputs):  # decoding
        with scan_precision(zq.device, is_half(zq.dtype)):
            return memory_step(zq, zk, v, alpha, eta, theta, gamma, params, doc_start=doc_start, state=state,
                               chunk_size=chunk_size, ns_steps=ns_steps, update=update, loss=loss)
    return chunked_scan(zq, zk, v, alpha, eta, theta, gamma, params, doc_start=doc_start, state=state,
                        chunk_size=chunk_size, ns_steps=ns_steps, update=update, loss=loss)


def check_inputs(zq, zk, v, alpha, eta, theta, gamma, params, doc_start, chunk_size, ns_steps, update, loss):
    """Raise ValueError with a one-line message for any input that breaks the contract."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {list(UPDATES)}, got {update!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"ns_steps must be an int >= 0, got {ns_steps!r}")
    named = {"zq": zq, "zk": zk, "v": v, "alpha": alpha, "eta": eta, "theta": theta, "gamma": gamma}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.dtype != zq.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {zq.dtype} like zq")
    if zq.dim() != 4 or zq.shape[1] == 0:
        raise ValueError(f"zq must be (B, T, H, D) with T >= 1, got shape {tuple(zq.shape)}")
    batch, length, heads, dim = zq.shape
    dv = v.shape[-1] if v.dim() == 4 else -1
    want = {"zk": (batch, length, heads, dim), "v": (batch, length, heads, dv), "alpha": (batch, length, heads),
            "eta": (batch, length, heads), "theta": (batch, length, heads)}
    for name, shape in want.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {shape}")
    if not 1 <= dv <= dim:
        raise ValueError(f"v's last dim {dv} must be between 1 and zq's D={dim}")
    if gamma.dim() != 4 or tuple(gamma.shape[:3]) != (batch, length, heads) or gamma.shape[3] < 1:
        raise ValueError(f"gamma has shape {tuple(gamma.shape)}, expected {(batch, length, heads)} + (c,), c >= 1")
    if not isinstance(params, dict) or "W1" not in params or "W2" not in params:
        raise ValueError("params must be a dict with 'W1' and 'W2' (and optionally 'W3', 'ln_weight', 'ln_bias')")
    unknown = set(params) - set(_PARAM_KEYS)
    if unknown:
        raise ValueError(f"unknown params keys {sorted(unknown)}; allowed {list(_PARAM_KEYS)}")
    if ("ln_weight" in params) != ("ln_bias" in params):
        raise ValueError("params must hold both 'ln_weight' and 'ln_bias' or neither")
    hid = params["W1"].shape[-1] if params["W1"].dim() == 3 else -1
    want = {"W1": (heads, dv, hid), "W2": (heads, hid, dim), "W3": (heads, hid, dim), "ln_weight": (heads, dv),
            "ln_bias": (heads, dv)}
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"params[{name!r}] must be a floating-point tensor")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"params[{name!r}] has shape {tuple(t.shape)}, expected {want[name]}")
    if doc_start is not None and (not isinstance(doc_start, torch.Tensor) or doc_start.dtype != torch.bool
                                  or tuple(doc_start.shape) != (batch, length)):
        raise ValueError(f"doc_start must be a bool tensor of shape {(batch, length)}")
