"""Slow, literal reference of ATLAS_SPEC.md section 3 for the memory_scan tests.

Token by token (spec 3.4) or chunk by chunk (spec 3.5), one batch row at a time, in the order the spec states the
recurrence. Inner gradients come from torch.autograd.grad(create_graph=True) on the memory function, so gradients of
the whole reference with respect to every input come from autograd as well. Heads are independent, so a sum over
heads of per-head losses gives every head its own gradient in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def newton_schulz_one(s: torch.Tensor, steps: int) -> torch.Tensor:
    """Spec 3.7 for a single matrix."""
    if steps == 0:
        return s
    x = s / (torch.sqrt((s * s).sum()) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        b = NS_B * a + NS_C * a @ a
        x = NS_A * x + b @ x
    return x.T if tall else x


def newton_schulz_heads(s: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.stack([newton_schulz_one(m, steps) for m in s])


def memory_f(p: dict, z: torch.Tensor, ln, dv: int) -> torch.Tensor:
    """f(P; z) for one token of every head: p[w] (H, out, in), z (H, D) -> (H, dv)."""
    h = F.gelu(torch.einsum("hoi,hi->ho", p["W2"], z))
    if "W3" in p:
        h = h * torch.einsum("hoi,hi->ho", p["W3"], z)
    o = torch.einsum("hoi,hi->ho", p["W1"], h)
    if ln is not None:
        o = F.layer_norm(o, (dv,), eps=1e-5) * ln[0] + ln[1]
    return z[:, :dv] + o


def inner_loss(p, z, v, ln, loss):
    """ℓ per head (H,)."""
    f = memory_f(p, z, ln, v.shape[-1])
    return 0.5 * ((f - v) ** 2).sum(-1) if loss == "l2" else -(f * v).sum(-1)


def _grad_at(anchor: dict, objective) -> dict:
    """∇ of objective(anchor) w.r.t. the anchor weights, keeping the graph for outer gradients."""
    names = list(anchor)
    leaves = {w: anchor[w] if anchor[w].requires_grad else anchor[w].detach().requires_grad_() for w in names}
    grads = torch.autograd.grad(objective(leaves), [leaves[w] for w in names], create_graph=True)
    return dict(zip(names, grads))


def reference_memory_scan(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start=None, chunk_size=64,
                          ns_steps=5, update="token", loss="l2"):
    """y (B, T, H, dv) for a fresh sequence (no state): token 0 is a document start."""
    batch, length = zq.shape[:2]
    c = gamma.shape[-1]
    weights = [w for w in ("W1", "W2", "W3") if w in params]
    ln = (params["ln_weight"], params["ln_bias"]) if "ln_weight" in params else None
    if doc_start is None:
        doc_start = torch.zeros(batch, length, dtype=torch.bool)
    rows = []
    for b in range(batch):
        starts = [t == 0 or bool(doc_start[b, t]) for t in range(length)]

        def window_objective(p, tokens, doc_begin):
            total = 0.0
            for t in tokens:
                for j in range(c):
                    if t - j >= doc_begin:
                        total = total + gamma[b, t, :, j] * inner_loss(p, zk[b, t - j], v[b, t - j], ln, loss)
            return total.sum()

        ys = [None] * length
        if update == "token":
            for t in range(length):
                if starts[t]:
                    fast = {w: params[w] for w in weights}
                    mom = {w: torch.zeros_like(params[w]) for w in weights}
                    doc_begin = t
                if t % chunk_size == 0 or starts[t]:
                    anchor = fast
                u = _grad_at(anchor, lambda p: window_objective(p, [t], doc_begin))
                a, e, th = (g[b, t][:, None, None] for g in (alpha, eta, theta))
                mom = {w: th * mom[w] + u[w] for w in weights}
                fast = {w: a * fast[w] - e * newton_schulz_heads(mom[w], ns_steps) for w in weights}
                ys[t] = memory_f(fast, zq[b, t], ln, v.shape[-1])
        else:
            bounds = [t for t in range(length) if t % chunk_size == 0 or starts[t]] + [length]
            for t0, t1 in zip(bounds[:-1], bounds[1:]):
                if starts[t0]:
                    fast = {w: params[w] for w in weights}
                    mom = {w: torch.zeros_like(params[w]) for w in weights}
                    doc_begin = t0
                anchor = fast
                for t in range(t0, t1):
                    ys[t] = memory_f(anchor, zq[b, t], ln, v.shape[-1])
                u = _grad_at(anchor, lambda p: window_objective(p, range(t0, t1), doc_begin))
                a, e, th = (g[b, t0:t1].mean(0)[:, None, None] for g in (alpha, eta, theta))
                mom = {w: th * mom[w] + u[w] for w in weights}
                fast = {w: a * anchor[w] - e * newton_schulz_heads(mom[w], ns_steps) for w in weights}
        rows.append(torch.stack(ys))
    return torch.stack(rows)
