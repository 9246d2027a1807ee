"""The memory MLP's token-pass kernel (kernels/memory_mlp_kernel.py) against the PyTorch path of atlas_train.ops,
under the Triton CPU interpreter in float64: the pass alone (outputs and every input gradient), inside the whole
scan for both updates (documents starting mid-chunk, state carried across calls), and its dispatch and probe.

tests/conftest.py sets TRITON_INTERPRET before anything imports Triton, so the kernels run in its CPU interpreter.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch

import atlas_train.kernels.memory_mlp_kernel as mlp_kernel
from atlas_train.kernels import dispatch
from atlas_train.ops import memory_mlp, memory_scan
from benchmark_scripts import load_benchmark
from probe_faults import CORRUPTIONS, check_probe_verdict


def _rand(gen, *shape, scale=1.0, offset=0.0):
    return (offset + torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def _pass_inputs(seed, batch, heads, n, dim, dv, hidden, weight_batch, with_ln):
    gen = torch.Generator().manual_seed(seed)
    z, v = _rand(gen, batch, heads, n, dim), _rand(gen, batch, heads, n, dv)
    w1 = _rand(gen, weight_batch, heads, dv, hidden, scale=hidden ** -0.5)
    w2 = _rand(gen, weight_batch, heads, hidden, dim, scale=dim ** -0.5)
    ln = {"ln_weight": _rand(gen, heads, dv, scale=0.2, offset=1.0),
          "ln_bias": _rand(gen, heads, dv, scale=0.1)} if with_ln else None
    return z, v, w1, w2, ln


def _pass_results(fn, z, v, w1, w2, ln, seed):
    """Outputs of one pass and the gradients of every input under random upstream gradients."""
    outs = fn(z, v, w1, w2, ln)
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    leaves = [z, w1, w2, *(() if v is None else (v,)), *(() if ln is None else ln.values())]
    grads = torch.autograd.grad(outs, leaves, upstream)
    return [o.detach() for o in outs], list(grads)


def _kernel(loss):
    def run(z, v, w1, w2, ln):
        outs = mlp_kernel.memory_mlp_pass(z, w1, w2, ln, v=v, loss=loss, precision="ieee")
        return outs if v is not None else (outs,)
    return run


def _pytorch(loss):
    def run(z, v, w1, w2, ln):
        weights = {"W1": w1, "W2": w2}
        f = memory_mlp.memory_forward(weights, z, w1.shape[-2], ln)
        if v is None:
            return (f,)
        factors = memory_mlp.loss_gradient_factors(weights, z, v, ln, loss)
        return f, factors["W1"][0], factors["W1"][1], factors["W2"][0]
    return run


# Sizes off the powers of two (padded tiles), several token blocks, several hidden tiles (BLOCK_HID set to 16 below),
# weights per row and weights shared by every row (`params`).
CASES = [
    dict(batch=2, heads=2, n=37, dim=20, dv=12, hidden=40, weight_batch=1, with_ln=True, loss="l2", factors=True),
    dict(batch=2, heads=1, n=21, dim=24, dv=24, hidden=70, weight_batch=2, with_ln=True, loss="dot", factors=True),
    dict(batch=1, heads=2, n=17, dim=16, dv=8, hidden=33, weight_batch=1, with_ln=False, loss="l2", factors=True),
    dict(batch=2, heads=1, n=9, dim=18, dv=18, hidden=16, weight_batch=2, with_ln=False, loss="dot", factors=True),
    dict(batch=2, heads=2, n=37, dim=20, dv=12, hidden=40, weight_batch=2, with_ln=True, loss=None, factors=False),
    dict(batch=1, heads=1, n=5, dim=12, dv=4, hidden=20, weight_batch=1, with_ln=False, loss=None, factors=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_token_pass_matches_pytorch_path(case, monkeypatch):
    """f, the gradient factors (g_out, hidden, g_pre) and the gradients of z, v, W1, W2 and the LayerNorm through
    all four outputs: the kernel's hand-written second-order backward against autograd on the PyTorch path."""
    monkeypatch.setattr(mlp_kernel, "BLOCK_HID", 16)
    monkeypatch.setattr(mlp_kernel, "TILE_ELEMENTS", 16 * 32)  # 16-token blocks: several per row
    case = dict(case)
    loss, factors = case.pop("loss"), case.pop("factors")
    z, v, w1, w2, ln = _pass_inputs(seed=case["n"], **case)
    v = v if factors else None
    got_out, got_grads = _pass_results(_kernel(loss), z, v, w1, w2, ln, seed=5)
    want_out, want_grads = _pass_results(_pytorch(loss), z, v, w1, w2, ln, seed=5)
    for got, want in zip(got_out + got_grads, want_out + want_grads, strict=True):
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_token_pass_gradcheck():
    z, v, w1, w2, ln = _pass_inputs(seed=1, batch=1, heads=1, n=3, dim=5, dv=3, hidden=6, weight_batch=1,
                                    with_ln=True)

    def fn(z, v, w1, w2, lw, lb):
        return mlp_kernel.memory_mlp_pass(z, w1, w2, {"ln_weight": lw, "ln_bias": lb}, v=v, loss="l2",
                                          precision="ieee")

    assert torch.autograd.gradcheck(fn, (z, v, w1, w2, ln["ln_weight"], ln["ln_bias"]), eps=1e-6, atol=1e-6)


