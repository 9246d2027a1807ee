"""Slow, literal reference of `dual_memory_scan` (docs/math.md §8): the recurrence token by token.

One batch row at a time, in the order docs/math.md §8 states it. The memory's first layer is kept as the list J of
(key, coefficient) pairs it is defined by: writing token i appends (k_i, a). Inner gradients come from
torch.autograd.grad(create_graph=True) on the memory function at the chunk's anchor, so gradients of the whole
reference with respect to every input come from autograd as well. Heads are independent, so a sum over heads of
per-head losses gives every head its own gradient in one call. Fresh sequences only (no state); run it in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kernel(x: torch.Tensor, keys: torch.Tensor, kernel: str, scale, a2) -> torch.Tensor:
    """κ(x, key) per head: x (H, dh), keys (H, n, dh) -> (H, n)."""
    dots = torch.einsum("hd,hnd->hn", x, keys)
    if kernel == "exp":
        return torch.exp(scale[:, None] * (dots - 1.0))
    return dots + a2[:, None] * dots * dots


def _h(x: torch.Tensor, pairs: list, kernel: str, scale, a2) -> torch.Tensor:
    """h(x) = Σ_{(key, a) in J} a · κ(x, key) for one token of every head: x (H, dh) -> (H, hid)."""
    keys = torch.stack([key for key, _ in pairs], dim=1)  # (H, |J|, dh)
    coefs = torch.stack([a for _, a in pairs], dim=1)  # (H, |J|, hid)
    return torch.einsum("hn,hnk->hk", _kernel(x, keys, kernel, scale, a2), coefs)


def _read(w1: torch.Tensor, h: torch.Tensor, x: torch.Tensor, ln) -> torch.Tensor:
    """f = x + LN(W1 · gelu(h)) for one token of every head."""
    out = torch.einsum("hdk,hk->hd", w1, F.gelu(h))
    if ln is not None:
        out = F.layer_norm(out, (out.shape[-1],), eps=1e-5) * ln[0] + ln[1]
    return x + out


def reference_dual_memory_scan(q, k, v, eta, gamma, params, *, doc_start=None, chunk_size=64, loss="dot",
                               kernel="exp", a2=None):
    """y (B, T, H, dh) of `dual_memory_scan` for a fresh sequence (token 0 is a document start)."""
    batch, length, heads, _ = q.shape
    c = gamma.shape[-1]
    ln = (params["ln_weight"], params["ln_bias"]) if "ln_weight" in params else None
    scale = params.get("scale")
    if kernel == "poly2":
        a2 = torch.as_tensor(a2, dtype=q.dtype).expand(heads)
    persistent = list(zip(F.normalize(params["K0"], dim=-1, eps=1e-6).unbind(1), params["A0"].unbind(1)))
    if doc_start is None:
        doc_start = torch.zeros(batch, length, dtype=torch.bool)
    rows = []
    for b in range(batch):
        ys = []
        for t in range(length):
            if t == 0 or bool(doc_start[b, t]):
                w1, pairs, doc_begin = params["W1"], list(persistent), t
            if t % chunk_size == 0 or t == doc_begin:
                anchor_w1, anchor_pairs = w1, list(pairs)
            # U_t: the window's inner gradients at the anchor, as ∂ℓ/∂W1 and ∂ℓ/∂h (the coefficient a key gains).
            leaf_w1 = anchor_w1 if anchor_w1.requires_grad else anchor_w1.detach().requires_grad_()
            step_w1 = torch.zeros_like(w1)
            for j in range(c):
                i = t - j
                if i < doc_begin:
                    continue
                h_i = _h(k[b, i], anchor_pairs, kernel, scale, a2)
                h_leaf = h_i if h_i.requires_grad else h_i.detach().requires_grad_()
                f = _read(leaf_w1, h_leaf, k[b, i], ln)
                inner = -(f * v[b, i]).sum() if loss == "dot" else 0.5 * ((f - v[b, i]) ** 2).sum()
                delta, grad_w1 = torch.autograd.grad(inner, [h_leaf, leaf_w1], create_graph=True)
                weight = (eta[b, t] * gamma[b, t, :, j])[:, None]
                step_w1 = step_w1 + weight[..., None] * grad_w1
                pairs.append((k[b, i], -weight * delta))
            w1 = w1 - step_w1
            ys.append(_read(w1, _h(q[b, t], pairs, kernel, scale, a2), q[b, t], ln))
        rows.append(torch.stack(ys))
    return torch.stack(rows)
