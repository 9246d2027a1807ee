"""The per-chunk terms of `dual_memory_scan` (docs/math.md §8), batched over chunks, in PyTorch.

Layout: (B, H, C, rows, features) for C chunks of L tokens; a chunk's window holds its c − 1 preceding keys, then its
own L keys (W = c − 1 + L rows). Everything here is differentiable and cheap next to the attention pass over all
written keys (`dual_attention`): these terms touch a chunk's own window only. `dual_chunks` runs them without a
graph in forward and recomputes them under autograd in backward.

* `anchor_terms`: each window key's inner gradient at the chunk's anchor, from h at the key: δ = ∂ℓ/∂h (the
  coefficient direction a key is written with) and g_out, gelu(h) (∇W1 ℓ = g_out ⊗ gelu(h)).
* `mixing`: M[t, w] = Σ_{u ≤ t} η_u·G[u, w], how much of key w's gradient token t's weights hold (G: the Omega
  window's gamma, §3.4, restricted to the document), so that P_t = P_anchor − Σ_w M[t, w]·∇ℓ_w.
* `reads`: y_t = f(P_t; q_t), with h(q_t) = persistent + (the pull over earlier keys) + the window's part.
* `chunk_step`: what a chunk hands on: the coefficients its window keys gain and W1 after its last token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from atlas_train.ops.dual_attention import kernel_values
from atlas_train.ops.memory_mlp import LN_EPS, gelu_gradient
from atlas_train.ops.scan_chunks import window_weights


class DualOptions(NamedTuple):
    """Static settings of one dual scan."""

    loss: str  # "dot" | "l2"
    kind: str  # "exp" | "poly2"
    chunk_size: int  # L
    window: int  # c
    half_inputs: bool = False  # a bf16/fp16 model: on a GPU its float32 products take the fast paths' precision


class Params(NamedTuple):
    """The outer-loop parameters, in the compute dtype: W1 (H, dh, hid), K0 (H, P, dh) unit-normalised, A0 (H, P, hid),
    θ (H,) (the exp kernel's scale or poly2's a2), ln_weight / ln_bias (H, dh) or None."""

    w1: torch.Tensor
    k0: torch.Tensor
    a0: torch.Tensor
    theta: torch.Tensor
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None


def _per_head(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-head tensor (H, ...) shaped to broadcast against (B, H, <dims - 2 - t.dim() + 1 more>, ...)."""
    return t.view(1, t.shape[0], *([1] * (dims - 1 - t.dim())), *t.shape[1:])


def persistent_h(x: torch.Tensor, p: Params, kind: str) -> torch.Tensor:
    """Σ_p κ(x, K̂0_p)·A0_p, the persistent pairs' part of h, for points x (B, H, ..., dh)."""
    keys = _per_head(p.k0, x.dim())
    return kernel_values(x @ keys.transpose(-1, -2), kind, p.theta) @ _per_head(p.a0, x.dim())


def _layer_norm(out: torch.Tensor, p: Params):
    """(normalised, rstd, LN(out)) with the affine of every head; LN(out) = out without LN."""
    if p.ln_weight is None:
        return None, None, out
    centred = out - out.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)
    normed = centred * rstd
    return normed, rstd, normed * _per_head(p.ln_weight, out.dim()) + _per_head(p.ln_bias, out.dim())


def memory_read(h: torch.Tensor, w1: torch.Tensor, x: torch.Tensor, p: Params) -> torch.Tensor:
    """f = x + LN(W1·gelu(h)) for points x with pre-activations h and first-layer weights w1 (.., dh, hid)."""
    return x + _layer_norm(F.gelu(h) @ w1.transpose(-1, -2), p)[2]


def key_gradients(h, w1, x, v, p: Params, loss: str):
    """(δ, g_out, gelu(h)) of keys x with values v at pre-activations h and first-layer weights w1 (.., dh, hid):
    the hand-derived backward of ℓ through f = x + LN(W1·gelu(h)) (the tests hold the scan to autograd's)."""
    hidden = F.gelu(h)
    normed, rstd, out = _layer_norm(hidden @ w1.transpose(-1, -2), p)
    err = x + out - v if loss == "l2" else -v
    if normed is None:
        g_out = err
    else:
        g_normed = err * _per_head(p.ln_weight, err.dim())
        g_out = rstd * (g_normed - g_normed.mean(-1, keepdim=True)
                        - normed * (g_normed * normed).mean(-1, keepdim=True))
    return gelu_gradient(g_out @ w1, h), g_out, hidden


