"""`memory_scan` (ATLAS_SPEC.md section 3): the public entry point and its chunked PyTorch implementation.

`memory_scan` validates its inputs and hands them to `scan_torch`; faster implementations (Triton kernels) plug in
there and must compute the same function. The autograd function keeps activation memory at one carry (fast-weight
snapshot) per chunk: forward runs without a graph, backward recomputes each chunk from its saved carry, in reverse,
and pushes the output gradient plus the carried gradient through it with `torch.autograd.grad`.

On CUDA each distinct chunk computation (forward, and recompute + backward) is captured once as a CUDA graph and
replayed for every chunk and layer of the same shapes (`static_calls`): the chunk's few hundred small kernels are
then launched by one call instead of one Python dispatch each. ATLAS_SCAN_CUDA_GRAPHS=0 switches that off.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from atlas_train.ops.memory_step import memory_step
from atlas_train.ops.newton_schulz import is_half
from atlas_train.ops.scan_chunks import (
    ChunkInputs,
    ScanOptions,
    carry_keys,
    check_state,
    chunk_update_chunk,
    initial_carry,
    token_update_chunk,
)
from atlas_train.ops.static_calls import StaticCallCache, signature, static_call_mode

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
    inputs = (zq, zk, v, alpha, eta, theta, gamma, *params.values(), *(state or {}).values())
    if zq.shape[1] == 1 and state is not None and not _grad_wanted(inputs):
        with _scan_precision(zq.device, is_half(zq.dtype)):  # decoding
            return memory_step(zq, zk, v, alpha, eta, theta, gamma, params, doc_start=doc_start, state=state,
                               chunk_size=chunk_size, ns_steps=ns_steps, update=update, loss=loss)
    return scan_torch(zq, zk, v, alpha, eta, theta, gamma, params, doc_start=doc_start, state=state,
                      chunk_size=chunk_size, ns_steps=ns_steps, update=update, loss=loss)


def scan_torch(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start, state, chunk_size, ns_steps, update,
               loss):
    """The chunk-parallel PyTorch implementation of `memory_scan` (inputs already validated)."""
    batch, length, heads, _ = zq.shape
    dtype = torch.float64 if zq.dtype == torch.float64 else torch.float32
    weight_names = ("W1", "W2", "W3") if "W3" in params else ("W1", "W2")
    opts = ScanOptions(update, loss, int(ns_steps), int(chunk_size), gamma.shape[-1], v.shape[-1], weight_names,
                       is_half(zq.dtype))

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
    flat = [*inputs, reset, *fast, *ln, *(carry[k] for k in keys)]
    outputs = _ScanFunction.apply(opts, schedule, bool(ln), _grad_wanted(flat), *flat)
    y = outputs[0].transpose(1, 2).to(zq.dtype)
    new_state = dict(zip(keys, outputs[1:]))
    new_state["pos"] = torch.tensor(start + length, dtype=torch.long, device=zq.device)
    return y, new_state


def _grad_wanted(tensors) -> bool:
    """Whether autograd will ask for gradients of a call on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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


def _differentiable(keys):
    return [k for k in keys if k not in _NON_DIFFERENTIABLE]


def _split_chunk_tensors(opts, has_ln, tensors):
    """carry (keys order), the 7 pieces, reset, params, ln (dicts), then whatever follows: the flat layout that
    chunk computations take so that they can run on static buffers."""
    keys = carry_keys(opts)
    n_weights = len(opts.weight_names)
    carry = dict(zip(keys, tensors[: len(keys)]))
    rest = tensors[len(keys):]
    pieces, reset, rest = list(rest[:7]), rest[7], rest[8:]
    params, rest = dict(zip(opts.weight_names, rest[:n_weights])), rest[n_weights:]
    ln = None
    if has_ln:
        ln, rest = {"ln_weight": rest[0], "ln_bias": rest[1]}, rest[2:]
    return carry, pieces, reset, params, ln, rest


