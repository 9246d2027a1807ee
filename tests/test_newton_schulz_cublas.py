"""The cuBLAS Newton–Schulz (kernels/newton_schulz_cublas.py) against autograd through the plain PyTorch chain.

Its backward is written by hand (so that the operand precision holds in the backward's products too): checked in
float64 on CPU, outputs and gradients, for wide, tall, square and batched matrices, plus torch's gradcheck; its
bf16 chain within the precision's bound.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # importing atlas_train.kernels decorates the Triton kernels: see test_kernels.py

import pytest  # noqa: E402
import torch  # noqa: E402

from atlas_train.kernels.dispatch import PROBE_TOLERANCE, relative_error  # noqa: E402
from atlas_train.kernels.newton_schulz_cublas import newton_schulz  # noqa: E402
from atlas_train.ops.newton_schulz import newton_schulz as reference  # noqa: E402


@pytest.mark.parametrize("shape", [(3, 8, 24), (2, 24, 8), (4, 16, 16), (2, 3, 7, 5)])
@pytest.mark.parametrize("steps", [1, 5])
def test_matches_autograd_through_the_plain_chain_in_float64(shape, steps):
    gen = torch.Generator().manual_seed(sum(shape) + steps)
    s = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = newton_schulz(s, steps, "ieee")
    (got_grad,) = torch.autograd.grad(got, s, upstream)
    want = reference(s, steps)
    (want_grad,) = torch.autograd.grad(want, s, upstream)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    s = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: newton_schulz(t, 3, "ieee"), (s,))


def test_bf16_operands_stay_within_their_bound():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 16, 48, generator=gen, requires_grad=True)
    upstream = torch.randn(4, 16, 48, generator=gen)
    got = newton_schulz(s, 5, "bf16")
    (got_grad,) = torch.autograd.grad(got, s, upstream)
    assert got.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    want = reference(s64, 5)
    (want_grad,) = torch.autograd.grad(want, s64, upstream.double())
    errors = relative_error(got, want), relative_error(got_grad, want_grad)
    assert 1e-4 < min(errors) and max(errors) < PROBE_TOLERANCE["bf16"], errors  # rounded, and within the bound


def test_zero_steps_are_refused():
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.randn(1, 2, 3), 0, "ieee")