def anchor_terms(h, w1c, kw, vw, win_doc, carry_doc, p: Params, opts: DualOptions, has_reset: bool):
    """(δ, g_out, gelu(h)) (B, H, C, W, ·) of every window key at its anchor: the chunk's start weights w1c
    (B, H, C, dh, hid) and J (h: the persistent pairs' part plus the pull over the keys written before the chunk), or
    `params` for a key of a document that starts inside the chunk (whose pull is empty: no earlier key shares its
    document)."""
    terms = key_gradients(h, w1c, kw, vw, p, opts.loss)
    if has_reset:
        fresh = key_gradients(h, _per_head(p.w1, w1c.dim()), kw, vw, p, opts.loss)
        later = (win_doc > carry_doc[..., None])[:, None, :, :, None]
        terms = tuple(torch.where(later, f, t) for f, t in zip(fresh, terms))
    return terms


def mixing(eta: torch.Tensor, gamma: torch.Tensor, tok_doc: torch.Tensor, win_doc: torch.Tensor) -> torch.Tensor:
    """M (B, H, C, L, W) from eta (B, H, C, L), gamma (B, H, C, L, c) and document ids (B, C, L), (B, C, W)."""
    batch, heads, chunks, length = eta.shape
    window = win_doc.shape[-1]
    flat_gamma = gamma.transpose(1, 2).reshape(batch * chunks, heads, length, gamma.shape[-1])
    g = window_weights(flat_gamma, win_doc.reshape(batch * chunks, window), tok_doc.reshape(batch * chunks, length))
    g = g.view(batch, chunks, heads, length, window).transpose(1, 2)
    same_doc = (tok_doc[..., :, None] == win_doc[..., None, :])[:, None]
    return torch.cumsum(eta[..., None] * g, dim=-2) * same_doc.to(eta.dtype)


def _own_or_initial(own: torch.Tensor, initial: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per token: `own` where keep (B, C, rows), else the initial weights' result."""
    return torch.where(keep[:, None, ..., None], own, initial)


def reads(q, h_main, tails, delta, g_out, hidden, w1c, kw, m, tok_doc, win_doc, carry_doc, p: Params,
          opts: DualOptions, has_reset: bool) -> torch.Tensor:
    """y = f(P_t; q_t) (B, H, C, L, dh) for queries q (B, H, C, L, dh).

    h_main (B, H, C, L, hid): the pull over the keys whose coefficients were final before the chunk; tails
    (B, H, C, c − 1, hid): the coefficients of the window's first c − 1 keys as the chunk found them; the window's
    own part subtracts what the chunk has written up to t, Σ_w M[t, w]·κ(q_t, k_w)·δ_w. W1 likewise:
    W1_t·a = W1_start·a − Σ_w M[t, w]·(gelu(h_w)·a)·g_out_w."""
    past = opts.window - 1
    same_doc = (tok_doc[..., :, None] == win_doc[..., None, :])[:, None]
    kappa = kernel_values(q @ kw.transpose(-1, -2), opts.kind, p.theta) * same_doc.to(q.dtype)
    h = persistent_h(q, p, opts.kind) + h_main + kappa[..., :past] @ tails - (kappa * m) @ delta
    act = F.gelu(h)
    out = act @ w1c.transpose(-1, -2)
    if has_reset:
        out = _own_or_initial(out, act @ _per_head(p.w1, act.dim()).transpose(-1, -2), tok_doc == carry_doc[..., None])
    out = out - ((act @ hidden.transpose(-1, -2)) * m) @ g_out
    return q + _layer_norm(out, p)[2]


def chunk_step(delta, g_out, hidden, w1c, m_last, last_doc, carry_doc, p: Params):
    """(coefficient gains Δ (B, H, C, W, hid) of the window keys, W1 after the chunk's last token (B, H, C, dh, hid))
    from M's last row m_last (B, H, C, W); last_doc (B, C): the last token's document."""
    gains = -m_last[..., None] * delta
    start = _own_or_initial(w1c, _per_head(p.w1, w1c.dim()).expand_as(w1c), (last_doc == carry_doc)[..., None])
    return gains, start - torch.einsum("bhcw,bhcwd,bhcwk->bhcdk", m_last, g_out, hidden)
