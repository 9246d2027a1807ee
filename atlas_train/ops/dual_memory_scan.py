"""`dual_memory_scan` (docs/math.md §8): the DeepTransformers' memory, whose first layer lives on the
exponential kernel's infinite features and is therefore kept in dual form, a sum over the keys written so far.

The public entry point validates its inputs and runs the tokens up to the chunk grid's next boundary one by one
(`dual_step`: decoding, or a call that starts inside a chunk), the rest chunk-parallel (`dual_chunks`). Both read and
write the same state, so calls may be split anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atlas_train.ops import dual_attention
from atlas_train.ops.chunked_scan import grad_wanted
from atlas_train.ops.dual_attention import KERNELS
from atlas_train.ops.dual_chunks import PAD_DOC, DualScanFunction, make_layout
from atlas_train.ops.dual_step import STATE_KEYS, dual_step, initial_state, position
from atlas_train.ops.dual_terms import DualOptions, Params
from atlas_train.ops.precision import is_half, scan_precision

LOSSES = ("dot", "l2")
_PARAM_KEYS = ("W1", "K0", "A0", "scale", "ln_weight", "ln_bias")


def dual_memory_scan(q, k, v, eta, gamma, params, *, doc_start=None, state=None, chunk_size=64, loss="dot",
                     kernel="exp", a2=None):
    """Run the dual-form memory over a segment; returns (y (B, T, H, dh) in the input dtype, state).

    Args:
        q, k: (B, T, H, dh) queries and keys, unit vectors (the caller L2-normalises them).
        v: (B, T, H, dh) values.
        eta: (B, T, H) inner learning rates, > 0.
        gamma: (B, T, H, c) Omega-window weights: gamma[b, t, h, j] weights token t − j in token t's update.
        params: "W1" (H, dh, hid); "K0" (H, P, dh) persistent keys (unit-normalised where used); "A0" (H, P, hid)
            their coefficients; "scale" (H,) > 0 the exp kernel's s_h (not with kernel="poly2"); optional
            "ln_weight", "ln_bias" (H, dh).
        doc_start: (B, T) bool, True at the first token of each document; token 0 counts as one unless a state is
            passed in.
        state: the state a previous call returned for the preceding tokens (any split point), or None.
        chunk_size: L; inner gradients inside a chunk of the global grid are taken at the chunk's start.
        loss: "dot" (ℓ = −<f(k), v>) or "l2" (ℓ = ½‖f(k) − v‖²).
        kernel: "exp" (κ(x, y) = exp(s_h (x·y − 1))) or "poly2" (κ = x·y + a2 (x·y)², for tests).
        a2: poly2's coefficient, a float or an (H,) tensor; None with "exp".

    Returns:
        y: (B, T, H, dh).
        state: dict of tensors, float32 (float64 for float64 inputs) unless noted: "keys" (B, H, N, dh) and "coef"
            (B, H, N, hid) the written keys with their current coefficients (J less the persistent pairs; the first
            c − 1 entries are placeholders; keys outside the current document hold zeros), "valid" (B, N) bool (key
            in the current document), "window_v"
            (B, H, c − 1, dh) the last values, "W1" (B, H, dh, hid), and the open chunk's anchor: "anchor_W1" and
            "anchor_coef" (B, H, c − 1, hid), the coefficients of the c − 1 keys before the chunk at its start.
            N − (c − 1) is the number of tokens seen: the chunk grid continues across calls. Not detached:
            gradients flow through it in both directions.
    """
    _validate(q, k, v, eta, gamma, params, doc_start, chunk_size, loss, kernel, a2)
    # Autocast off: the math is float32 (float64) whatever the caller's autocast, and the backward's recomputation
    # (which runs outside it) then repeats the forward exactly; a bf16 model's products on a GPU take the precision
    # memory_scan's take (scan_precision), in backward too (DualScanFunction).
    with scan_precision(q.device, is_half(q.dtype)):
        return _scan(q, k, v, eta, gamma, params, doc_start, state, chunk_size, loss, kernel, a2)


def _scan(q, k, v, eta, gamma, params, doc_start, state, chunk_size, loss, kernel, a2):
    """`dual_memory_scan` on validated inputs."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, length, heads = q.shape[:3]
    opts = DualOptions(loss, kernel, int(chunk_size), gamma.shape[-1], is_half(q.dtype))
    theta = params["scale"] if kernel == "exp" else torch.as_tensor(a2, device=q.device).expand(heads)
    ln = [params[name].to(dtype) if name in params else None for name in ("ln_weight", "ln_bias")]
    p = Params(params["W1"].to(dtype), F.normalize(params["K0"].to(dtype), dim=-1, eps=1e-6), params["A0"].to(dtype),
               theta.to(dtype), *ln)
    inputs = [t.to(dtype).transpose(1, 2) for t in (q, k, v, eta, gamma)]
    # Asked with the points as the passes get them, in the compute dtype (a kernel refuses bf16 points).
    impl = dual_attention.implementation(inputs[0], p.w1.shape[-1], kernel, opts.half_inputs)
    reset = torch.zeros(batch, length, dtype=torch.bool, device=q.device) if doc_start is None else doc_start.clone()
    if state is None:
        state = initial_state(p, batch, opts, dtype)
        reset[:, 0] = True
    else:
        _check_state(state, batch, heads, q.shape[-1], p.w1.shape[-1], opts)
        state = {key: t if t.dtype == torch.bool else t.to(dtype) for key, t in state.items()}
    ys = []
    stepped = length if length == 1 else min(length, -position(state, opts) % opts.chunk_size)
    for t in range(stepped):
        y, state = dual_step(*(x[:, :, t] for x in inputs), p, state,
                             reset[:, t] if doc_start is not None or t == 0 else None, opts, impl)
        ys.append(y[:, :, None])
    if stepped < length:
        y, state = _chunks([x[:, :, stepped:] for x in inputs], p, state, reset[:, stepped:], opts, impl)
        ys.append(y)
    return torch.cat(ys, dim=2).transpose(1, 2).to(q.dtype), state


