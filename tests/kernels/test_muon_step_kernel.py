"""The fused Muon step kernel (kernels/muon_step_kernel.py) against the PyTorch path of atlas_train.ops, under the
Triton CPU interpreter in float64: the step alone (M', A' and every input gradient, in each of the NS kernel's
variants, wide and tall, with and without a prior gradient sum, over several key blocks), inside the whole chunk
scan, and its dispatch and probe.

tests/conftest.py sets TRITON_INTERPRET before anything imports Triton, so the kernels run in its CPU interpreter.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

import atlas_train.kernels.muon_step_kernel as muon_kernel
from atlas_train.kernels import dispatch
from atlas_train.ops import muon_step
from benchmark_scripts import load_benchmark
from kernel_variants import NS_VARIANTS, force_ns_variant
from probe_faults import CORRUPTIONS, check_probe_verdict
from scan_runs import two_call_scan


def _step(seed, batch, heads, keys, n_out, n_in, prior):
    torch.manual_seed(seed)
    return dispatch.random_muon_step(batch, heads, keys, n_out, n_in, prior=prior, device="cpu",
                                     dtype=torch.float64)


def _assert_match(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", NS_VARIANTS)
@pytest.mark.parametrize("n_out,n_in", [(20, 37), (37, 20)])  # wide, and tall (read through swapped strides)
@pytest.mark.parametrize("prior", [False, True])
def test_step_and_its_gradients_match_the_pytorch_path(variant, n_out, n_in, prior, monkeypatch):
    force_ns_variant(monkeypatch, variant, (n_out, n_in))
    monkeypatch.setattr(muon_kernel, "BLOCK_K", 16)  # 37 keys: three key blocks, the last partial
    inputs, upstream = _step(0, 2, 1, 37, n_out, n_in, prior)
    steps = 1 if prior else 3  # one step: an integer argument Triton specialises as a constant when compiling
    got = dispatch.muon_step_results(inputs, upstream, steps, kernel=True)
    want = dispatch.muon_step_results(inputs, upstream, steps, kernel=False)
    _assert_match(got, want)


@pytest.mark.parametrize("variant", NS_VARIANTS)
def test_without_newton_schulz_the_step_takes_the_raw_momentum(variant, monkeypatch):
    """steps = 0 (titans, omeganet, dla): A' = decay·A + descent·M', no normalisation."""
    force_ns_variant(monkeypatch, variant, (20, 37))
    inputs, upstream = _step(6, 2, 1, 11, 20, 37, prior=True)
    _assert_match(dispatch.muon_step_results(inputs, upstream, 0, kernel=True),
                  dispatch.muon_step_results(inputs, upstream, 0, kernel=False))


@pytest.mark.parametrize("used", ["momentum", "anchor", "neither"])
def test_an_output_without_gradient_counts_as_zero(used):
    """The scan hands on both outputs, but autograd may bring a gradient for one alone (the last chunk's momentum
    has none), or for neither: the kernel then starts from zeros, as autograd's path does."""
    inputs, (up_momentum, up_anchor) = _step(1, 1, 2, 9, 6, 10, prior=False)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    found = []
    for run in (lambda *t: muon_kernel.muon_step(*t, 2, "ieee", "ieee"),
                lambda *t: muon_step.muon_step_reference(*t, 2, False)):
        momentum, anchor = run(*leaves)
        loss = {"momentum": (momentum * up_momentum).sum(), "anchor": (anchor * up_anchor).sum(),
                "neither": momentum.sum() * 0}[used]
        targets = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        found.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)])
    _assert_match(*found)


def test_step_gradcheck():
    inputs, _ = _step(2, 1, 1, 3, 2, 3, prior=True)
    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *t: muon_kernel.muon_step(*t, 2, "ieee", "ieee"), leaves, eps=1e-6,
                                    atol=1e-7)


def test_gates_and_weights_shared_over_the_batch_get_their_gradients_summed():
    """The first chunk's momentum is `params`' zeros expanded over the batch, and gates may be shared: the kernel
    reads contiguous copies, and autograd sums their gradients back, as for the PyTorch path."""
    inputs, upstream = _step(3, 3, 2, 5, 4, 6, prior=False)
    inputs[4] = inputs[4][:1]  # momentum (1, H, out, in)
    inputs[6] = inputs[6][:1]  # θ (1, H, 1, 1)
    _assert_match(dispatch.muon_step_results(inputs, upstream, 2, kernel=True),
                  dispatch.muon_step_results(inputs, upstream, 2, kernel=False))


def _scan_results(use_kernel, monkeypatch, gated=False, ns_steps=2):
    """`two_call_scan` of the chunk update (the split makes a closing piece add a prior gradient sum) with the kernel
    standing in for the PyTorch Muon step or not."""
    calls = []
    if use_kernel:
        def kernel_step(*args):  # the dispatch, as on a GPU, exact products
            calls.append(args[3] is not None)
            return muon_kernel.muon_step(*args[:-1], "ieee", "ieee")

        monkeypatch.setattr(muon_step, "muon_step", kernel_step)
    forward_calls = []
    results = two_call_scan("chunk", length=13, reset_at=9, ns_steps=ns_steps, gated=gated,
                            forward_done=lambda: forward_calls.extend(calls))
    monkeypatch.undo()
    if use_kernel:  # closing pieces with and without a prior sum ran, and the backward recomputed through the kernel
        assert set(forward_calls) == {True, False} and len(calls) > len(forward_calls), calls
    return results


