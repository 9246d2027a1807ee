"""The dual attention kernel (kernels/dual_attention_kernel.py) against the PyTorch pass of atlas_train.ops, under the
Triton CPU interpreter in float64 and float32 (the interpreter rounds bf16 products wrongly): one pass alone
(outputs and every input gradient, with tiles small enough that every loop runs over several blocks), the whole
dual scan with the kernel standing in for the PyTorch pass, and the first-use probe.

tests/conftest.py sets TRITON_INTERPRET before anything imports Triton, so the kernels run in its CPU interpreter.
"""


import pytest
import torch

import atlas_train.kernels.dispatch as dispatch
import atlas_train.kernels.dual_attention_kernel as kernel
from atlas_train.ops import dual_attention, dual_memory_scan
from benchmark_scripts import load_benchmark

SMALL = {"points": 16, "keys": 16, "values": 16}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [(2, 2, 37, 45, 5, 21), (1, 1, 20, 70, 8, 16)])  # odd widths; keys > points
def test_pass_and_its_gradients_match_the_pytorch_pass(sizes, dtype, tolerance, monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK", SMALL)
    inputs, grad = kernel.random_pass(*sizes, device="cpu", dtype=dtype)
    got = kernel.pass_results(kernel.implementation("ieee"), inputs, grad)
    want = kernel.pass_results(dual_attention.TORCH, inputs, grad)
    for name, g, w in zip(("out", "dx", "dk", "dv", "dtheta"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype, name
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_no_limit_and_no_value_gradient(monkeypatch):
    """lim None (the pull that carries gradients to a state's coefficients) and need_v False (the anchor passes' point
    gradients)."""
    monkeypatch.setattr(kernel, "BLOCK", SMALL)
    inputs, grad = kernel.random_pass(1, 2, 19, 33, 4, 6, device="cpu", dtype=torch.float64)
    inputs["lim"] = None
    impl = kernel.implementation("ieee")
    torch.testing.assert_close(impl.forward(**inputs), dual_attention.TORCH.forward(**inputs), rtol=1e-11, atol=1e-12)
    got = impl.backward(**inputs, grad_out=grad, need_v=False)
    want = dual_attention.TORCH.backward(**inputs, grad_out=grad, need_v=False)
    assert got[2] is None and want[2] is None
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:]):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


def test_empty_points_or_keys_launch_nothing():
    inputs, grad = kernel.random_pass(1, 2, 5, 6, 4, 3, device="cpu", dtype=torch.float64)
    impl = kernel.implementation("ieee")
    no_keys = {**inputs, "k": inputs["k"][:, :, :0], "v": inputs["v"][:, :, :0], "k_doc": inputs["k_doc"][:, :0],
               "lim": None}
    assert impl.forward(**no_keys).abs().sum() == 0
    dx, dk, dv, dtheta = impl.backward(**no_keys, grad_out=grad)
    assert dk.shape == (1, 2, 0, 4) and dx.abs().sum() == dtheta.abs().sum() == 0
    no_points = {**inputs, "x": inputs["x"][:, :, :0], "x_doc": inputs["x_doc"][:, :0], "lim": None}
    assert impl.forward(**no_points).shape == (1, 2, 0, 3)


def test_refusals():
    inputs, _ = kernel.random_pass(1, 1, 4, 4, 4, 4, device="cpu", dtype=torch.float64)
    assert "exp kernel only" in kernel.dual_attention_unsupported(inputs["x"], "poly2", "ieee")
    assert "dtype" in kernel.dual_attention_unsupported(inputs["x"].bfloat16(), "exp", "ieee")
    with pytest.raises(ValueError, match="limits must be nondecreasing"):
        kernel.dual_attention_forward(**{**inputs, "lim": torch.tensor([3, 1, 2, 4])})


@pytest.mark.parametrize("window,docs", [(1, False), (3, True)])
def test_the_whole_scan_with_the_kernel_equals_the_pytorch_path(window, docs, monkeypatch):
    """Every attention pass of the dual scan (anchors, reads, the backward's pulls) by the kernel: outputs, final state
    and the gradients of every input, a document starting mid-chunk, the call split off the grid."""
    monkeypatch.setattr(kernel, "BLOCK", SMALL)
    gen = torch.Generator().manual_seed(0)
    batch, length, heads, dh, hid, c = 2, 21, 2, 4, 6, window

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = [torch.nn.functional.normalize(randn(batch, length, heads, dh), dim=-1) for _ in range(2)]
    x += [randn(batch, length, heads, dh), 0.1 + torch.rand(batch, length, heads, generator=gen, dtype=torch.float64),
          torch.rand(batch, length, heads, c, generator=gen, dtype=torch.float64)]
    params = {"W1": randn(heads, dh, hid) * 0.4, "K0": randn(heads, 3, dh), "A0": randn(heads, 3, hid),
              "scale": torch.tensor([2.0, 6.0], dtype=torch.float64), "ln_weight": 1 + 0.1 * randn(heads, dh),
              "ln_bias": 0.1 * randn(heads, dh)}
    leaves = [t.requires_grad_() for t in (*x, *params.values())]
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    if docs:
        doc_start[1, 9] = True

    def results(use_kernel):
        chosen = kernel.implementation("ieee") if use_kernel else dual_attention.TORCH
        monkeypatch.setattr(dual_attention, "implementation", lambda *_: chosen)
        y1, state = dual_memory_scan(*(t[:, :13] for t in x), params, doc_start=doc_start[:, :13], chunk_size=4)
        y2, state = dual_memory_scan(*(t[:, 13:] for t in x), params, doc_start=doc_start[:, 13:], chunk_size=4,
                                     state=state)
        outputs = [torch.cat([y1, y2], dim=1), state["coef"], state["W1"]]
        upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                    for i, o in enumerate(outputs)]
        total = sum((o * u).sum() for o, u in zip(outputs, upstream))
        return outputs + list(torch.autograd.grad(total, leaves))

    for got, want in zip(results(True), results(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_registry_fast_path_takes_cuda_points_only():
    """Off the GPU the fast path declines (the scan's PyTorch pass runs): the interpreter is for these tests."""
    inputs, _ = kernel.random_pass(1, 1, 4, 4, 6, 10, device="cpu", dtype=torch.float32)
    assert dispatch.dual_attention_or_none(inputs["x"], 10, "exp", True) is None
    assert dual_attention.implementation(inputs["x"], 10, "exp", True) is dual_attention.TORCH


def test_the_probe_passes_and_notes_a_failure(monkeypatch, caplog):
    inputs, _ = kernel.random_pass(1, 1, 4, 4, 6, 10, device="cpu", dtype=torch.float64)
    assert dispatch.dual_attention_fast(inputs["x"], 10, "exp", "ieee") is not None
    monkeypatch.setattr(dispatch, "_probed", {})
    monkeypatch.setattr(kernel, "dual_attention_forward", lambda *a, **k: dual_attention.TORCH.forward(*a[:8]) * 2)
    with caplog.at_level("WARNING"):
        assert dispatch.dual_attention_fast(inputs["x"], 10, "exp", "ieee") is None
    assert "the dual attention kernel is not used" in caplog.text and "disagrees" in caplog.text


def test_bench_smoke_run_prints_every_row_and_passes_its_checks(capsys):
    """`bench_dual_scan.py --smoke` on the CPU (the kernel interpreted, tiny shapes): a crash found here costs no GPU
    time. Every timing row, then every error check, within its bound."""
    bench = load_benchmark("bench_dual_scan")
    with torch.random.fork_rng():
        assert bench.main(["--smoke", "--torch-pass", "--compiled-terms", "--attention-setting", "points 128"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("attention kernel setting: points 128")
    assert [line.split("  ")[0].strip() for line in lines[2:8]] == [
        "scan (kernel)", "scan (torch)", "scan (kernel), compiled terms", "DualMixer", "Attention module",
        "SDPA (default)"]
    checks = [line for line in lines if line.startswith(("ok", "FAIL"))]
    assert len(checks) == 12 and all(line.startswith("ok") for line in checks), checks


def test_attention_bench_runs_every_setting_and_prints_its_table_last(capsys):
    """CPU smoke run of `bench_dual_attention.py --sweep` (interpreted kernel, tiny shapes): a launch setting the
    benchmark cannot apply, or one that computes wrong numbers, is found here, not on the GPU."""
    bench = load_benchmark("bench_dual_attention")
    assert bench.main(["--sweep"]) == 0
    *table, best = capsys.readouterr().out.split("== dual attention passes")[-1].splitlines()[2:]
    assert len(table) == 2 * (1 + len(bench.SWEEP))
    for line in table:
        assert float(line.split()[-1]) < 1e-4, line
    assert best.removeprefix("best setting: ") in ["default", *(name for name, _ in bench.SWEEP)]
