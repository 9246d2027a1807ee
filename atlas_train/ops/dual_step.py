"""One token of `dual_memory_scan` (docs/math.md §8 with T = 1): decoding, and the tokens of a call that
come before the chunk grid's next boundary.

The state is J as a KV cache (every written key with its current coefficient, and whether it is in the current
document) plus W1, the last c − 1 values (the Omega window), and the open chunk's anchor: W1 at the chunk's start and
the coefficients that the c − 1 keys before the chunk had then (later keys had none). Keys outside the current
document hold zero coefficients: J dropped them at the document's start. A step recomputes the window
keys' inner gradients at that anchor (one pull of c points over J), writes the token and reads it. Plain PyTorch, so
autograd runs through it like through any layer; J grows by one key per step, as a KV cache does.
"""

from __future__ import annotations

import torch

from atlas_train.ops.dual_attention import Implementation, attend
from atlas_train.ops.dual_terms import DualOptions, Params, key_gradients, memory_read, persistent_h

STATE_KEYS = ("keys", "coef", "valid", "window_v", "W1", "anchor_coef", "anchor_W1")


def initial_state(p: Params, batch: int, opts: DualOptions, dtype) -> dict:
    """The state before a sequence's first token: J holds c − 1 placeholder keys outside every document (so that the
    window always has c − 1 earlier keys), W1 and the anchor are `params`."""
    heads, dh, hid = p.w1.shape
    past = opts.window - 1
    w1 = p.w1.to(dtype).expand(batch, heads, dh, hid)
    return {"keys": p.w1.new_zeros(batch, heads, past, dh, dtype=dtype),
            "coef": p.w1.new_zeros(batch, heads, past, hid, dtype=dtype),
            "valid": torch.zeros(batch, past, dtype=torch.bool, device=p.w1.device),
            "window_v": p.w1.new_zeros(batch, heads, past, dh, dtype=dtype),
            "W1": w1, "anchor_coef": p.w1.new_zeros(batch, heads, past, hid, dtype=dtype), "anchor_W1": w1}


def position(state: dict, opts: DualOptions) -> int:
    """Tokens seen so far (the chunk grid's position): J's size less the placeholders."""
    return state["keys"].shape[2] - (opts.window - 1)


def _documents(valid: torch.Tensor) -> torch.Tensor:
    """Document ids for a pull: 0 for keys in the current document, -1 for older ones."""
    return torch.where(valid, 0, -1)


def dual_step(q, k, v, eta, gamma, p: Params, state: dict, reset, opts: DualOptions, impl: Implementation):
    """One token: q, k, v (B, H, dh), eta (B, H), gamma (B, H, c), reset (B,) bool or None -> (y (B, H, dh), state)."""
    past, size = opts.window - 1, opts.chunk_size
    keys, coef, valid = state["keys"], state["coef"], state["valid"]
    count = keys.shape[2]
    pos = position(state, opts)
    start = count - pos % size  # J index of the open chunk's first key
    w1, anchor_w1, anchor_coef = state["W1"], state["anchor_W1"], state["anchor_coef"]
    if reset is not None:  # a document starts here: J keeps only the persistent pairs, W1 and the anchor restart
        valid = valid & ~reset[:, None]
        coef = torch.where(valid[:, None, :, None], coef, 0.0)  # keys outside the document hold none
        starts = reset[:, None, None, None]
        w1 = torch.where(starts, p.w1.unsqueeze(0), w1)
        anchor_w1 = torch.where(starts, p.w1.unsqueeze(0), anchor_w1)
        anchor_coef = torch.where(starts, 0.0, anchor_coef)

    window_keys = torch.cat([keys[:, :, count - past:], k[:, :, None]], dim=2)  # (B, H, c, dh), oldest first
    window_v = torch.cat([state["window_v"], v[:, :, None]], dim=2)
    window_valid = torch.cat([valid[:, count - past:], valid.new_ones(valid.shape[0], 1)], dim=1)
    point_doc = _documents(window_valid)
    key_doc = _documents(valid)
    final = torch.full((past + 1,), start - past, device=keys.device)  # keys before the tail: final coefficients
    h = persistent_h(window_keys, p, opts.kind) + attend(
        impl, window_keys, keys, coef, final, point_doc, key_doc, opts.kind, p.theta) + attend(
        impl, window_keys, keys[:, :, start - past:start], anchor_coef, None, point_doc,
        key_doc[:, start - past:start], opts.kind, p.theta)
    delta, g_out, hidden = key_gradients(h, anchor_w1, window_keys, window_v, p, opts.loss)
    weight = eta[..., None] * gamma.flip(-1) * window_valid[:, None].to(eta.dtype)  # key w is token t - (c - 1 - w)
    gains = -weight[..., None] * delta
    coef = torch.cat([coef[:, :, :count - past], coef[:, :, count - past:] + gains[:, :, :past], gains[:, :, past:]],
                     dim=2)
    w1 = w1 - torch.einsum("bhw,bhwd,bhwk->bhdk", weight, g_out, hidden)
    keys = torch.cat([keys, k[:, :, None]], dim=2)
    valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)

    h_q = persistent_h(q[:, :, None], p, opts.kind) + attend(
        impl, q[:, :, None], keys, coef, None, valid.new_zeros(valid.shape[0], 1, dtype=torch.long),
        _documents(valid), opts.kind, p.theta)
    y = memory_read(h_q, w1, q[:, :, None], p)[:, :, 0]
    closes = (pos + 1) % size == 0  # the next token starts a chunk: its anchor is the state after this one
    new = {"keys": keys, "coef": coef, "valid": valid, "window_v": window_v[:, :, 1:], "W1": w1,
           "anchor_coef": coef[:, :, count + 1 - past:count + 1] if closes else anchor_coef,
           "anchor_W1": w1 if closes else anchor_w1}
    return y, new
