"""TokenWeights (the token update's per-token fast weights, memory_mlp) against the obviously-right form: every
token's matrix W_t = a_t·carried + b_t·initial − Σ_u mix[t, u]·U_u built explicitly, then W_t x_t and W_{L-1}.
Outputs and the gradients of every input, in float64; the read and the last matrix are one autograd node whose
backward is hand-written (`_TokenReads`)."""

import pytest
import torch

from atlas_train.ops.memory_mlp import TokenWeights


def _inputs(seed, batch=2, heads=3, length=5, n_out=4, n_in=6):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    mix = torch.tril(torch.rand(batch, heads, length, length, generator=gen, dtype=torch.float64)).requires_grad_()
    return dict(carried=rand(batch, heads, n_out, n_in), carried_scale=rand(batch, heads, length),
                initial=rand(1, heads, n_out, n_in), initial_scale=rand(batch, heads, length),
                updates=rand(batch, heads, length, n_out, n_in), mix=mix), rand(batch, heads, length, n_in)


def _explicit(parts, x):
    weights = (parts["carried_scale"][..., None, None] * parts["carried"][:, :, None]
               + parts["initial_scale"][..., None, None] * parts["initial"][:, :, None]
               - torch.einsum("bhtu,bhuoi->bhtoi", parts["mix"], parts["updates"]))
    return (weights @ x.unsqueeze(-1)).squeeze(-1), weights[:, :, -1]


@pytest.mark.parametrize("use_last", [True, False])
def test_reads_and_last_matrix_match_the_explicit_per_token_weights(use_last):
    parts, x = _inputs(0)
    gen = torch.Generator().manual_seed(1)
    leaves = [*parts.values(), x]
    results = []
    for build in ("token_weights", "explicit"):
        if build == "token_weights":
            weights = TokenWeights(**parts)
            read = weights.apply(x)
            last = weights.last()
        else:
            read, last = _explicit(parts, x)
        outs = [read, last] if use_last else [read]
        gen.manual_seed(1)
        upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, upstream)
        results.append([read.detach(), last.detach(), *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_last_matrix_before_any_read_is_refused():
    parts, _ = _inputs(2)
    with pytest.raises(RuntimeError, match="needs apply"):
        TokenWeights(**parts).last()
