"""gated_sum (the chunk update's momentum and weight step) against the plain expression, outputs and gradients of
every input in float64, with the gates per chain or shared over the batch."""

from __future__ import annotations

import pytest
import torch

from atlas_train.ops.gated_sum import gated_sum


@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("gate_batch", [3, 1])
def test_gated_sum_matches_the_plain_expression(with_b, gate_batch):
    gen = torch.Generator().manual_seed(gate_batch + 2 * with_b)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    a, x, y = leaf(gate_batch, 2, 1, 1), leaf(3, 2, 4, 5), leaf(3, 2, 4, 5)
    b = leaf(gate_batch, 2, 1, 1) if with_b else None
    leaves = [t for t in (a, x, y, b) if t is not None]
    got = gated_sum(a, x, y, b)
    want = a * x + (y if b is None else b * y)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    upstream = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
        assert g_got.shape == g_want.shape
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: gated_sum(t[0], t[1], t[2], t[3] if with_b else None), leaves)
