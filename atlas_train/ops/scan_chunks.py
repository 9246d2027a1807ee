"""One chunk of the memory scan (docs/math.md §3.3-3.6), chunk-parallel, as a pure function of a carry.

`step_token_update` and `step_chunk_update` are the chunk step of each update: they advance the carry over one chunk
(or the piece of one grid chunk that a call holds) under update="token" (§3.4) or update="chunk" (§3.5).

A carry is the flat dict of tensors that crosses a chunk boundary (fast weights, momentum, the chunk's anchor, the
Omega window's cached keys, and for update="chunk" the open chunk's partial sums); `memory_scan`'s public state is
this carry plus the grid position. Everything per token inside a chunk is batched:

* Window gradients. Every key's inner gradient is taken at one anchor: `params` if a document started in
  [chunk start, key], otherwise the anchor carried in. Each gradient is a sum of outer products (memory_mlp), so
  U_t = Σ_k G[t,k] left_k ⊗ right_k, with G built from gamma, the window span and document ids.
* Carry-free sums. What a chunk of update="chunk" adds to the open chunk's gate and key-weight sums depends on the
  inputs alone; `chunk_update_sums` computes it for every chunk of a call before the chain of chunk steps starts.
* Recurrences. With resets as zeros in the gates, S_t = Σ_u Cθ[t,u] U_u + Cθ[t,start] S_prev and
  P_t = Cα[t,start] P_prev + κ_t params − Σ_u Cα[t,u] η_u NS(S_u), where C are L×(L+1) products-of-gates matrices
  (a cumprod, exact when a gate is 0) and κ_t the decayed weight of the latest reset.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from atlas_train.ops import muon_step, outer_sums
from atlas_train.ops.memory_mlp import TokenWeights, loss_gradient_factors, memory_forward
from atlas_train.ops.newton_schulz import newton_schulz


class ScanOptions(NamedTuple):
    """Static settings of one scan."""

    update: str  # "token" | "chunk"
    loss: str  # "l2" | "dot"
    ns_steps: int
    chunk_size: int
    window: int  # c
    dv: int
    weight_names: tuple  # ("W1", "W2") or ("W1", "W2", "W3")
    half_inputs: bool  # the model runs in bf16/fp16: Newton–Schulz may take bf16 operands (`newton_schulz`)


class ChunkInputs(NamedTuple):
    """One chunk's inputs of update="token": its queries, keys and values (B, H, L, ...), and its gate algebra,
    computed for all chunks of a call at once (`token_update_coefficients`): mix (B, H, L, c−1+L), each token's
    momentum weights of the window keys' gradients, Σ_u Cθ[t, u] G[u, k]; momentum_scale (B, H, L), Cθ[t, start];
    decay_start (B, H, L), Cα[t, start]; reset_weight (B, H, L), κ_t; decay_in (B, H, L, L), Cα[t, u]·η_u.
    reset (B, L) marks document starts.

    has_reset says on the host whether any row of the chunk has a document start, so the chunk needs no device sync
    to decide whether to evaluate gradients at the `params` anchor too (a sync per chunk would stop the CPU from
    queueing kernels ahead of the GPU).
    """

    zq: torch.Tensor
    zk: torch.Tensor
    v: torch.Tensor
    mix: torch.Tensor
    momentum_scale: torch.Tensor
    decay_start: torch.Tensor
    reset_weight: torch.Tensor
    decay_in: torch.Tensor
    reset: torch.Tensor
    has_reset: bool


class ChunkSumInputs(NamedTuple):
    """One chunk's inputs of update="chunk": its queries, keys and values (B, H, L, ...), and what the chunk adds to
    the open chunk's sums, computed for all chunks of a call at once (`chunk_update_sums`): key_coef (B, H, c−1+L),
    each window key's total weight over the chunk's tokens, and gate_sums (B, H, 3), the sums of (alpha, theta, eta);
    both over the tokens of the chunk's last document. reset and has_reset as in ChunkInputs."""

    zq: torch.Tensor
    zk: torch.Tensor
    v: torch.Tensor
    key_coef: torch.Tensor
    gate_sums: torch.Tensor
    reset: torch.Tensor
    has_reset: bool