def _scan_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length, heads, dim, dv, hid, window = 2, 11, 2, 6, 4, 9, 3

    def gate(*shape, low=0.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    params = {"W1": _rand(gen, heads, dv, hid, scale=0.3), "W2": _rand(gen, heads, hid, dim, scale=0.3),
              "ln_weight": gate(heads, dv, low=0.5, high=1.5), "ln_bias": _rand(gen, heads, dv, scale=0.1)}
    tensors = dict(zq=_rand(gen, batch, length, heads, dim), zk=_rand(gen, batch, length, heads, dim),
                   v=_rand(gen, batch, length, heads, dv), alpha=gate(batch, length, heads, low=0.8),
                   eta=gate(batch, length, heads, high=0.2), theta=gate(batch, length, heads, high=0.9),
                   gamma=gate(batch, length, heads, window))
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    doc_start[1, 6] = True  # one row only: keys at the carried anchor and at `params` in one chunk
    return tensors, params, doc_start


def _scan_results(update, use_kernel, monkeypatch):
    """y, the final state and every gradient of two scan calls (split mid-chunk, state passed on)."""
    calls = []
    if use_kernel:
        def kernel_pass(weights, z, ln, v=None, loss=None):  # the dispatch, as on a GPU, with exact products
            if any(isinstance(w, memory_mlp.TokenWeights) for w in weights.values()):
                return None
            calls.append(z.shape)
            return mlp_kernel.memory_mlp_pass(z, weights["W1"], weights["W2"], ln, v=v, loss=loss, precision="ieee")

        monkeypatch.setattr(memory_mlp, "_fast_pass", kernel_pass)
    tensors, params, doc_start = _scan_inputs(seed=4)
    split = 6
    first = {k: t[:, :split] for k, t in tensors.items()}
    second = {k: t[:, split:] for k, t in tensors.items()}
    options = dict(chunk_size=4, ns_steps=2, update=update)
    y1, state = memory_scan(**first, params=params, doc_start=doc_start[:, :split], **options)
    y2, state = memory_scan(**second, params=params, doc_start=doc_start[:, split:], state=state, **options)
    forward_calls = len(calls)
    y = torch.cat([y1, y2], dim=1)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=y.dtype)
    carried = sum(t.sum() for k, t in state.items() if t.is_floating_point())
    leaves = list(tensors.values()) + list(params.values())
    grads = torch.autograd.grad((y * upstream).sum() + carried, leaves)
    monkeypatch.undo()
    assert (forward_calls > 0 and len(calls) > forward_calls) == use_kernel  # backward recomputes through it too
    return [y.detach(), *(t.detach() for t in state.values() if t.is_floating_point()), *grads]


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_memory_scan_with_the_token_pass_kernel_matches_pytorch_path(update, monkeypatch):
    with_kernel = _scan_results(update, True, monkeypatch)
    reference = _scan_results(update, False, monkeypatch)
    for got, want in zip(with_kernel, reference, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_dispatch_leaves_cpu_gated_and_not_opted_in_passes_to_pytorch(caplog, monkeypatch):
    """CPU tensors and a switched-off kernel go to the PyTorch path silently (by design); a gated memory with the
    kernel on gets one note."""
    z, v, w1, w2, ln = _pass_inputs(seed=2, batch=1, heads=1, n=4, dim=8, dv=4, hidden=8, weight_batch=1,
                                    with_ln=True)
    assert dispatch.memory_mlp_or_none({"W1": w1, "W2": w2}, z, ln) is None  # CPU: the PyTorch path by design
    assert "gated" in mlp_kernel.memory_mlp_unsupported(w1, w2, z, True, "l2", "tf32")
    assert "dtype" in mlp_kernel.memory_mlp_unsupported(w1, w2, z.half(), False, "l2", "tf32")
    assert "hidden=2048" in mlp_kernel.memory_mlp_unsupported(w1.new_zeros(1, 1, 4, 2048), w2, z, False, None,
                                                              "tf32")
    assert mlp_kernel.memory_mlp_unsupported(w1, w2, z, False, "l2", "tf32") is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    monkeypatch.setattr(dispatch, "_mlp_kernel", False)  # switched off: no note, no kernel
    assert dispatch.memory_mlp_or_none({"W1": w1, "W2": w2, "W3": w2}, z, ln, v=v, loss="l2") is None
    assert not caplog.records
    monkeypatch.setattr(dispatch, "_mlp_kernel", True)
    with caplog.at_level(logging.WARNING, logger="atlas_train.kernels.dispatch"):
        for _ in range(2):
            assert dispatch.memory_mlp_or_none({"W1": w1, "W2": w2, "W3": w2}, z, ln, v=v, loss="l2") is None
    assert sum("gated memory (W3)" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("ns_precision,kernel_precision",
                         [("ieee", "ieee"), ("tf32", "tf32"), ("bf16", "tf32"), ("auto", "tf32")])
def test_kernel_runs_in_the_ns_precision_but_never_below_tf32(ns_precision, kernel_precision, monkeypatch):
    """bf16 Newton–Schulz leaves the memory MLP kernel in tf32 (its bf16 about doubles the chunk scan's error),
    both in the pass it runs and in the probe that admits it, whose bound is the kernel's precision's."""
    z, v, w1, w2, ln = _pass_inputs(seed=4, batch=1, heads=1, n=4, dim=8, dv=4, hidden=8, weight_batch=1,
                                    with_ln=True)
    passes, real = [], dispatch.memory_mlp_pass
    monkeypatch.setattr(dispatch, "memory_mlp_pass",
                        lambda *a, precision, **k: passes.append(precision) or real(*a, precision=precision, **k))
    monkeypatch.setattr(dispatch, "_probed", {})
    monkeypatch.setattr(dispatch, "_ns_precision", ns_precision)
    monkeypatch.setattr(dispatch, "_mlp_kernel", True)
    assert dispatch._probe_memory_mlp(w1, w2, z, ln, True, "l2") is None  # it ran the kernel, which passed
    (key,) = dispatch._probed
    assert key[-1] == kernel_precision
    # As if on a GPU (the interpreter cannot run with that pretence, so the pass is only recorded now):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "memory_mlp_pass", lambda *a, precision, **k: passes.append(precision) or "ran")
    assert dispatch.memory_mlp_or_none({"W1": w1, "W2": w2}, z, ln, v=v, loss="l2") == "ran"
    assert passes == [kernel_precision] * 2  # the probe's run, then the pass itself


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_probe_passes_the_kernel_and_rejects_wrong_numbers(corrupt, monkeypatch):
    """The probe runs the kernel on random inputs of the pass's sizes against the float64 PyTorch path."""
    z, v, w1, w2, ln = _pass_inputs(seed=3, batch=1, heads=1, n=4, dim=8, dv=4, hidden=8, weight_batch=1,
                                    with_ln=True)
    check_probe_verdict(monkeypatch, corrupt, "memory_mlp_pass_results", "the memory MLP kernel",
                        lambda: dispatch._probe_memory_mlp(w1, w2, z, ln, True, "l2"), 1, -1)

def test_bench_check_fails_when_the_kernel_would_not_run(monkeypatch):
    """bench_memory_scan's '+mlp kernel' checks would pass by the kernel's absence if its probe refused it: the bench
    asks the dispatch why it would refuse the check's passes, and each reason becomes a failed check."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    tensors, params = bench_memory_scan.make_inputs(1, 8, 2, 8, torch.device("cpu"), torch.float32, seed=0)
    monkeypatch.setattr(dispatch, "_probed", {})
    assert bench_memory_scan.mlp_kernel_refusals(tensors, params) == []

    def broken(*args, **kwargs):  # the kernel's run comes first, so the reference is never reached
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(dispatch, "_probed", {})
    monkeypatch.setattr(dispatch, "memory_mlp_pass_results", broken)
    reasons = bench_memory_scan.mlp_kernel_refusals(tensors, params)
    assert len(reasons) == 2 and all("failed to run" in r for r in reasons)


def _settings_in_a_fresh_process(variable: str, setting: str | None) -> subprocess.CompletedProcess:
    """Import the dispatcher with `variable` set to `setting` (unset for None) and print its settings."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if setting is not None:
        env[variable] = setting
    code = "import atlas_train.kernels.dispatch as d; print(*d.settings())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("setting,enabled", [(None, True), ("0", False), ("1", True)])
def test_kernel_is_on_unless_the_environment_says_0(setting, enabled):
    """On by default (timed on a GPU: benchmarks/RESULTS.md), off with ATLAS_MEMORY_MLP_KERNEL=0; read at import."""
    done = _settings_in_a_fresh_process("ATLAS_MEMORY_MLP_KERNEL", setting)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[2] == str(enabled)


@pytest.mark.parametrize("setting,enabled", [(None, False), ("0", False), ("1", True)])
def test_fused_muon_step_is_off_unless_the_environment_says_1(setting, enabled):
    """Off by default until a GPU has timed it (kernels/dispatch.py), on with ATLAS_MUON_STEP_KERNEL=1; read at
    import."""
    done = _settings_in_a_fresh_process("ATLAS_MUON_STEP_KERNEL", setting)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[3] == str(enabled)


@pytest.mark.parametrize("variable", ["ATLAS_MEMORY_MLP_KERNEL", "ATLAS_MUON_STEP_KERNEL"])
def test_a_kernel_switch_other_than_0_or_1_stops_with_one_line(variable):
    done = _settings_in_a_fresh_process(variable, "yes")
    assert done.returncode != 0 and f"ValueError: {variable}='yes': expected 0 or 1" in done.stderr


@pytest.mark.parametrize("setting,outcome", [(None, "auto"), ("bf16", "bf16"), ("fp8", "ATLAS_NS_PRECISION='fp8'")])
def test_ns_precision_comes_from_the_environment_or_stops_with_one_line(setting, outcome):
    done = _settings_in_a_fresh_process("ATLAS_NS_PRECISION", setting)
    if setting == "fp8":
        assert done.returncode != 0 and f"ValueError: {outcome} is not one of auto, ieee, tf32, bf16" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout.split()[1] == outcome, done.stderr[-2000:]


def test_bench_checks_the_kernel_alone_and_a_wrong_kernel_fails(monkeypatch):
    """bench_memory_scan's per-precision check of the pass (here interpreted, float32 against float64): it passes the
    kernel, and a kernel whose gradients are off by 1% fails it."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    rows = bench_memory_scan.check_mlp_kernel(torch.device("cpu"), [(20, 12, 40)], tokens=21)
    assert [name.split(" (")[0] for name, _, _ in rows] == ["mlp kernel 20/12/40 read ieee",
                                                            "mlp kernel 20/12/40 factors ieee"]
    assert all(err <= bound for _, err, bound in rows), rows
    real = dispatch.memory_mlp_pass

    def off_by_one_percent(z, w1, w2, ln, **kwargs):
        out = real(z, w1, w2, ln, **kwargs)
        return tuple(t + 0.01 * (t - t.detach()) for t in out) if isinstance(out, tuple) else out

    monkeypatch.setattr(dispatch, "memory_mlp_pass", off_by_one_percent)
    rows = bench_memory_scan.check_mlp_kernel(torch.device("cpu"), [(20, 12, 40)], tokens=21)
    assert not rows[1][1] <= rows[1][2], rows  # the factors' gradients are scaled by 1.01


def test_bench_scan_check_covers_every_precision_and_the_default_for_bf16_inputs(monkeypatch):
    """bench_memory_scan's whole-scan check (on a GPU: each operand precision with and without the memory MLP kernel,
    then the default setting for bf16 inputs, which takes bf16 NS) runs at a small size; on CPU every row is the
    PyTorch path, so all pass, and the setting it found is restored."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    monkeypatch.setattr(dispatch, "_ns_precision", "ieee")
    rows = bench_memory_scan.check_memory_scan(torch.device("cpu"), batch=1, length=128, heads=2, dh=8)
    names = [name.split(" (")[0] for name, _, _ in rows]
    assert names[:9] == ["memory_scan token PyTorch fp32, eager", "memory_scan token PyTorch fp32, CUDA graphs",
                         *(f"memory_scan token {p}{m}" for p in ("ieee", "tf32", "bf16") for m in ("", " +mlp kernel")),
                         "memory_scan token default, bf16 inputs"]
    assert names[17:] == ["memory_scan chunk default, bf16 inputs",
                          "memory_scan chunk default +muon kernel, bf16 inputs"]
    assert len(rows) == 19 and rows[8][2] == rows[17][2] == rows[18][2] == 5e-2  # bf16 NS: the bf16 bound
    assert all(err <= bound for _, err, bound in rows), rows
    assert dispatch.settings()[1] == "ieee"


def test_bench_checks_every_precision_the_dispatcher_can_choose(monkeypatch):
    """The bench's GPU checks cover exactly the operand precisions each fast path can be given, under every setting
    (the NS check once lost bf16, the new default, when the MLP kernel's list dropped it)."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    ns, mlp = set(), set()
    for setting in dispatch.NS_PRECISION_SETTINGS:
        monkeypatch.setattr(dispatch, "_ns_precision", setting)
        ns |= {dispatch.ns_precision(True), dispatch.ns_precision(False)}
        mlp.add(dispatch.memory_mlp_precision())
    assert set(bench_memory_scan.NS_PRECISIONS_CHECKED) == ns
    assert set(bench_memory_scan.MLP_PRECISIONS_CHECKED) == mlp


def test_memory_mlp_bench_runs_every_setting_and_prints_its_table_last(capsys):
    """CPU smoke run of `bench_memory_mlp.py --sweep` (interpreted kernel, tiny shapes): a crash or a launch setting
    that the benchmark cannot apply is found here, not on the GPU. Every row times both columns, and every kernel row
    agrees with PyTorch's pass (the error column)."""
    bench = load_benchmark("bench_memory_mlp")

    assert bench.main(["--sweep", "--precision", "ieee"]) == 0
    *table, best = capsys.readouterr().out.split("== memory MLP token pass")[-1].splitlines()[2:]
    assert len(table) == 2 * (2 + len(bench.MLP_SWEEP))
    for line in table:
        assert "Error" not in line, line
        assert float(line.split()[-1]) < 1e-4, line
    assert best.removeprefix("best setting: ") in ["default", *(name for name, _ in bench.MLP_SWEEP)]
