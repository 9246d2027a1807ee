"""`memory_scan` (ATLAS_SPEC.md section 3): the public entry point and its chunked PyTorch implementation.

`memory_scan` validates its inputs and hands them to `scan_torch`; faster implementations (Triton kernels) plug in
there and must compute the same function. The autograd function keeps activation memory at one carry (fast-weight
snapshot) per chunk: forward runs without a graph, backward recomputes each chunk from its saved carry, in reverse,
and pushes the output gradient plus the carried gradient through it with `torch.autograd.grad`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from atlas_train.ops.scan_chunks import (
    ChunkInputs,
    ScanOptions,
    carry_keys,
    chunk_update_chunk,
    initial_carry,
    token_update_chunk,
)

UPDATES = ("token", "chunk")
LOSSES = ("l2", "dot")
_NON_DIFFERENTIABLE = ("count", "window_valid")
_PARAM_KEYS = ("W1", "W2", "W3", "ln_weight", "ln_bias")


def memory_scan(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start=None, state=None, chunk_size=64,
                ns_steps=5, update="token", loss="l2"):
    """Run the ATLAS memory over a segment; returns (y (B,T,H,dv) in the input dtype, state).

    Shapes: zq, zk (B,T,H,D); v (B,T,H,dv), D ≥ dv; alpha, eta, theta (B,T,H); gamma (B,T,H,c); params "W1"
    (H,dv,hid), "W2" (H,hid,D), optional "W3" (H,hid,D), optional "ln_weight"/"ln_bias" (H,dv); doc_start (B,T)
    bool. `state` is the dict a previous call returned for the preceding tokens (any split point, so T=1 calls
    decode recurrently); it is not detached, so gradients flow through it in both directions. Its tensors, float32
    (float64 for float64 inputs) unless noted, per weight w in W1, W2 (, W3):
      update="token": "fast.w" (B,H,out,in) current weights, "momentum.w", "anchor.w" (the open chunk's anchor);
      update="chunk": "anchor.w" (current weights, read by the open chunk), "momentum.w", "grad_sum.w" (the open
        chunk's gradient sum), "gate_sum" (B,H,3: sums of alpha, theta, eta), "count" (B,) int64;
      both: "window_zk" (B,H,c-1,D), "window_v" (B,H,c-1,dv), "window_valid" (B,c-1) bool (key in the current
        document), "pos" 0-dim int64 (tokens seen; the chunk grid continues across calls).
    """
    _validate(zq, zk, v, alpha, eta, theta, gamma, params, doc_start, chunk_size, ns_steps, update, loss)
    return scan_torch(zq, zk, v, alpha, eta, theta, gamma, params, doc_start=doc_start, state=state,
                      chunk_size=chunk_size, ns_steps=ns_steps, update=update, loss=loss)


def scan_torch(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start, state, chunk_size, ns_steps, update,
               loss):
    """The chunk-parallel PyTorch implementation of `memory_scan` (inputs already validated)."""
    batch, length, heads, _ = zq.shape
    dtype = torch.float64 if zq.dtype == torch.float64 else torch.float32
    weight_names = ("W1", "W2", "W3") if "W3" in params else ("W1", "W2")
    opts = ScanOptions(update, loss, int(ns_steps), int(chunk_size), gamma.shape[-1], v.shape[-1], weight_names)

    def per_head(t):  # (B, T, H, ...) -> (B, H, T, ...) in the compute dtype
        return t.to(dtype).transpose(1, 2)

    inputs = [per_head(t) for t in (zq, zk, v, alpha, eta, theta, gamma)]
    reset = (torch.zeros(batch, length, dtype=torch.bool, device=zq.device) if doc_start is None
             else doc_start.clone())
    if state is None:
        reset[:, 0] = True
    fast = [params[w].to(dtype).unsqueeze(0) for w in weight_names]
    ln = [params[k].to(dtype) for k in ("ln_weight", "ln_bias")] if "ln_weight" in params else []
    keys = carry_keys(opts)
    if state is None:
        carry = initial_carry(dict(zip(weight_names, fast)), batch, inputs[1], inputs[2], opts)
        start = 0
    else:
        carry = _carry_from_state(state, keys, opts, batch, heads, zq.shape[-1], dtype)
        start = int(state["pos"])
    schedule = _chunk_schedule(start, length, opts.chunk_size, reset.any(0).nonzero().flatten().tolist())
    outputs = _ScanFunction.apply(opts, schedule, bool(ln), *inputs, reset, *fast, *ln, *(carry[k] for k in keys))
    y = outputs[0].transpose(1, 2).to(zq.dtype)
    new_state = dict(zip(keys, outputs[1:]))
    new_state["pos"] = torch.tensor(start + length, dtype=torch.long, device=zq.device)
    return y, new_state


def _chunk_schedule(start: int, length: int, chunk_size: int, reset_positions: list[int]) -> tuple:
    """(begin, end, closes_grid_chunk, has_reset) for each piece of the call between grid boundaries (multiples of
    chunk_size counted from the first call's token 0); has_reset: a document starts inside the piece in some row.
    The reset positions come to the host once per call, not once per chunk."""
    pieces, begin = [], 0
    while begin < length:
        end = min(length, begin + chunk_size - (start + begin) % chunk_size)
        has_reset = any(begin <= p < end for p in reset_positions)
        pieces.append((begin, end, (start + end) % chunk_size == 0, has_reset))
        begin = end
    return tuple(pieces)


def _run_chunk(opts, carry, pieces, reset, has_reset, params, ln, closes):
    """One chunk's (y, carry); `pieces` are the 7 float inputs and `reset` the doc starts, sliced to the chunk."""
    step = token_update_chunk if opts.update == "token" else chunk_update_chunk
    return step(carry, ChunkInputs(*pieces, reset, has_reset), params, ln, opts, closes)


class _ScanFunction(torch.autograd.Function):
    """Chunked scan with per-chunk recomputation in backward (saves one carry per chunk, not per token)."""

    @staticmethod
    def forward(ctx, opts, schedule, has_ln, *tensors):
        inputs, reset, params, ln, carry, keys = _unpack(opts, has_ln, tensors)
        ctx.opts, ctx.schedule, ctx.has_ln = opts, schedule, has_ln
        saved_carries, ys = [], []
        for begin, end, closes, has_reset in schedule:
            saved_carries.extend(carry[k] for k in keys)
            pieces = [t[:, :, begin:end] for t in inputs]
            y, carry = _run_chunk(opts, carry, pieces, reset[:, begin:end], has_reset, params, ln, closes)
            ys.append(y)
        ctx.save_for_backward(*tensors[: len(tensors) - len(keys)], *saved_carries)
        seen, outputs = {id(t) for t in tensors}, []
        for k in keys:  # autograd needs every output to be a distinct, new tensor
            t = carry[k].clone() if id(carry[k]) in seen else carry[k]
            seen.add(id(t))
            outputs.append(t)
        ctx.mark_non_differentiable(*(t for k, t in zip(keys, outputs) if k in _NON_DIFFERENTIABLE))
        return (torch.cat(ys, dim=2), *outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_carry_out):
        opts, schedule = ctx.opts, ctx.schedule
        keys = carry_keys(opts)
        saved = ctx.saved_tensors
        n_fixed = len(saved) - len(keys) * len(schedule)
        inputs, reset, params, ln, _, _ = _unpack(opts, ctx.has_ln, saved[:n_fixed] + saved[-len(keys):])
        param_leaves = {w: p.detach().requires_grad_() for w, p in params.items()}
        ln_leaves = None if ln is None else {k: t.detach().requires_grad_() for k, t in ln.items()}
        param_grads = {w: torch.zeros_like(p) for w, p in params.items()}
        ln_grads = None if ln is None else {k: torch.zeros_like(t) for k, t in ln.items()}
        input_grads = [torch.zeros_like(t) for t in inputs]
        carry_grad = {k: g for k, g in zip(keys, grad_carry_out) if k not in _NON_DIFFERENTIABLE}
        for index in reversed(range(len(schedule))):
            begin, end, closes, has_reset = schedule[index]
            snapshot = saved[n_fixed + index * len(keys): n_fixed + (index + 1) * len(keys)]
            carry = {k: t if k in _NON_DIFFERENTIABLE else t.detach().requires_grad_() for k, t in zip(keys, snapshot)}
            pieces = [t[:, :, begin:end].detach().requires_grad_() for t in inputs]
            with torch.enable_grad():
                y, carry_out = _run_chunk(opts, carry, pieces, reset[:, begin:end], has_reset, param_leaves,
                                          ln_leaves, closes)
            outs, grads = [y], [grad_y[:, :, begin:end]]
            for k, g in carry_grad.items():
                if g is not None and carry_out[k].requires_grad:
                    outs.append(carry_out[k])
                    grads.append(g)
            carry_leaves = [carry[k] for k in keys if k not in _NON_DIFFERENTIABLE]
            targets = carry_leaves + pieces + list(param_leaves.values()) + (
                [] if ln_leaves is None else list(ln_leaves.values()))
            found = torch.autograd.grad(outs, targets, grads, allow_unused=True)
            found_carry, found = found[: len(carry_leaves)], found[len(carry_leaves):]
            carry_grad = {k: g for k, g in zip((k for k in keys if k not in _NON_DIFFERENTIABLE), found_carry)}
            for buffer, g in zip(input_grads, found[: len(pieces)]):
                if g is not None:
                    buffer[:, :, begin:end] += g
            found = found[len(pieces):]
            for name, g in zip(list(param_grads) + ([] if ln_grads is None else list(ln_grads)), found):
                target = param_grads if name in param_grads else ln_grads
                if g is not None:
                    target[name] += g
        grad_ln = [] if ln_grads is None else [ln_grads["ln_weight"], ln_grads["ln_bias"]]
        grad_carry_in = [None if k in _NON_DIFFERENTIABLE else carry_grad[k] for k in keys]
        return (None, None, None, *input_grads, None, *param_grads.values(), *grad_ln, *grad_carry_in)


def _unpack(opts, has_ln, tensors):
    """Split the autograd function's flat tensor list back into its parts."""
    inputs, reset = list(tensors[:7]), tensors[7]
    rest = tensors[8:]
    params = dict(zip(opts.weight_names, rest[: len(opts.weight_names)]))
    rest = rest[len(opts.weight_names):]
    ln = None
    if has_ln:
        ln, rest = {"ln_weight": rest[0], "ln_bias": rest[1]}, rest[2:]
    keys = carry_keys(opts)
    return inputs, reset, params, ln, dict(zip(keys, rest)), keys


def _carry_from_state(state, keys, opts, batch, heads, dim, dtype) -> dict:
    """Check a state dict from an earlier call against this call and cast its float tensors to the compute dtype."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be the dict memory_scan returned, got {type(state).__name__}")
    expected = set(keys) | {"pos"}
    if set(state) != expected:
        raise ValueError(f"state keys {sorted(state)} do not match update={opts.update!r} with weights "
                         f"{list(opts.weight_names)}; expected {sorted(expected)}")
    past = opts.window - 1
    if state["window_zk"].shape != (batch, heads, past, dim) or state["window_v"].shape[:3] != (batch, heads, past):
        raise ValueError(f"state window has shape {tuple(state['window_zk'].shape)}, expected "
                         f"{(batch, heads, past, dim)} (batch, heads, c-1, D)")
    return {k: state[k] if k in _NON_DIFFERENTIABLE else state[k].to(dtype) for k in keys}


def _validate(zq, zk, v, alpha, eta, theta, gamma, params, doc_start, chunk_size, ns_steps, update, loss):
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
