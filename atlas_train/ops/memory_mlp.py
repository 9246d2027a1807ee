"""The memory network f(P; z) of docs/math.md §3.1 and the closed form of its inner-loss gradient.

Layout used throughout `ops`: tokens are (B, H, L, features). A fast-weight matrix is (B|1, H, out, in) when all
tokens share it (an anchor, `params`); the token update's reads, where every token has its own, use TokenWeights.
The inner gradient of one key is a sum of outer products, one per weight matrix: returning the two factors instead
of the matrix is what lets the scan form every window gradient of a chunk as one batched matmul.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from atlas_train.ops import outer_sums
from atlas_train.ops.registry import fast_path

LN_EPS = 1e-5
WEIGHT_NAMES = ("W1", "W2", "W3")  # W1 (dv, hid), W2 (hid, D), W3 (hid, D): the fast (inner-loop) weights


class _TokenReads(torch.autograd.Function):
    """(Σ_u mix[t, u] U_u x_t for every token t, Σ_u mix[L−1, u] U_u) as one autograd node: TokenWeights' reads and
    its last matrix, so that U's gradient from both is one weighted sum of outer products,

        dU_u = Σ_t mix[t, u] dread_t ⊗ x_t + mix[L−1, u]·dlast,

    the token momenta's form (`outer_sums.weighted_outer_sums`: on a GPU one kernel writing dU once). Autograd makes
    the two parts separately, adds them and copies the sum out of the transposed layout its GEMM leaves it in: four
    passes over a tensor of the momenta's size."""

    @staticmethod
    def forward(ctx, updates, mix, x, half_inputs):
        batch, heads, length, out, inp = updates.shape
        flat = updates.reshape(batch, heads, length * out, inp)
        every = x @ flat.transpose(-1, -2)  # [t, (u, o)] = U_u x_t
        read = (mix.unsqueeze(-2) @ every.view(batch, heads, length, length, out)).squeeze(-2)
        last = (mix[:, :, -1:] @ updates.reshape(batch, heads, length, out * inp)).view(batch, heads, out, inp)
        ctx.save_for_backward(updates, mix, x, every)
        ctx.half_inputs = half_inputs
        return read, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_read, d_last):
        updates, mix, x, every = ctx.saved_tensors
        batch, heads, length, out, inp = updates.shape
        d_updates = outer_sums.weighted_outer_sums(mix.transpose(-1, -2), d_read, x, mix[:, :, -1], d_last,
                                                   ctx.half_inputs)
        d_every = (mix.unsqueeze(-1) * d_read.unsqueeze(-2)).view(batch, heads, length, length * out)
        d_x = d_every @ updates.reshape(batch, heads, length * out, inp)
        d_mix = (d_read.unsqueeze(-2) @ every.view(batch, heads, length, length, out).transpose(-1, -2)).squeeze(-2)
        d_mix[:, :, -1] += (updates.reshape(batch, heads, length, out * inp)
                            @ d_last.reshape(batch, heads, out * inp, 1)).squeeze(-1)
        return d_updates, d_mix, d_x, None


@dataclasses.dataclass(eq=False)
class TokenWeights:
    """One weight matrix per token of a chunk, W_t = a_t·carried + b_t·initial − Σ_u mix[t, u]·updates[u] (the
    token update, §3.4), kept as that combination instead of a (B, H, L, out, in) tensor.

    Why: reads need W_t x_t only. Forming every token's matrix costs a GEMM writing L·out·in values per head plus
    elementwise passes over them, and the same again in backward; applying the combination costs one GEMM writing
    L·L·out values (U_u x_t for all u, t) and a batched mix, which is less traffic whenever L < in (faster on the
    GPU, and less memory; benchmarks/RESULTS.md keeps the figures). The read and the last token's matrix are one
    autograd node (`_TokenReads`), so `last()` is asked for after `apply()`.
    """

    carried: torch.Tensor  # (B, H, out, in): the weights before the chunk
    carried_scale: torch.Tensor  # (B, H, L): a_t
    initial: torch.Tensor  # (1, H, out, in): `params`, which a document start restores
    initial_scale: torch.Tensor | None  # (B, H, L): b_t; None where it is zero (no document start in the chunk)
    updates: torch.Tensor  # (B, H, L, out, in): U_u
    mix: torch.Tensor  # (B, H, L, L): mix[t, u], zero for u > t
    half_inputs: bool = False  # the model runs in bf16/fp16 (the precision of U's gradient on a GPU)
    _last_mixed: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """W_t x_t for tokens x (B, H, L, in) → (B, H, L, out)."""
        mixed, self._last_mixed = _TokenReads.apply(self.updates, self.mix, x, self.half_inputs)
        out = self.carried_scale[..., None] * (x @ self.carried.transpose(-1, -2)) - mixed
        if self.initial_scale is None:
            return out
        return out + self.initial_scale[..., None] * (x @ self.initial.transpose(-1, -2))

    def last(self) -> torch.Tensor:
        """The last token's matrix (B, H, out, in): the weights the chunk hands on (after `apply`, see the class)."""
        if self._last_mixed is None:
            raise RuntimeError("TokenWeights.last() needs apply() first: the two are one autograd node")
        out = self.carried_scale[..., -1, None, None] * self.carried - self._last_mixed
        if self.initial_scale is None:
            return out
        return out + self.initial_scale[..., -1, None, None] * self.initial