def _chunks(inputs, p: Params, state: dict, reset, opts: DualOptions, impl):
    """The chunk-parallel path for a call that starts on the grid: pads to whole chunks, runs DualScanFunction and
    assembles the state."""
    q, k, v, eta, gamma = inputs
    length, size, past = q.shape[2], opts.chunk_size, opts.window - 1
    pad = -length % size
    padded = [F.pad(t, (0, 0, 0, pad)) if t.dim() == 4 else F.pad(t, (0, pad)) for t in (q, k, v, eta)]
    padded.append(F.pad(gamma, (0, 0, 0, pad)))
    tok_doc = F.pad(torch.cumsum(reset.long(), dim=1), (0, pad), value=PAD_DOC)
    key_doc = torch.cat([torch.where(state["valid"], 0, -1), tok_doc], dim=1)
    carried = state["keys"].shape[2]
    layout = make_layout(carried, length, opts, reset)
    differentiable = [*padded, *(t for t in p if t is not None), state["keys"], state["coef"], state["W1"],
                      state["window_v"]]
    y, coef, w1, tail, w1_start = DualScanFunction.apply(
        opts, layout, impl, grad_wanted(differentiable), *padded, *p, state["keys"], state["coef"], state["W1"],
        state["window_v"], tok_doc, key_doc)
    total = carried + length
    valid = key_doc[:, :total] == tok_doc[:, length - 1:length]
    coef = torch.where(valid[:, None, :, None], coef[:, :, :total], 0.0)  # keys outside the document hold none
    new = {"keys": torch.cat([state["keys"], k], dim=2), "coef": coef, "valid": valid,
           "window_v": torch.cat([state["window_v"], v], dim=2)[:, :, length:length + past], "W1": w1}
    if length % size == 0:
        new.update(anchor_coef=coef[:, :, total - past:total], anchor_W1=w1)
    else:  # the last chunk is open: its anchor is its start, or `params` where a document started inside it
        begin = length - length % size
        carry_doc = tok_doc[:, begin - 1] if begin > 0 else torch.zeros_like(tok_doc[:, 0])
        same = (tok_doc[:, length - 1] == carry_doc)[:, None, None, None]
        anchor_valid = valid[:, None, carried + begin - past:carried + begin, None]
        new.update(anchor_coef=torch.where(anchor_valid, tail, 0.0),
                   anchor_W1=torch.where(same, w1_start, p.w1.unsqueeze(0)))
    return y[:, :, :length], new