@pytest.mark.parametrize("gated,ns_steps", [(False, 2), (True, 2), (False, 0)])
def test_chunk_scan_with_the_kernel_matches_the_pytorch_path(gated, ns_steps, monkeypatch):
    with_kernel = _scan_results(True, monkeypatch, gated, ns_steps)
    reference = _scan_results(False, monkeypatch, gated, ns_steps)
    for got, want in zip(with_kernel, reference, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_unsupported_steps_are_refused_with_a_reason():
    momentum = torch.zeros(1, 4, 6, dtype=torch.float64)
    assert muon_kernel.muon_step_unsupported(momentum, 127, 5, "tf32", "bf16") is None
    assert "dtype" in muon_kernel.muon_step_unsupported(momentum.half(), 127, 5, "tf32", "bf16")
    assert "513 window keys" in muon_kernel.muon_step_unsupported(momentum, 513, 5, "tf32", "bf16")
    assert "-1 Newton-Schulz steps" in muon_kernel.muon_step_unsupported(momentum, 127, -1, "tf32", "bf16")
    wide = torch.zeros(1, 300, 400, dtype=torch.float64)
    assert "short side" in muon_kernel.muon_step_unsupported(wide, 127, 5, "tf32", "bf16")
    inputs, _ = _step(4, 1, 1, 3, 4, 6, prior=False)
    with pytest.raises(ValueError, match="muon step kernel: -1 Newton-Schulz steps"):
        muon_kernel.muon_step(*inputs, -1, "ieee", "ieee")


def test_dispatch_takes_the_kernel_only_where_switched_on_and_notes_refusals_once(caplog, monkeypatch):
    inputs, _ = _step(5, 1, 1, 3, 4, 6, prior=False)
    monkeypatch.setattr(dispatch, "_muon_kernel", True)
    assert dispatch.muon_step_or_none(*inputs, 2, True) is None  # CPU: by design, no note
    assert not caplog.records
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    ran = []
    monkeypatch.setattr(dispatch, "muon_step", lambda *args: ran.append(args[-2:]) or "ran")
    monkeypatch.setattr(dispatch, "_probe_muon_step", lambda *args: None)
    monkeypatch.setattr(dispatch, "_ns_precision", "auto")
    assert dispatch.muon_step_or_none(*inputs, 2, True) == "ran"
    assert ran == [("tf32", "bf16")]  # G's products in the scan's product precision, NS in its own
    with caplog.at_level(logging.WARNING, logger="atlas_train.kernels.dispatch"):
        for _ in range(2):
            assert dispatch.muon_step_or_none(*inputs, -1, True) is None
    assert sum("-1 Newton-Schulz steps" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(dispatch, "_muon_kernel", False)
    assert dispatch.muon_step_or_none(*inputs, 2, True) is None
    assert ran == [("tf32", "bf16")]


def test_the_step_stays_unfused_where_newton_schulz_goes_to_cublas(caplog, monkeypatch):
    """W2 of dh 64 (256 x 128) in bf16: fused at B·H = 128 (the NS kernel's rule takes it), unfused at B·H = 16,
    where cuBLAS runs its NS; without NS (steps = 0) the rule does not apply."""
    monkeypatch.setattr(dispatch, "_muon_kernel", True)
    monkeypatch.setattr(dispatch, "_probe_muon_step", lambda *args: None)
    monkeypatch.setattr(dispatch, "muon_step", lambda *args: "fused")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(dispatch, "_ns_precision", "auto")
    for chains, steps, fused in ((128, 5, True), (16, 5, False), (16, 0, True)):
        inputs, _ = _step(7, chains, 1, 3, 256, 128, prior=False)
        with caplog.at_level(logging.WARNING, logger="atlas_train.kernels.dispatch"):
            got = dispatch.muon_step_or_none(*inputs, steps, True)
        assert (got == "fused") == fused, (chains, steps)
    assert any("16 matrices of (256, 128) goes to cuBLAS" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_probe_passes_the_kernel_and_rejects_wrong_numbers(corrupt, monkeypatch):
    momentum = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    check_probe_verdict(monkeypatch, corrupt, "muon_step_results", "the fused Muon step kernel",
                        lambda: dispatch._probe_muon_step(momentum, 5, True, 2, "ieee", "ieee"), 1, 4)


def test_muon_bench_runs_and_prints_its_table_last(capsys):
    """CPU smoke run of `bench_muon_step.py` (interpreted kernel, tiny shapes): a crash found here costs no GPU time.
    Every row has its times, roofline columns and an error against float64 within the exact bound."""
    bench = load_benchmark("bench_muon_step")

    assert bench.main([]) == 0
    table = capsys.readouterr().out.split("== the chunk update's Muon step")[-1].splitlines()[2:]
    assert [line.split()[0] for line in table] == ["unfused", "fused"] * 2
    assert all(len(line.split()) == 10 and float(line.split()[-1]) < 1e-4 for line in table), table
