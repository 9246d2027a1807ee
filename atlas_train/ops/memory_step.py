"""One token of the memory recurrence (docs/math.md §3.4/3.5 with T = 1) for inference: `memory_scan`'s decode path.

`memory_scan` on a single token goes through the chunk machinery (gate-product matrices, window-weight gathers, an
autograd function, a chunk schedule): Python and kernels spent on products over one token. This step computes the
same function, reading and writing the same public state, with only the arithmetic the token needs (a few dozen
matmuls per layer, mostly Newton–Schulz, and far fewer operators than the scan at T = 1):

* the Omega window is the c−1 cached keys plus the token's own key, all differentiated at one anchor (`params` when
  the token starts a document, where the cached keys weigh zero anyway);
* every data-dependent choice (document start at this token, the grid chunk closing after it) is a `torch.where`
  on device values, never a host branch on `pos`, so a step costs no device sync and can be captured in a CUDA
  graph. With update="chunk" the closing Muon step is therefore computed at every token and kept only where the
  chunk closes: one Newton–Schulz per token, the cost update="token" pays anyway.

No autograd function and no recomputation: the step is for no-grad decoding (`memory_scan` dispatches here only
then).
"""

from __future__ import annotations

import torch

from atlas_train.ops.memory_mlp import loss_gradient_factors, memory_forward
from atlas_train.ops.newton_schulz import newton_schulz
from atlas_train.ops.precision import compute_dtype, is_half
from atlas_train.ops.scan_chunks import ScanOptions, check_state


def memory_step(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start, state, chunk_size, ns_steps, update,
                loss):
    """`memory_scan` for T = 1 with a `state` (inputs already validated): returns (y (B,1,H,dv), new state)."""
    out_dtype = zq.dtype
    dtype = compute_dtype(zq.dtype)
    weight_names = ("W1", "W2", "W3") if "W3" in params else ("W1", "W2")
    opts = ScanOptions(update, loss, ns_steps, chunk_size, gamma.shape[-1], v.shape[-1], weight_names,
                       is_half(zq.dtype))
    check_state(state, opts, zk.shape[0], zk.shape[2], zk.shape[-1])
    zq, zk, v, alpha, eta, theta, gamma = (t[:, 0].to(dtype) for t in (zq, zk, v, alpha, eta, theta, gamma))
    initial = {w: params[w].to(dtype).unsqueeze(0) for w in weight_names}  # (1, H, out, in)
    ln = {k: params[k].to(dtype) for k in ("ln_weight", "ln_bias")} if "ln_weight" in params else None
    reset = None if doc_start is None else doc_start[:, 0]  # (B,) bool: the token starts a document
    pos = state["pos"]
    closes = (pos + 1) % chunk_size == 0  # 0-dim bool on the state's device: the grid chunk ends at this token

    def restart(continuing: torch.Tensor, at_reset) -> torch.Tensor:
        """Per row: `at_reset` where the token starts a document, else `continuing` ((B, H, ...) tensors)."""
        if reset is None:
            return continuing
        return torch.where(reset.view(-1, *(1,) * (continuing.dim() - 1)), at_reset, continuing)

    anchor = {w: restart(state[f"anchor.{w}"].to(dtype), initial[w]) for w in weight_names}
    update_sum, new = _window_gradients(state, zk, v, gamma, anchor, ln, reset, opts, dtype)
    if update == "token":
        fast = {}
        for w in weight_names:
            momentum = restart(theta[..., None, None] * state[f"momentum.{w}"].to(dtype), 0.0) + update_sum[w]
            previous = restart(state[f"fast.{w}"].to(dtype), initial[w])
            step = newton_schulz(momentum, ns_steps, opts.half_inputs)
            fast[w] = alpha[..., None, None] * previous - eta[..., None, None] * step
            new.update({f"fast.{w}": fast[w], f"momentum.{w}": momentum,
                        f"anchor.{w}": torch.where(closes, fast[w], anchor[w])})
        y = memory_forward(fast, zq[:, :, None], opts.dv, ln)
    else:
        y = memory_forward(anchor, zq[:, :, None], opts.dv, ln)
        gate_sum = restart(state["gate_sum"].to(dtype), 0.0) + torch.stack([alpha, theta, eta], dim=-1)
        count = restart(state["count"], 0) + 1
        mean = gate_sum / count.to(dtype)[:, None, None]  # the open chunk's gate means, used only if it closes
        for w in weight_names:
            grad_sum = restart(state[f"grad_sum.{w}"].to(dtype), 0.0) + update_sum[w]
            momentum = restart(state[f"momentum.{w}"].to(dtype), 0.0)
            closed_momentum = mean[..., 1, None, None] * momentum + grad_sum
            stepped = (mean[..., 0, None, None] * anchor[w]
                       - mean[..., 2, None, None] * newton_schulz(closed_momentum, ns_steps, opts.half_inputs))
            new.update({f"anchor.{w}": torch.where(closes, stepped, anchor[w]),
                        f"momentum.{w}": torch.where(closes, closed_momentum, momentum),
                        f"grad_sum.{w}": torch.where(closes, 0.0, grad_sum)})
        new["gate_sum"] = torch.where(closes, 0.0, gate_sum)
        new["count"] = torch.where(closes, 0, count)
    new["pos"] = pos + 1
    return y.transpose(1, 2).to(out_dtype), new


def _window_gradients(state, zk, v, gamma, anchor, ln, reset, opts: ScanOptions, dtype):
    """U = Σ_j gamma[j] ∇ℓ(anchor; key t−j) over the window's keys in the token's document, per weight, and the
    next window state (the oldest key dropped, this token's appended)."""
    keys_z = torch.cat([state["window_zk"].to(dtype), zk[:, :, None]], dim=2)  # (B, H, c, D), oldest first
    keys_v = torch.cat([state["window_v"].to(dtype), v[:, :, None]], dim=2)
    valid = state["window_valid"] if reset is None else state["window_valid"] & ~reset[:, None]
    valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)  # (B, c): key in the token's document
    weights = gamma.flip(-1) * valid[:, None, :].to(dtype)  # key k is token t − (c−1−k)
    factors = loss_gradient_factors(anchor, keys_z, keys_v, ln, opts.loss)
    update_sum = {w: (left * weights[..., None]).transpose(-1, -2) @ right for w, (left, right) in factors.items()}
    window = {"window_zk": keys_z[:, :, 1:], "window_v": keys_v[:, :, 1:], "window_valid": valid[:, 1:]}
    return update_sum, window