@contextlib.contextmanager
def _scan_precision(device: torch.device, half_inputs: bool):
    """Autocast off inside the scan: its math is float32 (float64) by the spec, whatever the caller's autocast, and
    the recompute in backward (which runs outside the caller's autocast) then repeats the forward exactly. On the
    GPU its float32 products take the fast paths' operand precision for the model's dtype, also whatever the caller
    set (`atlas_train.kernels.dispatch.scan_product_precision`: tf32 for a bf16/fp16 model by default)."""
    products = contextlib.nullcontext()
    if device.type == "cuda":
        from atlas_train.kernels.dispatch import scan_products  # imports Triton: only when needed

        products = scan_products(half_inputs)
    with torch.autocast(device_type=device.type, enabled=False), products:
        yield


def _chunk_forward(opts, closes, has_reset, has_ln):
    """The forward of one chunk as a function of flat tensors: -> [y, *carry_out in key order]."""
    keys = carry_keys(opts)

    def run(*tensors):
        carry, pieces, reset, params, ln, _ = _split_chunk_tensors(opts, has_ln, tensors)
        with torch.no_grad(), _scan_precision(tensors[0].device, opts.half_inputs):
            y, out = _run_chunk(opts, carry, pieces, reset, has_reset, params, ln, closes)
        return [y, *(out[k] for k in keys)]

    return run


def _chunk_backward(opts, closes, has_reset, has_ln):
    """Recompute one chunk under autograd and push (grad_y, grads of the carry out) through it, as a function of flat
    tensors (chunk inputs, then grad_y, then the carry-out gradients of the differentiable keys; zeros stand for
    absent gradients) -> gradients of the differentiable carry keys, the 7 pieces, params and ln (zeros if unused)."""
    diff_keys = _differentiable(carry_keys(opts))

    def run(*tensors):
        carry, pieces, reset, params, ln, rest = _split_chunk_tensors(opts, has_ln, tensors)
        grad_y, grad_carry = rest[0], dict(zip(diff_keys, rest[1:]))
        carry = {k: t.detach().requires_grad_() if k in grad_carry else t for k, t in carry.items()}
        pieces = [t.detach().requires_grad_() for t in pieces]
        params = {k: t.detach().requires_grad_() for k, t in params.items()}
        ln = None if ln is None else {k: t.detach().requires_grad_() for k, t in ln.items()}
        with torch.enable_grad(), _scan_precision(reset.device, opts.half_inputs):  # the backward's products too
            y, carry_out = _run_chunk(opts, carry, pieces, reset, has_reset, params, ln, closes)
            outs, grads = [y], [grad_y]
            for k in diff_keys:
                if carry_out[k].requires_grad:
                    outs.append(carry_out[k])
                    grads.append(grad_carry[k])
            targets = [carry[k] for k in diff_keys] + pieces + list(params.values()) + (
                [] if ln is None else list(ln.values()))
            found = torch.autograd.grad(outs, targets, grads, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, targets)]

    return run


_STATIC_CALLS = StaticCallCache()  # chunk computations of every scan so far, by options, flags and shapes


def clear_scan_graphs() -> None:
    """Release the captured chunk graphs and their buffers (they are kept for reuse by every later scan)."""
    _STATIC_CALLS.clear()


_BUILDERS = {"forward": _chunk_forward, "backward": _chunk_backward}


def _call_chunk(kind, opts, closes, has_reset, has_ln, tensors, need_backward=True):
    """Run a chunk computation eagerly, or on static buffers (a replayed CUDA graph) when the mode says so.
    need_backward (forward only): whether a new forward graph gets its backward graph too (not for inference).
    Forward results are kept (saved carries, y), so they are copied out of the static buffers; backward results
    are consumed before the next replay (added up, or copied into the next call's inputs), so they are not."""
    mode = static_call_mode(tensors[0].device)
    call = None if mode == "eager" else _static_call(kind, opts, closes, has_reset, has_ln, tensors, mode,
                                                     need_backward)
    if call is None:
        return _BUILDERS[kind](opts, closes, has_reset, has_ln)(*tensors)
    outputs = call(*tensors)
    return [t.clone() for t in outputs] if kind == "forward" else list(outputs)


