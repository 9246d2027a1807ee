"""The memory recurrence written the way docs/math.md §3 states it: the reference to read before the rest.

`memory_scan_naive` computes what `memory_scan` computes, the obvious way: one batch row at a time, token by token
(update="token", §3.4) or chunk by chunk (update="chunk", §3.5), in the order the math writes the
recurrence, every fast weight P, momentum S and window gradient U spelled out. The inner gradients ∇_P ℓ come from
torch.autograd.grad with create_graph=True, so autograd differentiates the whole recurrence as well: the outer
gradients need no code of their own. Heads are independent, so one gradient of the heads' summed losses gives every
head its own.

It is slow (Python loops over rows, tokens and window keys) and meant for small checks in float64: the tests hold
`memory_scan` (chunked_scan.py and memory_step.py, with or without fast paths) to it, outputs and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atlas_train.ops.memory_scan import check_inputs

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315  # §3.7
NS_EPS = 1e-7
LN_EPS = 1e-5  # §3.1


def memory_scan_naive(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start=None, state=None, chunk_size=64,
                      ns_steps=5, update="token", loss="l2"):
    """y (B, T, H, dv) of `memory_scan` called with the same arguments (see there), computed as docs/math.md states it.

    For a fresh sequence only: `state` must be None (token 0 starts a document), and no state is returned. The
    arithmetic is in the inputs' dtype (`memory_scan` computes in float32 or float64)."""
    check_inputs(zq, zk, v, alpha, eta, theta, gamma, params, doc_start, chunk_size, ns_steps, update, loss)
    if state is not None:
        raise ValueError("memory_scan_naive computes a fresh sequence only: state must be None")
    batch, length = zq.shape[:2]
    dv, c = v.shape[-1], gamma.shape[-1]
    names = [w for w in ("W1", "W2", "W3") if w in params]
    ln = (params["ln_weight"], params["ln_bias"]) if "ln_weight" in params else None
    if doc_start is None:
        doc_start = torch.zeros(batch, length, dtype=torch.bool, device=zq.device)

    def window_loss(p: dict, b: int, tokens, doc_begin: int) -> torch.Tensor:
        """Σ over `tokens` t of Σ_{j < c, t−j ≥ doc_begin} gamma[t, j] · ℓ_{t−j}(p): the Omega window (§3.4)."""
        total = 0.0
        for t in tokens:
            for j in range(c):
                if t - j >= doc_begin:
                    total = total + gamma[b, t, :, j] * inner_loss(p, zk[b, t - j], v[b, t - j], ln, loss)
        return total.sum()

    rows = []
    for b in range(batch):
        starts = [t == 0 or bool(doc_start[b, t]) for t in range(length)]
        y = [None] * length
        if update == "token":  # §3.4
            for t in range(length):
                if starts[t]:  # §3.6: the weights return to params, the momentum to zero, the window restarts
                    P = {w: params[w] for w in names}
                    S = {w: torch.zeros_like(params[w]) for w in names}
                    doc_begin = t
                if t % chunk_size == 0 or starts[t]:  # §3.3: a chunk starts, its gradients are taken here
                    anchor = P
                U = gradient_at(anchor, window_loss, b, [t], doc_begin)
                a, e, th = (g[b, t][:, None, None] for g in (alpha, eta, theta))
                S = {w: th * S[w] + U[w] for w in names}
                P = {w: a * P[w] - e * newton_schulz_per_head(S[w], ns_steps) for w in names}
                y[t] = memory(P, zq[b, t], ln, dv)
        else:  # §3.5: the chunks are cut at the grid and at document starts
            bounds = [t for t in range(length) if t % chunk_size == 0 or starts[t]] + [length]
            for t0, t1 in zip(bounds[:-1], bounds[1:]):
                if starts[t0]:
                    P = {w: params[w] for w in names}
                    S = {w: torch.zeros_like(params[w]) for w in names}
                    doc_begin = t0
                anchor = P
                for t in range(t0, t1):
                    y[t] = memory(anchor, zq[b, t], ln, dv)
                U = gradient_at(anchor, window_loss, b, range(t0, t1), doc_begin)
                a, e, th = (g[b, t0:t1].mean(0)[:, None, None] for g in (alpha, eta, theta))  # the gates' means
                S = {w: th * S[w] + U[w] for w in names}
                P = {w: a * anchor[w] - e * newton_schulz_per_head(S[w], ns_steps) for w in names}
        rows.append(torch.stack(y))
    return torch.stack(rows)


def memory(p: dict, z: torch.Tensor, ln, dv: int) -> torch.Tensor:
    """f(P; z) = z[:dv] + LN(W1 · (gelu(W2 z) [⊙ W3 z])) (§3.1) for one token of every head: p[w] (H, out, in),
    z (H, D) -> (H, dv)."""
    h = F.gelu(torch.einsum("hoi,hi->ho", p["W2"], z))
    if "W3" in p:
        h = h * torch.einsum("hoi,hi->ho", p["W3"], z)
    o = torch.einsum("hoi,hi->ho", p["W1"], h)
    if ln is not None:
        o = F.layer_norm(o, (dv,), eps=LN_EPS) * ln[0] + ln[1]
    return z[:, :dv] + o


def inner_loss(p: dict, z: torch.Tensor, v: torch.Tensor, ln, loss: str) -> torch.Tensor:
    """ℓ(P; z, v) per head (H,) (§3.2): ½‖f(P; z) − v‖² ("l2") or −⟨f(P; z), v⟩ ("dot")."""
    f = memory(p, z, ln, v.shape[-1])
    return 0.5 * ((f - v) ** 2).sum(-1) if loss == "l2" else -(f * v).sum(-1)


def gradient_at(anchor: dict, objective, *args) -> dict:
    """∇_P objective(P, *args) at P = anchor, keeping the graph so that the outer gradients flow through it."""
    names = list(anchor)
    leaves = {w: anchor[w] if anchor[w].requires_grad else anchor[w].detach().requires_grad_() for w in names}
    grads = torch.autograd.grad(objective(leaves, *args), [leaves[w] for w in names], create_graph=True)
    return dict(zip(names, grads))


def newton_schulz_naive(s: torch.Tensor, steps: int) -> torch.Tensor:
    """NS(s) of one matrix (rows, cols) as §3.7 states it: normalise, iterate on the wide orientation."""
    if steps == 0:
        return s
    x = s / (torch.sqrt((s * s).sum()) + NS_EPS)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        b = NS_B * a + NS_C * a @ a
        x = NS_A * x + b @ x
    return x.T if tall else x


def newton_schulz_per_head(s: torch.Tensor, steps: int) -> torch.Tensor:
    """`newton_schulz_naive` of each head's matrix in s (H, rows, cols)."""
    return torch.stack([newton_schulz_naive(m, steps) for m in s])