def scan_input_names(opts: ScanOptions) -> tuple[str, ...]:
    """The differentiable per-chunk inputs of the scan's update, in the order the chunk step takes them."""
    inputs = ChunkInputs if opts.update == "token" else ChunkSumInputs
    return inputs._fields[: -2]  # without reset and has_reset


def carry_keys(opts: ScanOptions) -> list[str]:
    """The carry's keys, in the fixed order the autograd function passes them."""
    groups = ("fast", "momentum", "anchor") if opts.update == "token" else ("anchor", "momentum", "grad_sum")
    keys = [f"{g}.{w}" for g in groups for w in opts.weight_names]
    if opts.update == "chunk":
        keys += ["gate_sum", "count"]
    return keys + ["window_zk", "window_v", "window_valid"]


def chunk_carry_keys(opts: ScanOptions, opens: bool, closes: bool) -> list[str]:
    """The carry keys that one chunk step takes and hands on, in `carry_keys` order: all of them, less the gradient
    sums where update="chunk" and the step is a whole grid chunk (it reads no gradient sum and leaves a zero one: the
    scan fills that in once, so that no weight-sized zeros are written and copied per chunk)."""
    keys = carry_keys(opts)
    if opts.update == "chunk" and opens and closes:
        return [k for k in keys if not k.startswith("grad_sum.")]
    return keys