def apply_linear(w: torch.Tensor | TokenWeights, x: torch.Tensor) -> torch.Tensor:
    """w·x for tokens x (B, H, L, in) with shared (.., H, out, in) weights or the token update's TokenWeights."""
    if isinstance(w, TokenWeights):
        return w.apply(x)
    return x @ w.transpose(-1, -2)


def _ln_affine(ln: dict | None):
    """(weight, bias) of the memory LayerNorm shaped (1, H, 1, dv) for broadcasting, or None without LN."""
    if ln is None:
        return None
    return ln["ln_weight"][None, :, None, :], ln["ln_bias"][None, :, None, :]


def _fast_pass(weights: dict, z: torch.Tensor, ln: dict | None, v: torch.Tensor | None = None,
               loss: str | None = None):
    """The registered fast token pass on CUDA with shared weights (where it takes the pass), else None."""
    if not z.is_cuda or any(isinstance(w, TokenWeights) for w in weights.values()):
        return None
    return fast_path("memory_mlp_pass", weights, z, ln, v=v, loss=loss)


def memory_forward(weights: dict, z: torch.Tensor, dv: int, ln: dict | None) -> torch.Tensor:
    """f(P; z) = z[:dv] + LN(W1 · (gelu(W2 z) [⊙ W3 z])) for tokens z (B, H, L, D)."""
    fast = _fast_pass(weights, z, ln)
    if fast is not None:
        return fast
    hidden = F.gelu(apply_linear(weights["W2"], z))
    if "W3" in weights:
        hidden = hidden * apply_linear(weights["W3"], z)
    out = apply_linear(weights["W1"], hidden)
    affine = _ln_affine(ln)
    if affine is not None:
        out = F.layer_norm(out, (dv,), eps=LN_EPS) * affine[0] + affine[1]
    return z[..., :dv] + out


def gelu_gradient(grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """grad · GELU'(u) for the exact GELU u·Φ(u), i.e. grad · (Φ(u) + u·φ(u)), as one operator: aten's gelu_backward,
    which autograd differentiates again (the scans' backward does). Spelled out, Φ(u) + u·φ(u) is eight passes over
    u, and the scans are bound by the bytes they move."""
    return torch.ops.aten.gelu_backward(grad, u)


def loss_gradient_factors(weights: dict, z: torch.Tensor, v: torch.Tensor, ln: dict | None, loss: str) -> dict:
    """∇_P ℓ(P; z, v) for each key, as {name: (left, right)} with ∇W = left ⊗ right (out ⊗ in), per token.

    Hand-derived backward of `memory_forward` for one token (e = ∂ℓ/∂f, then LN, W1, GELU (and gate), W2/W3);
    the tests check it, through the whole scan, against autograd on `memory_forward`.
    """
    fast = _fast_pass(weights, z, ln, v, loss)
    if fast is not None:
        _, g_out, hidden, g_pre = fast
        return {"W1": (g_out, hidden), "W2": (g_pre, z)}
    dv = v.shape[-1]
    pre = apply_linear(weights["W2"], z)
    act = F.gelu(pre)
    gated = "W3" in weights
    gate = apply_linear(weights["W3"], z) if gated else None
    hidden = act * gate if gated else act
    out = apply_linear(weights["W1"], hidden)
    affine = _ln_affine(ln)
    if affine is not None:
        centred = out - out.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)
        normed = centred * rstd
        f = z[..., :dv] + normed * affine[0] + affine[1]
    else:
        f = z[..., :dv] + out
    err = f - v if loss == "l2" else -v
    if affine is not None:
        g_normed = err * affine[0]
        g_out = rstd * (g_normed - g_normed.mean(-1, keepdim=True)
                        - normed * (g_normed * normed).mean(-1, keepdim=True))
    else:
        g_out = err
    g_hidden = apply_linear(weights["W1"].transpose(-1, -2), g_out)
    factors = {"W1": (g_out, hidden)}
    if gated:
        factors["W3"] = (g_hidden * act, z)
        g_hidden = g_hidden * gate
    factors["W2"] = (gelu_gradient(g_hidden, pre), z)
    return factors
