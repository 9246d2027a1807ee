"""benchmarks/ns_rounding.py: its emulated rounding, its NS backward, and the findings the kernels' design rests on."""

import pytest
import torch

from atlas_train.ops.newton_schulz import newton_schulz as ns_reference
from benchmark_scripts import load_benchmark

ns_rounding = load_benchmark("ns_rounding")


def test_round_bits_is_round_to_nearest_even():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 100
    assert torch.equal(ns_rounding.round_bits(x, 7), x.bfloat16().float())  # torch rounds to nearest even
    tf32 = ns_rounding.round_bits(x, 10)
    assert not (tf32.view(torch.int32) & 0x1FFF).any()
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 11)
    assert ((tf32 - x).abs() <= ulp / 2).all()
    tie = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11])  # halfway between tf32 neighbours: to the even one
    assert ns_rounding.round_bits(tie, 10).tolist() == [1.0, 1 + 4 * 2**-11]


@pytest.mark.parametrize("form", ns_rounding.FORMS)
def test_without_rounding_every_form_is_newton_schulz_and_its_gradient(form):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 6, 20, generator=gen, dtype=torch.float64)
    upstream = torch.randn(3, 6, 20, generator=gen, dtype=torch.float64)
    leaf = s.clone().requires_grad_()
    y_ref = ns_reference(leaf, ns_rounding.STEPS)
    (ds_ref,) = torch.autograd.grad(y_ref, leaf, upstream)
    y, ds = ns_rounding.emulated_ns(s.float(), upstream.float(), lambda t: t, form)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ds.double(), ds_ref, rtol=1e-4, atol=1e-5)


def _errors(spectrum, form, shape=(8, 40, 200), operands="bf16"):
    gen = torch.Generator().manual_seed(0)
    s = ns_rounding.random_matrices(shape, spectrum, gen)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    leaf = s.clone().requires_grad_()
    y_ref = ns_reference(leaf, ns_rounding.STEPS)
    (ds_ref,) = torch.autograd.grad(y_ref, leaf, upstream)
    y, ds = ns_rounding.emulated_ns(s.float(), upstream.float(), ns_rounding.OPERANDS[operands], form)
    return ns_rounding.relative_error(y, y_ref.detach()), ns_rounding.relative_error(ds, ds_ref)


def test_truncated_tf32_operands_undo_the_rounded_gram_matrix_and_nearest_rounding_restores_it():
    """With operands truncated (Hopper's tf32 tl.dot) the rounded Gram matrix is worse than a float32 one (dS over
    the 1e-2 bound, as on the GPU); rounding every operand to nearest, as the kernels do, is better than both."""
    float32_a, rounded_a = (_errors(None, form, operands="tf32 truncated") for form in ("float32 A", "rounded A"))
    nearest = _errors(None, "rounded A", operands="tf32")
    assert rounded_a[1] > 1e-2 > float32_a[1] > 1.5 * nearest[1]
    assert rounded_a[0] > float32_a[0] > 1.5 * nearest[0]


def test_rounding_the_gram_matrix_once_is_the_more_accurate_bf16_form():
    """In bf16, one rounded Gram matrix beats a float32 one on Gaussian matrices (and passes the 5e-2 bound the
    float32 one fails), and storing X in bf16 is far worse once singular values decay."""
    old, new = _errors(None, "float32 A"), _errors(None, "rounded A")
    assert old[1] > 5e-2 > new[1]
    assert new[0] < 0.7 * old[0] and new[1] < 0.7 * old[1]
    assert _errors(1e-4, "bf16 chain")[0] > 5 * _errors(1e-4, "rounded A")[0]


def test_the_table_prints_a_row_per_shape_spectrum_and_precision(monkeypatch, capsys):
    monkeypatch.setattr(ns_rounding, "SHAPES", ((2, 8, 24),))
    ns_rounding.main([])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 3 * len(ns_rounding.OPERANDS) and all(f in lines[0] for f in ns_rounding.FORMS)


def test_scan_mode_reports_every_case_and_routes_matrices_as_the_gpu_does(monkeypatch):
    """At a tiny size (W1 8x32 stays on the kernel's form, W2 32x16 goes to cuBLAS's with the threshold at 8)."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "TRITON_MAX_SHORT_SIDE", 8)
    forms = []
    emulate = ns_rounding.emulated_ns

    def recording(s, upstream, operand, form):
        forms.append(form)
        return emulate(s, upstream, operand, form)

    monkeypatch.setattr(ns_rounding, "emulated_ns", recording)
    lines = ns_rounding.scan_table(batch=1, length=128, heads=1, dh=8)
    assert len(lines) == len(ns_rounding.SCAN_CASES)
    assert {"rounded A", "float32 A", "bf16 chain"} <= set(forms)
    errors = [float(line.split()[-1]) for line in lines]
    assert errors[0] < 1e-2 and all(e == e for e in errors)  # tf32 within its bound; no NaN