def _static_call(kind, opts, closes, has_reset, has_ln, tensors, mode, need_backward):
    """The cached StaticCall of a chunk computation, or None where it cannot be made.

    A chunk's forward and backward graphs are both captured when its forward first runs: capturing from inside
    the autograd engine (a backward, or a checkpointed forward recomputed there) is not permitted by CUDA, while a
    forward always runs before its backward on the caller's thread. A computation first met inside the engine
    runs eagerly, as does the backward of a forward first captured when no gradient was wanted (inference)."""
    from atlas_train.kernels.dispatch import settings as fast_path_settings  # imports Triton: only when needed

    # A graph captures the fast path chosen at capture (kernel or cuBLAS, operand precision): keyed on it, a change of
    # those settings captures anew instead of replaying the old choice.
    key = (kind, opts, closes, has_reset, has_ln, fast_path_settings(), signature(tensors))
    call = _STATIC_CALLS.get(key)
    if call is not None or kind == "backward" or torch._C._current_graph_task_id() != -1:
        return call
    graph = mode == "graph"
    call = _STATIC_CALLS.add(key, _chunk_forward(opts, closes, has_reset, has_ln), tensors, graph)
    if not need_backward:
        return call
    y, *carry_out = call.outputs
    grads = [torch.zeros_like(y)] + [torch.zeros_like(t) for k, t in zip(carry_keys(opts), carry_out)
                                     if k not in _NON_DIFFERENTIABLE]
    backward_tensors = [*tensors, *grads]
    _STATIC_CALLS.add(("backward", *key[1:-1], signature(backward_tensors)),
                      _chunk_backward(opts, closes, has_reset, has_ln), backward_tensors, graph)
    return call


class _ScanFunction(torch.autograd.Function):
    """Chunked scan with per-chunk recomputation in backward (saves one carry per chunk, not per token)."""

    @staticmethod
    def forward(ctx, opts, schedule, has_ln, need_backward, *tensors):
        inputs, reset, params, ln, carry, keys = _unpack(opts, has_ln, tensors)
        ctx.opts, ctx.schedule, ctx.has_ln = opts, schedule, has_ln
        fixed = [*params.values(), *([] if ln is None else ln.values())]
        saved_carries, ys = [], []
        for begin, end, closes, has_reset in schedule:
            saved_carries.extend(carry[k] for k in keys)
            chunk = [*(carry[k] for k in keys), *(t[:, :, begin:end] for t in inputs), reset[:, begin:end], *fixed]
            y, *carry_out = _call_chunk("forward", opts, closes, has_reset, has_ln, chunk, need_backward)
            carry = dict(zip(keys, carry_out))
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
        diff_keys = _differentiable(keys)
        saved = ctx.saved_tensors
        n_fixed = len(saved) - len(keys) * len(schedule)
        inputs, reset, params, ln, _, _ = _unpack(opts, ctx.has_ln, saved[:n_fixed] + saved[-len(keys):])
        fixed = [*params.values(), *([] if ln is None else ln.values())]
        fixed_grads = [torch.zeros_like(t) for t in fixed]
        input_grads = [torch.zeros_like(t) for t in inputs]
        given = dict(zip(keys, grad_carry_out))
        snapshot = saved[-len(keys):]
        carry_grad = [torch.zeros_like(t) if given[k] is None else given[k]
                      for k, t in zip(keys, snapshot) if k in diff_keys]
        for index in reversed(range(len(schedule))):
            begin, end, closes, has_reset = schedule[index]
            snapshot = saved[n_fixed + index * len(keys): n_fixed + (index + 1) * len(keys)]
            chunk = [*snapshot, *(t[:, :, begin:end] for t in inputs), reset[:, begin:end], *fixed,
                     grad_y[:, :, begin:end], *carry_grad]
            found = _call_chunk("backward", opts, closes, has_reset, ctx.has_ln, chunk)
            carry_grad, found = found[: len(diff_keys)], found[len(diff_keys):]
            for buffer, g in zip(input_grads, found[:7]):
                buffer[:, :, begin:end] += g
            for buffer, g in zip(fixed_grads, found[7:]):
                buffer += g
        grads_in = dict(zip(diff_keys, (g.clone() for g in carry_grad)))  # off the static buffers
        n_weights = len(opts.weight_names)
        grad_ln = fixed_grads[n_weights:]
        return (None, None, None, None, *input_grads, None, *fixed_grads[:n_weights], *grad_ln,
                *(grads_in.get(k) for k in keys))


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
    check_state(state, opts, batch, heads, dim)
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
