"""The kernels' torch custom ops against their fake implementations (what torch.compile traces them with): outputs
of the same shapes, strides and dtypes, on transposed (non-contiguous) inputs too, where a fake that copies an
input's layout would promise strides the kernel does not write, and a compiled graph then fails its stride checks.
`torch.library.opcheck` runs each op for real (the CPU interpreter) and under fake tensors and compares."""

from __future__ import annotations

import pytest
import torch

import atlas_train.kernels.memory_mlp_kernel  # noqa: F401 — registers the ops checked here
import atlas_train.kernels.muon_step_kernel  # noqa: F401
import atlas_train.kernels.newton_schulz_kernel  # noqa: F401
import atlas_train.kernels.token_momenta_kernel  # noqa: F401

OPS = torch.ops.atlas_train


def transposed(*shape) -> torch.Tensor:
    """A random float64 tensor of `shape` laid out with its last two dims swapped (not contiguous)."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).transpose(-1, -2)


def check(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_newton_schulz_ops(layout):
    s = transposed(2, 6, 4) if layout == "transposed" else torch.randn(2, 6, 4, dtype=torch.float64)
    check(OPS.newton_schulz.default, (s, 2, "ieee"))
    out, iterates = OPS.newton_schulz_saving.default(s, 2, "ieee")
    check(OPS.newton_schulz_saving.default, (s, 2, "ieee"))
    check(OPS.newton_schulz_backward.default, (s, iterates, torch.randn_like(out), 2, "ieee"))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_memory_mlp_ops(layout):
    heads, tokens, dim, dv, hidden = 2, 5, 8, 4, 16
    if layout == "transposed":  # z as the scan hands it over from a (B, T, H, D) layout: tokens not outermost
        z = torch.randn(1, tokens, heads, dim, dtype=torch.float64).transpose(1, 2)
    else:
        z = torch.randn(1, heads, tokens, dim, dtype=torch.float64)
    v = torch.randn(1, heads, tokens, dv, dtype=torch.float64)
    w1 = torch.randn(1, heads, dv, hidden, dtype=torch.float64) / 4
    w2 = torch.randn(1, heads, hidden, dim, dtype=torch.float64) / 3
    ln = (1 + torch.randn(heads, dv, dtype=torch.float64) / 10, torch.randn(heads, dv, dtype=torch.float64) / 10)
    check(OPS.memory_mlp_pass.default, (z, v, w1, w2, *ln, "l2", True, "ieee"))
    upstream = [torch.randn(1, heads, tokens, width, dtype=torch.float64) for width in (dv, dv, hidden, hidden)]
    check(OPS.memory_mlp_pass_backward.default, (z, v, w1, w2, *ln, *upstream, "l2", True, "ieee"))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_token_momenta_ops(layout):
    batch, tokens, keys, rows, cols = 2, 3, 5, 4, 6
    left = torch.randn(batch, keys, rows, dtype=torch.float64)
    right = transposed(batch, keys, cols) if layout == "transposed" else torch.randn(batch, keys, cols,
                                                                                        dtype=torch.float64)
    mix, scale = torch.randn(batch, tokens, keys, dtype=torch.float64), torch.rand(batch, tokens, dtype=torch.float64)
    prev = transposed(batch, rows, cols) if layout == "transposed" else torch.randn(batch, rows, cols,
                                                                                     dtype=torch.float64)
    check(OPS.token_momenta.default, (mix, left, right, scale, prev, "ieee"))
    grad = torch.randn(batch, tokens, rows, cols, dtype=torch.float64)
    check(OPS.token_momenta_backward.default, (grad, mix, left, right, scale, prev, "ieee"))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("prior", [False, True])
def test_muon_step_ops(layout, prior):
    chains, keys, rows, cols = 2, 5, 6, 4  # tall: the kernel reads it through swapped strides
    weights = (lambda: transposed(chains, rows, cols)) if layout == "transposed" else (
        lambda: torch.randn(chains, rows, cols, dtype=torch.float64))
    coef = torch.randn(chains, keys, dtype=torch.float64)
    left, right = torch.randn(chains, keys, rows, dtype=torch.float64), transposed(chains, keys, cols)
    gates = torch.rand(chains, 3, dtype=torch.float64)
    args = (coef, left, right, weights() if prior else None, weights(), weights(), gates, 2, "ieee", "ieee")
    check(OPS.muon_step.default, args)
    check(OPS.muon_step_saving.default, args)
    mom_out, _, x, iterates = OPS.muon_step_saving.default(*args)
    check(OPS.muon_step_backward.default, (coef, left, right, args[4], args[5], gates, mom_out, x, iterates,
                                           weights() if prior else None, weights(), 2, "ieee", "ieee"))