def check_state(state, opts: ScanOptions, batch: int, heads: int, dim: int) -> None:
    """One-line ValueErrors for a `memory_scan` state that does not belong to this call (keys, window shape)."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be the dict memory_scan returned, got {type(state).__name__}")
    expected = set(carry_keys(opts)) | {"pos"}
    if set(state) != expected:
        raise ValueError(f"state keys {sorted(state)} do not match update={opts.update!r} with weights "
                         f"{list(opts.weight_names)}; expected {sorted(expected)}")
    past = opts.window - 1
    if state["window_zk"].shape != (batch, heads, past, dim) or state["window_v"].shape[:3] != (batch, heads, past):
        raise ValueError(f"state window has shape {tuple(state['window_zk'].shape)}, expected "
                         f"{(batch, heads, past, dim)} (batch, heads, c-1, D)")


def initial_carry(params: dict, batch: int, zk: torch.Tensor, v: torch.Tensor, opts: ScanOptions) -> dict:
    """The carry before token 0 of a fresh sequence (token 0 is a document start, so only shapes matter).

    `params` holds the fast weights as (1, H, out, in), like everywhere in the scan."""
    heads, dim, dv, past = zk.shape[1], zk.shape[-1], v.shape[-1], opts.window - 1
    carry = {}
    for w in opts.weight_names:
        p = params[w].expand(batch, *params[w].shape[1:])
        zero = torch.zeros_like(p)
        if opts.update == "token":
            carry.update({f"fast.{w}": p, f"momentum.{w}": zero, f"anchor.{w}": p})
        else:
            carry.update({f"anchor.{w}": p, f"momentum.{w}": zero, f"grad_sum.{w}": zero})
    if opts.update == "chunk":
        carry["gate_sum"] = zk.new_zeros(batch, heads, 3)
        carry["count"] = torch.zeros(batch, dtype=torch.long, device=zk.device)
    carry["window_zk"] = zk.new_zeros(batch, heads, past, dim)
    carry["window_v"] = v.new_zeros(batch, heads, past, dv)
    carry["window_valid"] = torch.zeros(batch, past, dtype=torch.bool, device=zk.device)
    return carry


def _shape_constant(make):
    """Cache a function of (sizes, device) that builds index and mask tensors. A chunk's computation runs for every
    chunk (and is replayed from a CUDA graph), so its shape constants are made once instead of as operators of
    every chunk, forward and recompute. Built outside inference mode: autograd may save them later (gather's index).
    Under torch.compile the function is traced as it is (the compiler folds the constants itself), and while a CUDA
    graph is being captured it is recorded as it is: a tensor made there holds its values only once the graph is
    replayed, so it must not be cached (the scan's graphs run each computation once before capturing it, so the
    cache is filled by then)."""
    @functools.lru_cache(maxsize=256)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return make(*args)

    @functools.wraps(make)
    def shape_constant(*args):
        if torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return make(*args)
        return cached(*args)

    shape_constant.cache_clear, shape_constant.cache_info = cached.cache_clear, cached.cache_info
    return shape_constant


@_shape_constant
def _gate_product_masks(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (L, L+1) masks of gate_products: row ≥ column (where the gates enter before the doubling) and
    row + 1 ≥ column (the entries that are not zero)."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length + 1, device=device)[None, :]
    return rows >= cols, rows + 1 >= cols


def gate_products(gate: torch.Tensor) -> torch.Tensor:
    """C (B, H, L, L+1): C[t, 0] = Π_{r≤t} g_r, C[t, u+1] = Π_{u<r≤t} g_r for u ≤ t, 0 for u > t.

    A prefix product down the rows by doubling (log2 L multiplications), exact when a gate is 0 (document resets).
    Not torch.cumprod: its backward asks the host whether the input holds zeros (a device sync), which a CUDA
    graph cannot capture."""
    length = gate.shape[-1]
    fill, lower = _gate_product_masks(length, gate.device)
    products = torch.where(fill, gate.unsqueeze(-1), 1.0)
    span = 1
    while span < length:
        products = torch.cat([products[..., :span, :], products[..., span:, :] * products[..., :-span, :]], dim=-2)
        span *= 2
    return products * lower


@_shape_constant
def _window_lags(length: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma index of each (token, key) pair, clamped into range; whether the key is in the token's window) for a
    chunk of `length` tokens after c − 1 cached keys, see window_weights."""
    lag = (torch.arange(length, device=device)[:, None] + c - 1
           - torch.arange(length + c - 1, device=device)[None, :])
    return lag.clamp(0, c - 1), (lag >= 0) & (lag < c)


def window_weights(gamma: torch.Tensor, key_doc: torch.Tensor, token_doc: torch.Tensor) -> torch.Tensor:
    """G (B, H, L, c-1+L): weight of key k (cached keys first, then the chunk's) in token l's window sum.

    Key k is token l - j with j = l + c - 1 - k; it counts when 0 ≤ j < c and it lies in token l's document.
    """
    length, c = gamma.shape[-2], gamma.shape[-1]
    lag, in_span = _window_lags(length, c, gamma.device)
    g = torch.gather(gamma, -1, lag.expand(*gamma.shape[:2], *lag.shape)) * in_span
    same_doc = key_doc[:, None, None, :] == token_doc[:, None, :, None]
    return g * same_doc


def _select(mask: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """Per (batch, token) choice between two (B, H, L, ...) tensors; mask is (B, L)."""
    shape = (mask.shape[0], 1, mask.shape[1]) + (1,) * (if_false.dim() - 3)
    return torch.where(mask.view(shape), if_true, if_false)


def _document_ids(window_valid, reset):
    """token_doc (B, L): the documents started up to each token (of a chunk, or of a whole call); key_doc
    (B, c−1+L): the same for each window key (the c−1 cached keys first), −1 for cached keys of an earlier document,
    so that no token matches them."""
    token_doc = torch.cumsum(reset.long(), dim=-1)
    key_doc = torch.cat([torch.where(window_valid, 0, -1), token_doc], dim=-1)
    return token_doc, key_doc


def _window_keys(carry, x, opts: ScanOptions, key_doc=None, token_doc=None):
    """The chunk's window keys and values (cached ones first) and the window handed to the next chunk. Without
    document ids the chunk holds no document start: its keys are all valid and the cached ones keep their flags."""
    past = opts.window - 1
    keys_z = torch.cat([carry["window_zk"], x.zk], dim=2)
    keys_v = torch.cat([carry["window_v"], x.v], dim=2)
    start = keys_z.shape[2] - past
    if key_doc is None:
        valid = torch.cat([carry["window_valid"], torch.ones_like(x.reset)], dim=-1)[:, start:]
    else:
        valid = key_doc[:, start:] == token_doc[:, -1:]
    return keys_z, keys_v, {"window_zk": keys_z[:, :, start:], "window_v": keys_v[:, :, start:], "window_valid": valid}


def _gradient_factors(carry, keys_z, keys_v, params, ln, opts: ScanOptions, after_reset=None):
    """Gradient factors of every window key at its anchor: `params` for keys after a document start in the chunk
    (after_reset (B, L), given only when the chunk holds one), the anchor carried in for the others."""
    anchor = {w: carry[f"anchor.{w}"] for w in opts.weight_names}
    factors = loss_gradient_factors(anchor, keys_z, keys_v, ln, opts.loss)
    if after_reset is None:
        return factors
    key_after_reset = torch.cat([torch.zeros_like(carry["window_valid"]), after_reset], dim=-1)
    at_params = loss_gradient_factors(params, keys_z, keys_v, ln, opts.loss)
    return {w: tuple(_select(key_after_reset, p, a) for p, a in zip(at_params[w], factors[w])) for w in factors}


@_shape_constant
def _call_indices(length: int, c: int, offset: int, chunk: int, device: torch.device):
    """For a call of `length` tokens starting `offset` tokens into a grid chunk: the index into the call's key
    documents (cached keys first) of each (token t, lag j) window key, t + c − 1 − j (T, c); the last token of each
    token's piece (T,)."""
    t = torch.arange(length, device=device)
    keys = t[:, None] + c - 1 - torch.arange(c, device=device)
    last = (((t + offset) // chunk + 1) * chunk - offset - 1).clamp(max=length - 1)
    return keys, last


def _call_documents(reset, window_valid, c: int, offset: int, chunk: int):
    """in_window (B, T, c): the key at lag j of token t is in t's document; counted (B, T): t is in its piece's last
    document. Documents are numbered over the whole call (cached keys: 0 if in the document running at the call's
    start, −1 if not), so a key and a token share a document when their numbers are equal, as `window_weights`
    decides within one chunk."""
    token_doc, key_doc = _document_ids(window_valid, reset)
    keys, last = _call_indices(reset.shape[-1], c, offset, chunk, reset.device)
    return key_doc[:, keys] == token_doc[..., None], token_doc == token_doc[:, last]


def _by_piece(x: torch.Tensor, offset: int, chunk: int, pad: float = 0.0) -> torch.Tensor:
    """(B, H, T, ...) -> (B, H, P, chunk, ...): the call's tokens on the chunk grid, a piece per grid chunk (`pad`
    before the call's first token and after its last)."""
    pieces = -(-(offset + x.shape[2]) // chunk)
    tail = x.dim() - 3
    padded = F.pad(x, (0, 0) * tail + (offset, pieces * chunk - offset - x.shape[2]), value=pad)
    return padded.view(*x.shape[:2], pieces, chunk, *x.shape[3:])


def _piece_window_weights(gamma: torch.Tensor, offset: int, chunk: int) -> torch.Tensor:
    """G (B, H, P, chunk, c−1+chunk) of every piece from the masked gamma (B, H, T, c): G[l, k] = gamma[l, j] with
    lag j = l + c − 1 − k, the layout of `window_weights`. Flipping the lag and shifting each row right by its index
    (pad every row, then read the flat rows one element shorter) puts gamma's lags on those diagonals."""
    c = gamma.shape[-1]
    flipped = _by_piece(gamma.flip(-1), offset, chunk)
    width = c - 1 + chunk
    return F.pad(flipped, (0, chunk)).flatten(-2)[..., : chunk * width].unflatten(-1, (chunk, width))


def _chunk_keys(carry, x, params, ln, opts: ScanOptions):
    """Gradient factors of the chunk's window keys, the window handed on, and the chunk's document ids (token_doc,
    after_reset; None without a document start, where the chunk skips them)."""
    if x.has_reset:
        token_doc, key_doc = _document_ids(carry["window_valid"], x.reset)
        after_reset = token_doc > 0
        keys_z, keys_v, window = _window_keys(carry, x, opts, key_doc, token_doc)
    else:
        token_doc = after_reset = None
        keys_z, keys_v, window = _window_keys(carry, x, opts)
    return _gradient_factors(carry, keys_z, keys_v, params, ln, opts, after_reset), window, token_doc, after_reset


def chunk_update_sums(gamma, gates, reset, window_valid, offset: int, chunk: int):
    """ChunkSumInputs' key_coef (B, H, P, c−1+chunk) and gate_sums (B, H, P, 3) for all P pieces of a call at once,
    on the chunk grid (offset: the call's first token's place in its grid chunk; `_chunk_slices` takes each piece's
    part). They depend on the inputs alone, not on the carry, so they leave the chain of chunk steps: a few batched
    operators per call instead of a dozen small ones per chunk, forward and recompute; autograd differentiates them
    as usual. gamma (B, H, T, c); gates (B, H, T, 3): alpha, theta, eta; reset (B, T); window_valid (B, c−1): the
    cached keys the call starts with."""
    in_window, counted = _call_documents(reset, window_valid, gamma.shape[-1], offset, chunk)
    weights = _piece_window_weights(gamma * (in_window & counted[..., None])[:, None], offset, chunk)
    gate_sums = _by_piece(gates * counted[:, None, :, None], offset, chunk).sum(-2)
    return weights.sum(-2), gate_sums


def token_update_coefficients(gamma, alpha, eta, theta, reset, window_valid, offset: int, chunk: int):
    """ChunkInputs' mix, momentum_scale, decay_start, reset_weight and decay_in for all P pieces of a call at once,
    on the chunk grid like `chunk_update_sums` (and for the same reason). A document start zeroes the gates there
    (the resets of the recurrences); outside the call the grid is padded with gates of 1 and zero weights, which
    leaves every real token's products unchanged."""
    in_window, _ = _call_documents(reset, window_valid, gamma.shape[-1], offset, chunk)
    weights = _piece_window_weights(gamma * in_window[:, None], offset, chunk)
    started = reset.to(alpha.dtype)[:, None, :]
    c_theta = gate_products(_by_piece(theta * (1.0 - started), offset, chunk, pad=1.0))
    c_alpha = gate_products(_by_piece(alpha * (1.0 - started), offset, chunk, pad=1.0))
    reset_weight = (c_alpha[..., 1:] * _by_piece(started * alpha, offset, chunk)[..., None, :]).sum(-1)
    decay_in = c_alpha[..., 1:] * _by_piece(eta, offset, chunk)[..., None, :]
    return c_theta[..., 1:] @ weights, c_theta[..., 0], c_alpha[..., 0], reset_weight, decay_in


def step_token_update(carry: dict, x: ChunkInputs, params: dict, ln, opts: ScanOptions, closes: bool):
    """Spec 3.4 for one chunk: per-token momentum, NS and weights, reads after each token's update."""
    factors, window, _, after_reset = _chunk_keys(carry, x, params, ln, opts)
    reset_weight = x.reset_weight if x.has_reset else None  # zero without a document start
    mix, scale = x.mix, x.momentum_scale
    fast, out = {}, {}
    for w in opts.weight_names:
        prev = carry[f"momentum.{w}"]
        momentum = outer_sums.weighted_outer_sums(mix, *factors[w], scale, prev, opts.half_inputs)
        fast[w] = TokenWeights(carry[f"fast.{w}"], x.decay_start, params[w], reset_weight,
                               newton_schulz(momentum, opts.ns_steps, opts.half_inputs), x.decay_in, opts.half_inputs)
        # The momentum handed on, formed again for the last token alone: taken as momentum[:, :, -1], its gradient
        # would be a zero tensor of the momenta's size with one token filled, added to theirs.
        out[f"momentum.{w}"] = outer_sums.weighted_outer_sums_reference(mix[:, :, -1:], *factors[w],
                                                                        scale[..., -1:], prev)[:, :, 0]
    y = memory_forward(fast, x.zq, opts.dv, ln)  # before last(): each token weights' last matrix comes with its read
    for w in opts.weight_names:
        out[f"fast.{w}"] = fast[w].last()
        if closes:
            out[f"anchor.{w}"] = out[f"fast.{w}"]
        elif x.has_reset:
            out[f"anchor.{w}"] = _select(after_reset[:, -1:], params[w][:, :, None],
                                         carry[f"anchor.{w}"][:, :, None])[:, :, 0]
        else:
            out[f"anchor.{w}"] = carry[f"anchor.{w}"]
    out.update(window)
    return y, out


def step_chunk_update(carry: dict, x: ChunkSumInputs, params: dict, ln, opts: ScanOptions, closes: bool,
                      opens: bool = False):
    """Spec 3.5 for (a piece of) one grid chunk: reads at the anchor, one Muon step when the grid chunk closes.

    A document start inside the chunk ends the open chunk (its update would be discarded by the reset), so only
    tokens of the chunk's last document contribute to the partial sums (x.key_coef and x.gate_sums count only them).
    Most chunks hold no document start (`x.has_reset`, known on the host): they skip the document ids, the masking
    and the reset selections, which would be the identity there, and so launch fewer operators.

    At the production shape (B·H = 128 chains) the chunk step is bound by the bytes it moves over the fast weights,
    not by arithmetic, so each pass over them counts: a piece that `opens` a grid chunk starts from the zero gradient
    sum every closing chunk leaves (and a sequence starts with), and does not read it (the carry may then lack it);
    a piece that opens and closes one (a whole grid chunk: most pieces) does not hand on the zero sum it leaves
    either (`chunk_carry_keys`); a closing piece's gradient sum, momentum, NS and weight step are one `muon_step`
    (on a GPU one fused kernel, forward and backward).
    """
    factors, window, token_doc, after_reset = _chunk_keys(carry, x, params, ln, opts)
    anchor = {w: carry[f"anchor.{w}"] for w in opts.weight_names}
    y = memory_forward(anchor, x.zq, opts.dv, ln)
    if x.has_reset:
        y = _select(after_reset, memory_forward(params, x.zq, opts.dv, ln), y)
        reset_seen = after_reset[:, -1]
        keep = (~reset_seen).to(x.gate_sums.dtype)
        gate_sum = keep[:, None, None] * carry["gate_sum"] + x.gate_sums
        count = torch.where(reset_seen, 0, carry["count"]) + (token_doc == token_doc[:, -1:]).sum(-1)
    else:
        gate_sum = carry["gate_sum"] + x.gate_sums
        count = carry["count"] + x.reset.shape[-1]
    if closes:  # the chunk's mean gates: decay (alpha), momentum (theta), learning rate (eta)
        decay, momentum_gate, rate = (gate_sum / count.to(gate_sum.dtype)[:, None, None])[..., None, None].unbind(-3)
        descent = -rate  # the weights' step factor
    out = {}
    for w in opts.weight_names:
        grad_sum, momentum, start = carry.get(f"grad_sum.{w}"), carry[f"momentum.{w}"], anchor[w]
        if x.has_reset:
            momentum = keep[:, None, None, None] * momentum
            grad_sum = grad_sum if opens else keep[:, None, None, None] * grad_sum
            start = _select(reset_seen[:, None], params[w][:, :, None], start[:, :, None])[:, :, 0]
        if closes:  # the chunk's gradient sum, momentum, NS and weight step: one fused kernel on a GPU
            momentum, start = muon_step.muon_step(x.key_coef, *factors[w], None if opens else grad_sum, momentum,
                                                  start, momentum_gate, descent, decay, opts.ns_steps,
                                                  opts.half_inputs)
            grad_sum = None if opens else torch.zeros_like(grad_sum)
        else:
            added = outer_sums.outer_sum_of_keys(x.key_coef, *factors[w])
            grad_sum = added if opens else grad_sum + added
        out.update({f"anchor.{w}": start, f"momentum.{w}": momentum})
        if grad_sum is not None:
            out[f"grad_sum.{w}"] = grad_sum
    if closes:
        gate_sum, count = torch.zeros_like(gate_sum), torch.zeros_like(count)
    out.update({"gate_sum": gate_sum, "count": count, **window})
    return y, out