def _check_state(state, batch: int, heads: int, dh: int, hid: int, opts: DualOptions) -> None:
    """One-line ValueErrors for a state that does not belong to this call."""
    if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be the dict dual_memory_scan returned (keys {sorted(STATE_KEYS)}), got {got}")
    past = opts.window - 1
    count = state["keys"].shape[2] if state["keys"].dim() == 4 else -1
    want = {"keys": (batch, heads, count, dh), "coef": (batch, heads, count, hid), "valid": (batch, count),
            "window_v": (batch, heads, past, dh), "W1": (batch, heads, dh, hid),
            "anchor_coef": (batch, heads, past, hid), "anchor_W1": (batch, heads, dh, hid)}
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, expected {shape} "
                             f"(batch, heads, ..., window c - 1 = {past})")
    if count < past or state["valid"].dtype != torch.bool:
        raise ValueError(f"state holds {count} keys (at least c - 1 = {past}) and a bool 'valid'")


def _validate(q, k, v, eta, gamma, params, doc_start, chunk_size, loss, kernel, a2) -> None:
    """Raise ValueError with a one-line message for any input that breaks the contract."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    named = {"q": q, "k": k, "v": v, "eta": eta, "gamma": gamma}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {q.dtype} like q")
    if q.dim() != 4 or q.shape[1] == 0:
        raise ValueError(f"q must be (B, T, H, dh) with T >= 1, got shape {tuple(q.shape)}")
    batch, length, heads, dh = q.shape
    for name, shape in {"k": q.shape, "v": q.shape, "eta": q.shape[:3]}.items():
        if named[name].shape != shape:
            raise ValueError(f"{name} has shape {tuple(named[name].shape)}, expected {tuple(shape)}")
    if gamma.dim() != 4 or gamma.shape[:3] != q.shape[:3] or gamma.shape[3] < 1:
        raise ValueError(f"gamma has shape {tuple(gamma.shape)}, expected {(batch, length, heads)} + (c,), c >= 1")
    if not isinstance(params, dict) or not {"W1", "K0", "A0"} <= set(params):
        raise ValueError("params must be a dict with 'W1', 'K0', 'A0' (and 'scale' for kernel 'exp'; optionally "
                         "'ln_weight', 'ln_bias')")
    unknown = set(params) - set(_PARAM_KEYS)
    if unknown:
        raise ValueError(f"unknown params keys {sorted(unknown)}; allowed {list(_PARAM_KEYS)}")
    if ("scale" in params) != (kernel == "exp"):
        raise ValueError("params['scale'] is required with kernel 'exp' and not used (so not allowed) with 'poly2'")
    if ("ln_weight" in params) != ("ln_bias" in params):
        raise ValueError("params must hold both 'ln_weight' and 'ln_bias' or neither")
    hid = params["W1"].shape[-1] if params["W1"].dim() == 3 else -1
    n_persistent = params["K0"].shape[1] if params["K0"].dim() == 3 else -1
    want = {"W1": (heads, dh, hid), "K0": (heads, n_persistent, dh), "A0": (heads, n_persistent, hid),
            "scale": (heads,), "ln_weight": (heads, dh), "ln_bias": (heads, dh)}
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"params[{name!r}] must be a floating-point tensor")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"params[{name!r}] has shape {tuple(t.shape)}, expected {want[name]}")
    if kernel == "exp" and a2 is not None:
        raise ValueError("a2 is the poly2 kernel's coefficient; kernel 'exp' takes none")
    if kernel == "poly2" and not (isinstance(a2, (int, float)) or (isinstance(a2, torch.Tensor)
                                                                   and tuple(a2.shape) in ((), (heads,)))):
        raise ValueError(f"kernel 'poly2' needs a2, a float or a tensor of shape ({heads},), got {a2!r}")
    if doc_start is not None and (not isinstance(doc_start, torch.Tensor) or doc_start.dtype != torch.bool
                                  or tuple(doc_start.shape) != (batch, length)):
        raise ValueError(f"doc_start must be a bool tensor of shape {(batch, length)}")
