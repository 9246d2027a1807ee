"""The token momenta kernel (kernels/token_momenta_kernel.py) against the PyTorch path of atlas_train.ops, under the
Triton CPU interpreter in float64: the momenta alone (outputs and every input gradient, with tiles small enough that
every loop runs over several blocks), inside the whole token scan, and its dispatch and probe.

tests/conftest.py sets TRITON_INTERPRET before anything imports Triton, so the kernels run in its CPU interpreter.
"""

import logging

import pytest
import torch

import atlas_train.kernels.token_momenta_kernel as momenta_kernel
from atlas_train.kernels import dispatch
from atlas_train.ops import outer_sums
from benchmark_scripts import load_benchmark
from probe_faults import CORRUPTIONS, check_probe_verdict
from scan_runs import two_call_scan


def _inputs(seed, batch, heads, length, keys, n_out, n_in):
    """mix, left, right, scale, prev (leaves, float64) and an upstream gradient of the momenta."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(length, keys), (keys, n_out), (keys, n_in), (length,), (n_out, n_in), (length, n_out, n_in)]
    tensors = [torch.randn(batch, heads, *shape, generator=gen, dtype=torch.float64) for shape in shapes]
    return [t.requires_grad_() for t in tensors[:5]], tensors[5]


@pytest.mark.parametrize("sizes,blocks,programs", [
    ((2, 2, 5, 9, 6, 20), None, 512),  # one block of everything
    ((1, 2, 7, 40, 70, 130), {"out": 16, "in": 32, "keys": 16}, 6),  # several out/in/key blocks, token groups of 2
    ((1, 1, 6, 150, 20, 33), {"out": 16, "in": 16, "keys": 16}, 1),  # K > 128 (a 256-wide key tile), one group
])
def test_momenta_and_their_gradients_match_the_pytorch_path(sizes, blocks, programs, monkeypatch):
    if blocks is not None:
        monkeypatch.setattr(momenta_kernel, "BLOCK", blocks)
    monkeypatch.setattr(momenta_kernel, "TARGET_PROGRAMS", programs)
    leaves, upstream = _inputs(0, *sizes)
    got = dispatch.token_momenta_results(*leaves, upstream, kernel=True)
    want = dispatch.token_momenta_results(*leaves, upstream, kernel=False)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_momenta_gradcheck():
    leaves, _ = _inputs(1, 1, 1, 2, 3, 2, 3)
    assert torch.autograd.gradcheck(lambda *t: momenta_kernel.token_momenta(*t, "ieee"), leaves, eps=1e-6,
                                    atol=1e-7)


def test_an_expanded_carried_momentum_gets_its_gradient_summed():
    """The first chunk carries zeros shaped like `params` expanded over the batch: the kernel reads a contiguous copy
    and autograd sums the gradient back over the batch, as for the PyTorch path."""
    leaves, upstream = _inputs(2, 3, 2, 4, 7, 5, 6)
    shared = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    expanded = shared.expand(3, -1, -1, -1)
    out = momenta_kernel.token_momenta(*leaves[:4], expanded, "ieee")
    want = outer_sums.weighted_outer_sums_reference(*leaves[:4], expanded)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(out, shared, upstream)
    (want,) = torch.autograd.grad(want, shared, upstream)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _scan_results(use_kernel, monkeypatch):
    """`two_call_scan` of the token update with the kernel standing in for the PyTorch momenta or not."""
    calls = []
    if use_kernel:
        def kernel_momenta(mix, left, right, scale, prev, half_inputs):  # the dispatch, as on a GPU, exact products
            calls.append(mix.shape)
            return momenta_kernel.token_momenta(mix, left, right, scale, prev, "ieee")

        monkeypatch.setattr(outer_sums, "weighted_outer_sums", kernel_momenta)
    forward_calls = []
    results = two_call_scan("token", length=11, reset_at=6, forward_done=lambda: forward_calls.append(len(calls)))
    monkeypatch.undo()
    assert (forward_calls[0] > 0 and len(calls) > forward_calls[0]) == use_kernel  # backward recomputes through it
    return results


def test_token_scan_with_the_momenta_kernel_matches_pytorch_path(monkeypatch):
    with_kernel = _scan_results(True, monkeypatch)
    reference = _scan_results(False, monkeypatch)
    for got, want in zip(with_kernel, reference, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_unsupported_inputs_are_refused_with_a_reason():
    (mix, left, right, _, _), _ = _inputs(3, 1, 1, 2, 4, 3, 5)
    assert momenta_kernel.token_momenta_unsupported(mix, left, right, "tf32") is None
    assert "bf16" in momenta_kernel.token_momenta_unsupported(mix, left, right, "bf16")
    assert "dtype" in momenta_kernel.token_momenta_unsupported(mix.half(), left, right, "tf32")
    wide = mix.new_zeros(1, 1, 2, momenta_kernel.MAX_KEYS + 1)
    assert "257 window keys" in momenta_kernel.token_momenta_unsupported(wide, left, right, "tf32")
    with pytest.raises(ValueError, match="token momenta kernel: precision 'bf16'"):
        momenta_kernel.token_momenta(mix, left, right, mix[..., 0], right[:, :, :3].transpose(-1, -2), "bf16")


def test_dispatch_leaves_cpu_tensors_to_pytorch_and_notes_refusals_once(caplog, monkeypatch):
    (mix, left, right, scale, prev), _ = _inputs(4, 1, 1, 2, 4, 3, 5)
    assert dispatch.token_momenta_or_none(mix, left, right, scale, prev, True) is None  # CPU: by design, no note
    assert not caplog.records
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    wide = mix.new_zeros(1, 1, 2, momenta_kernel.MAX_KEYS + 1)
    with caplog.at_level(logging.WARNING, logger="atlas_train.kernels.dispatch"):
        for _ in range(2):
            assert dispatch.token_momenta_or_none(wide, left, right, scale, prev, True) is None
    assert sum("257 window keys" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("half,precision", [(True, "tf32"), (False, "ieee")])
def test_dispatch_runs_the_kernel_in_the_scan_product_precision(half, precision, monkeypatch):
    """A bf16 model's momenta take tf32 products (like the scan's other products), a float32 model's exact ones; the
    probe that admits the kernel checks it in that precision."""
    (mix, left, right, scale, prev), _ = _inputs(5, 1, 1, 3, 4, 3, 5)
    monkeypatch.setattr(dispatch, "_probed", {})
    monkeypatch.setattr(dispatch, "_ns_precision", "auto")
    assert dispatch._probe_token_momenta(mix, left, right, precision) is None  # the kernel ran and passed
    (key,) = dispatch._probed
    assert key[-1] == precision
    ran = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "token_momenta", lambda *args: ran.append(args[-1]) or "ran")
    assert dispatch.token_momenta_or_none(mix, left, right, scale, prev, half) == "ran"
    assert ran == [precision]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_probe_passes_the_kernel_and_rejects_wrong_numbers(corrupt, monkeypatch):
    (mix, left, right, _, _), _ = _inputs(6, 1, 1, 3, 4, 3, 5)
    check_probe_verdict(monkeypatch, corrupt, "token_momenta_results", "the token momenta kernel",
                        lambda: dispatch._probe_token_momenta(mix, left, right, "ieee"), 0, 2)

def test_momenta_bench_runs_and_prints_its_table_last(capsys):
    """CPU smoke run of `bench_momenta.py` (interpreted kernel, one tiny shape): a crash found here costs no GPU
    time. Both rows time forward and forward+backward; none failed."""
    bench_momenta = load_benchmark("bench_momenta")

    assert bench_momenta.main([]) == 0
    table = capsys.readouterr().out.split("== token momenta")[-1].splitlines()[2:]
    assert [line.split()[0] for line in table] == ["PyTorch", "kernel"]
    assert all(len(line.split()) >= 4 and "Error" not in line for line in table), table


def test_scan_bench_runs_only_the_check_groups_asked_for(capsys):
    """`bench_memory_scan.py --checks momenta` runs the momenta kernel's check alone (here interpreted, against
    float64), not the NS or memory MLP checks."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    with torch.random.fork_rng():  # the bench seeds the global generator afresh
        assert bench_memory_scan.main(["--checks", "momenta", "--count-ops", "--updates", "chunk", "--dh", "8",
                                       "--lengths", "64"]) == 0
    checks = capsys.readouterr().out.split("== correctness (relative")[1].split("matmul ceiling")[0]
    rows = [line for line in checks.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(rows) == 1 and rows[0].startswith("ok   momenta kernel 4/7/6x10 ieee"), rows
