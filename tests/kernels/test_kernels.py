"""The Triton kernels against the PyTorch path of atlas_train.ops, under the Triton CPU interpreter, in float64; and
their Hopper resources, compiled offline in a separate process (benchmarks/kernel_resources.py).

tests/conftest.py sets TRITON_INTERPRET before anything imports Triton, so the kernels run in its CPU interpreter.
Production dispatch only takes CUDA tensors, so the other tests in this process keep running the PyTorch path; here
the kernels are called directly, or swapped into the scan by monkeypatching.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import atlas_train.kernels.newton_schulz_kernel as ns_kernel
import atlas_train.kernels.triton_common as triton_common
from atlas_train.kernels import (
    newton_schulz,
    newton_schulz_or_none,
    newton_schulz_unsupported,
    note_fallback,
    set_ns_precision,
)
from atlas_train.kernels.newton_schulz_cublas import newton_schulz as cublas_newton_schulz
from atlas_train.kernels.triton_common import as_operand
from atlas_train.ops import memory_scan, muon_step, scan_chunks
from atlas_train.ops.newton_schulz import newton_schulz as ns_torch
from benchmark_scripts import BENCHMARKS, load_benchmark
from kernel_variants import force_ns_variant

ns_rounding = load_benchmark("ns_rounding")



def _ns_pair(shape, steps, seed):
    """Output and input gradient of the kernel and of the PyTorch path for one random S and upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda t: newton_schulz(t, steps, "ieee"), lambda t: ns_torch(t, steps)):
        leaf = s.clone().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        results.append((out.detach(), grad))
    return results


@pytest.mark.parametrize("shape", [(2, 3, 4, 24), (2, 24, 5), (3, 16, 16), (1, 20, 70)])
@pytest.mark.parametrize("steps", [1, 5])
def test_newton_schulz_matches_pytorch_path(shape, steps):
    (y, g), (y_ref, g_ref) = _ns_pair(shape, steps, seed=steps * 100 + shape[-1])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["registers", "stream", "scratch"])
@pytest.mark.parametrize("shape", [(2, 40, 20), (1, 20, 70), (1, 33, 50)])
def test_newton_schulz_large_matrix_variants_match_pytorch_path(monkeypatch, variant, shape):
    """The column-streamed variants that large matrices take on the GPU, forced at tiny sizes."""
    force_ns_variant(monkeypatch, variant, shape)
    (y, g), (y_ref, g_ref) = _ns_pair(shape, 3, seed=7)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def _to_tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to nearest (ties to even) at tf32's 11 significant bits, by frexp: a reference independent of the
    kernels' bit arithmetic."""
    mantissa, exponent = torch.frexp(t.double())
    return torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent).to(t.dtype)


@triton.jit
def _round_kernel(X, Y, n, PRECISION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(Y + offsets, as_operand(tl.load(X + offsets, mask=offsets < n), PRECISION), mask=offsets < n)


def test_as_operand_rounds_to_nearest_even_like_the_tensor_cores_see_it():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 10
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    finite = x.isfinite()
    for precision, reference in (("tf32", _to_tf32(x)), ("bf16", x.bfloat16().float()), ("ieee", x)):
        y = torch.empty_like(x)
        _round_kernel[(1,)](x, y, x.numel(), precision, x.numel())
        assert torch.equal(y[finite], reference[finite]), precision
        assert y[0].isnan() and torch.equal(y[1:4], x[1:4]), precision
        if precision != "ieee":
            assert (y != x).float().mean() > 0.9  # it did round


@pytest.mark.parametrize("variant", ["registers", "stream", "scratch"])
def test_newton_schulz_in_tf32_rounds_like_the_emulation(monkeypatch, variant):
    """With tf32 operands every variant, forward and backward, rounds each product's operands to nearest (not by
    truncation, as Hopper's tf32 `tl.dot` would) and each Gram matrix A = XXᵀ once, one value for both bA and A²
    (kernels/newton_schulz_kernel.py says why): the interpreter multiplies exactly in float32, so the kernel's results
    must follow benchmarks/ns_rounding.py's emulation of that arithmetic more closely than the exact chain. Not to
    float32 precision: a different accumulation order tips some roundings the other way, and NS's slope at small
    singular values (a ≈ 3.4 per step) spreads them; at three steps the kernel's distance to the emulation is
    1e-4 (registers, stream) to 0.3 (scratch) of its distance to the exact chain, and 2.8 without operand rounding."""
    shape = (1, 33, 50)
    force_ns_variant(monkeypatch, variant, shape)
    monkeypatch.setattr(ns_rounding, "STEPS", 3)
    monkeypatch.setattr(triton_common, "INTERPRETED", False)  # launch with 'tf32' (the interpreter's dot ignores it)
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(shape, generator=gen, dtype=torch.float64)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda t: ns_kernel._ns_saving_op(t.float(), ns_rounding.STEPS, "tf32")[0].double(),
               lambda t: ns_torch(t, ns_rounding.STEPS)):
        leaf = s.clone().requires_grad_()
        out = fn(leaf)
        results.append((out.detach(), *torch.autograd.grad(out, leaf, upstream)))
    kernel, exact = results
    emulated = ns_rounding.emulated_ns(s.float(), upstream.float(), ns_rounding.OPERANDS["tf32"], "rounded A")
    for got, near, far in zip(kernel, emulated, exact):
        assert torch.linalg.norm(got - far) > 1e-4 * torch.linalg.norm(far)  # the rounding is visible
        assert torch.linalg.norm(got - near.double()) < 0.5 * torch.linalg.norm(got - far)


def test_newton_schulz_zero_matrix_and_identity_steps():
    s = torch.zeros(2, 3, 5, dtype=torch.float64)
    s[1] = torch.randn(3, 5, dtype=torch.float64)
    upstream = torch.randn_like(s)
    grads = []
    for fn in (lambda t: newton_schulz(t, 2, "ieee"), lambda t: ns_torch(t, 2)):
        leaf = s.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf), leaf, upstream)
        grads.append(grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-6)
    assert newton_schulz(s, 0) is s


def test_newton_schulz_gradcheck():
    s = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: newton_schulz(t, 2, "ieee"), (s,), eps=1e-6, atol=1e-6)


def test_unsupported_inputs_are_refused_with_a_reason():
    assert "short side" in newton_schulz_unsupported(torch.zeros(2, 260, 300))
    assert "dtype" in newton_schulz_unsupported(torch.zeros(2, 4, 8, dtype=torch.float16))
    assert "precision" in newton_schulz_unsupported(torch.zeros(2, 4, 8), precision="fp8")
    with pytest.raises(ValueError, match="short side"):
        newton_schulz(torch.zeros(1, 260, 260), 2)
    with pytest.raises(ValueError, match="precision"):
        set_ns_precision("fp8")


def test_dispatch_leaves_cpu_tensors_to_pytorch_and_notes_fallbacks_once(caplog):
    assert newton_schulz_or_none(torch.randn(2, 4, 8), 2) is None
    with caplog.at_level(logging.WARNING, logger="atlas_train.kernels.dispatch"):
        for _ in range(3):
            note_fallback("Newton-Schulz", "test reason 1234")
    assert sum("test reason 1234" in r.getMessage() for r in caplog.records) == 1


def _scan_inputs(update, gated, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length, heads, dim, dv, hid, window = 1, 7, 2, 6, 4, 8, 3

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    def gate(*shape, low=0.0, high=1.0):
        return (low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    params = {"W1": rand(heads, dv, hid, scale=0.3), "W2": rand(heads, hid, dim, scale=0.3),
              "ln_weight": gate(heads, dv, low=0.5, high=1.5), "ln_bias": rand(heads, dv, scale=0.1)}
    if gated:
        params["W3"] = rand(heads, hid, dim, scale=0.3)
    tensors = dict(zq=rand(batch, length, heads, dim), zk=rand(batch, length, heads, dim),
                   v=rand(batch, length, heads, dv), alpha=gate(batch, length, heads, low=0.8),
                   eta=gate(batch, length, heads, high=0.2), theta=gate(batch, length, heads, high=0.9),
                   gamma=gate(batch, length, heads, window))
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    doc_start[0, 5] = True
    return tensors, params, doc_start


FAST_NEWTON_SCHULZ = {"triton": newton_schulz, "cublas": cublas_newton_schulz}


def _scan_grads(update, gated, impl, monkeypatch):
    tensors, params, doc_start = _scan_inputs(update, gated, seed=3)
    calls = []
    use_kernel = impl is not None
    if use_kernel:
        def kernel_ns(s, steps, half_inputs):
            calls.append(s.shape)
            return FAST_NEWTON_SCHULZ[impl](s, steps, "ieee")

        monkeypatch.setattr(scan_chunks, "newton_schulz", kernel_ns)  # the token update's
        monkeypatch.setattr(muon_step, "newton_schulz", kernel_ns)  # the chunk update's (unfused Muon step)
    y, state = memory_scan(**tensors, params=params, doc_start=doc_start, chunk_size=4, ns_steps=2, update=update)
    forward_calls = len(calls)
    leaves = list(tensors.values()) + list(params.values())
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=y.dtype)
    loss = (y * upstream).sum() + sum(t.sum() for k, t in state.items() if k.startswith(("fast.", "anchor.")))
    grads = torch.autograd.grad(loss, leaves)  # the scan's backward recomputes chunks: still through the kernel
    monkeypatch.undo()
    assert (forward_calls > 0 and len(calls) > forward_calls) == use_kernel
    return [y.detach()] + list(grads)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("update,gated", [("token", False), ("token", True), ("chunk", False)])
def test_memory_scan_with_fast_newton_schulz_matches_pytorch_path(update, gated, impl, monkeypatch):
    """Each fast NS inside the whole scan: same y, same gradients for every input and initial fast weight."""
    with_kernel = _scan_grads(update, gated, impl, monkeypatch)
    reference = _scan_grads(update, gated, None, monkeypatch)
    for got, want in zip(with_kernel, reference):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_probe_reports_an_implementation_that_cannot_run(impl, monkeypatch):
    """A kernel that fails to compile or launch on a GPU must become a fallback reason, not a crash."""
    from atlas_train.kernels import dispatch

    assert dispatch._probe_newton_schulz(impl, torch.randn(2, 4, 8, dtype=torch.float64), 2, "ieee") is None

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory\nmore detail")

    monkeypatch.setattr(dispatch, "_fast_forward_backward", broken)
    reason = dispatch._probe_newton_schulz(impl, torch.randn(2, 5, 9, dtype=torch.float64), 2, "ieee")
    assert reason == f"{impl} failed to run: RuntimeError: out of resource: shared memory"


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("corrupt", ["output", "gradient", "nan"])
def test_probe_rejects_an_implementation_that_computes_wrong_numbers(impl, corrupt, monkeypatch):
    """A kernel that runs but is wrong (a miscompile) must become a fallback reason: the probe checks its numbers
    against the float64 PyTorch path, output and gradient."""
    from atlas_train.kernels import dispatch

    real = dispatch._fast_forward_backward

    def wrong(impl, one, steps, upstream, precision):
        out, grad = real(impl, one, steps, upstream, precision)
        if corrupt == "nan":
            return out, grad * float("nan")
        return (out * 1.05, grad) if corrupt == "output" else (out, grad * 1.05)

    monkeypatch.setattr(dispatch, "_fast_forward_backward", wrong)
    monkeypatch.setattr(dispatch, "_probed", {})  # each case probes afresh: a cached verdict would hide a NaN's
    reason = dispatch._probe_newton_schulz(impl, torch.randn(2, 6, 10, dtype=torch.float64), 2, "ieee")
    assert reason is not None and reason.startswith(f"{impl} disagrees with the PyTorch path"), reason


def test_probe_draws_its_random_inputs_only_on_the_first_call(monkeypatch):
    """Every later call of a shape (the hot path, also inside CUDA graph capture) must leave the RNG alone: a draw
    there would shift the random stream the model's own sampling sees."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_probed", {})
    s = torch.randn(2, 5, 7, dtype=torch.float64)
    assert dispatch._probe_newton_schulz("triton", s, 2, "ieee") is None
    state = torch.get_rng_state()
    assert dispatch._probe_newton_schulz("triton", s, 2, "ieee") is None
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_probe_saves_nothing_for_autograd(impl):
    """The probe may run inside a checkpointed forward: tensors it saved would break the recomputation's count."""
    from atlas_train.kernels import dispatch

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        assert dispatch._probe_newton_schulz(impl, torch.randn(2, 3, 7, dtype=torch.float64), 2, "ieee") is None
    assert saved == []


def test_dispatch_rule_gives_short_sides_above_64_to_cublas_unless_bf16_fills_the_card():
    """The fixed rule (timed, see dispatch): the Triton kernel up to a short side of 64, cuBLAS above; in bf16 the
    kernel up to 128 from about one matrix per SM (7/8 of the 132 SMs assumed off a GPU: B·H = 128 chains qualify,
    B·H = 16 do not)."""
    from atlas_train.kernels import dispatch

    def many(count, rows, cols):  # a batch of matrices without the memory
        return torch.zeros(1, rows, cols).expand(count, rows, cols)

    for precision in ("tf32", "bf16"):
        assert dispatch._candidates(torch.zeros(4, 64, 256), precision) == ("triton", "cublas")
        assert dispatch._candidates(torch.zeros(4, 512, 64), precision) == ("triton", "cublas")
        assert dispatch._candidates(torch.zeros(4, 256, 128), precision) == ("cublas",)
        assert dispatch._candidates(many(1024, 512, 256), precision) == ("cublas",)
    assert dispatch._candidates(many(1024, 256, 128), "tf32") == ("cublas",)
    assert dispatch._candidates(many(128, 256, 128), "bf16") == ("triton", "cublas")
    assert dispatch._candidates(many(115, 128, 512), "bf16") == ("cublas",)
    assert dispatch._candidates(many(16, 256, 128), "bf16") == ("cublas",)
    assert dispatch._unsupported("cublas", torch.zeros(4, 256, 128), "tf32") is None
    assert "dtype" in dispatch._unsupported("cublas", torch.zeros(4, 8, 8, dtype=torch.float16), "tf32")


def _resources(*args, before=""):
    """Run benchmarks/kernel_resources.py with `args` (compiler, not interpreter: a fresh process without
    TRITON_INTERPRET), after the statement `before` (a change to a kernel's launch constants) in the same process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(BENCHMARKS / "kernel_resources.py")
    run = f"import runpy, sys; sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", f"{before}\n{run}"], env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_scan_shape_fits_hopper_shared_memory():
    """Each launch the kernels make for the scan's shapes (Newton–Schulz, the memory MLP's token pass, the token
    momenta, the fused Muon step), compiled offline for sm_90, fits 232448 B."""
    done = _resources()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "152 kernels, 0 over the 232448 B" in done.stdout


def test_shared_memory_check_fails_on_a_kernel_that_does_not_fit():
    """Mutation: Triton's default three pipeline stages overflow Hopper's shared memory on this shape's backward
    (320 KiB)."""
    done = _resources("--shapes", "128x256", "--precisions", "tf32", "--kernels", "ns",
                      before="import atlas_train.kernels.newton_schulz_kernel as ns\n"
                             "ns.NUM_STAGES = {'forward': 3, 'backward': 3}")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "backward scratch" in done.stdout and "> H100 limit" in done.stdout


def test_ns_only_bench_runs_and_prints_its_table_last(capsys):
    """CPU smoke run of `bench_memory_scan.py --ns-only` (interpreted kernel, tiny matrices): a crash found here
    does not cost GPU time."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    with torch.random.fork_rng():  # the bench seeds the global generator afresh
        assert bench_memory_scan.main(["--ns-only", "--skip-checks", "--dh", "4"]) == 0
    table = capsys.readouterr().out.split("== Newton-Schulz alone")[-1].splitlines()[1:]
    assert [line.split()[:3] for line in table] == [["cuBLAS", "bf16", "bmm"], ["kernel", "ieee", "4x16"],
                                                    ["NS", "on", "cuBLAS"],
                                                    ["cuBLAS", "bf16", "bmm"], ["kernel", "ieee", "16x8"],
                                                    ["NS", "on", "cuBLAS"]]
    assert all("TFLOP/s" in line and "Error" not in line for line in table)


def test_profile_mode_lists_the_costliest_ops_of_each_update(capsys):
    """CPU smoke run of `bench_memory_scan.py --profile` (the GPU call that attributes a step's time must not crash),
    at two sequences per call as `gpu_single.sh scan-batch` asks, with its roofline summary."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    with torch.random.fork_rng():
        args = ["--profile", "3", "--skip-checks", "--dh", "8", "--lengths", "64", "--batch", "2"]
        assert bench_memory_scan.main(args) == 0
    out = capsys.readouterr().out
    for update in ("token", "chunk"):
        table = out.split(f"== profile: scan {update}, T=64 dh=8:")[1].split("==\n")[1].splitlines()[:3]
        assert len(table) == 3 and all(line.split()[0].endswith("%") for line in table), out[-2000:]
    assert out.count("roofline: matmuls ") == 2 and "copy bandwidth: " in out  # one summary per update


def test_count_ops_mode_counts_fewer_operators_per_chunk_with_the_memory_mlp_kernel(capsys):
    """CPU run of `bench_memory_scan.py --count-ops` (update=chunk, two chunks): the fast paths go in as a GPU's
    dispatch would put them; the memory MLP kernel replaces its passes' many operators with one call each way, and
    the fused Muon step the step's, each moving fewer bytes (no intermediates in memory)."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    args = ["--count-ops", "--skip-checks", "--updates", "chunk", "--dh", "8", "--lengths", "128"]
    with torch.random.fork_rng():
        assert bench_memory_scan.main(args) == 0
    table = capsys.readouterr().out.split("== operators and bytes per chunk: T=128 dh=8 chunk=64")[1].splitlines()[2:5]
    rows = [line.split() for line in table]
    assert [row[:2] for row in rows] == [["chunk", "PyTorch"], ["chunk", "mlp"], ["chunk", "mlp+muon"]]
    for before, after in zip(rows, rows[1:]):
        assert all(float(a) < float(b) for a, b in zip(after[2:], before[2:], strict=True)), table  # ops and bytes


def test_op_counter_counts_a_kernel_launcher_as_one_operator():
    """A Triton launcher that is not a torch custom op (the dual attention kernel's) dispatches bookkeeping ops of its
    own (and the interpreter's host copies): wrapped by `OpCounter.kernel`, it counts as one operator moving its
    tensor arguments and results once, like a custom op; the ops around it still count one each."""
    bench_memory_scan = load_benchmark("bench_memory_scan")
    x, y = torch.ones(4, 8), torch.ones(8, 2)

    def launcher(a, b):
        scratch = torch.empty_like(a).copy_(a)
        return (scratch * 2.0) @ b

    counter = bench_memory_scan.OpCounter()
    with counter:
        out = counter.kernel(launcher)(x, y)
        out.add(1.0)
    assert counter.count == 2
    assert counter.bytes == 4 * (32 + 16 + 8) + 4 * (8 + 8)


def test_dual_bench_counts_operators_and_bytes_per_chunk(capsys):
    """`bench_dual_scan.py --count-ops` on the CPU (tiny shapes, interpreted kernel): a row of positive counts."""
    bench = load_benchmark("bench_dual_scan")
    with torch.random.fork_rng():
        assert bench.main(["--smoke", "--count-ops"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert len(row) == 4 and all(float(n) > 0 for n in row), row


def test_bench_sets_the_timed_precision_and_the_triton_threshold(capsys, monkeypatch):
    """`--ns-precision` and `--triton-max-short-side` reach the dispatcher (for timing bf16 NS routed to the kernel)."""
    bench_memory_scan = load_benchmark("bench_memory_scan")

    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "TRITON_MAX_SHORT_SIDE", dispatch.TRITON_MAX_SHORT_SIDE)  # restored afterwards
    monkeypatch.setattr(dispatch, "TRITON_MAX_SHORT_SIDE_BF16_MANY", dispatch.TRITON_MAX_SHORT_SIDE_BF16_MANY)
    monkeypatch.setattr(dispatch, "_ns_precision", dispatch._ns_precision)
    args = ["--profile", "1", "--skip-checks", "--updates", "chunk", "--dh", "8", "--lengths", "64",
            "--ns-precision", "bf16", "--triton-max-short-side", "256"]
    with torch.random.fork_rng():
        assert bench_memory_scan.main(args) == 0
    assert (dispatch.TRITON_MAX_SHORT_SIDE, dispatch.TRITON_MAX_SHORT_SIDE_BF16_MANY, dispatch.settings()[1]) == (
        256, 256, "bf16")


def test_probes_run_under_inference_mode(monkeypatch):
    """A model served under torch.inference_mode reaches the probes on its first call: they differentiate, so they
    leave inference mode for their own inputs. Before, the NS probe raised there and the cuBLAS one fell back."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_probed", {})
    monkeypatch.setattr(dispatch, "_ns_precision", "ieee")
    weights = [torch.randn(1, 1, *shape, dtype=torch.float64) * 0.3 for shape in ((4, 8), (8, 8))]
    ln = {"ln_weight": torch.ones(1, 4, dtype=torch.float64), "ln_bias": torch.zeros(1, 4, dtype=torch.float64)}
    with torch.inference_mode():
        s = torch.randn(2, 8, 24, dtype=torch.float64)
        assert dispatch._probe_newton_schulz("triton", s, 3, "ieee") is None
        assert dispatch._probe_newton_schulz("cublas", s, 3, "ieee") is None
        z = torch.randn(1, 1, 4, 8, dtype=torch.float64)
        assert dispatch._probe_memory_mlp(*weights, z, ln, True, "l2") is None


def test_ns_precision_follows_the_model_dtype_unless_set(monkeypatch):
    """'auto' (the default): bf16 NS operands for a half-precision model, tf32 otherwise, the memory MLP kernel in tf32;
    a set precision holds for both. The fast path is called in the resolved precision (its probe found it right)."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_ns_precision", "auto")
    assert (dispatch.ns_precision(True), dispatch.ns_precision(False), dispatch.memory_mlp_precision()) == (
        "bf16", "tf32", "tf32")
    s = torch.randn(2, 8, 24)
    calls = []
    monkeypatch.setattr(dispatch, "newton_schulz", lambda t, steps, precision: calls.append(precision) or t)
    monkeypatch.setattr(dispatch, "_probed", {("triton", (8, 24), s.dtype, s.device, p, 2): None
                                              for p in ("bf16", "tf32", "ieee")})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    for half in (True, False):
        assert dispatch.newton_schulz_or_none(s, 2, half) is s
    monkeypatch.setattr(dispatch, "_ns_precision", "ieee")
    for half in (True, False):
        assert dispatch.newton_schulz_or_none(s, 2, half) is s
    assert calls == ["bf16", "tf32", "ieee", "ieee"]


@pytest.mark.parametrize("enabled,setting,half,want", [
    (True, "auto", True, "tf32"), (True, "auto", False, "ieee"), (True, "bf16", False, "tf32"),
    (True, "tf32", True, "ieee"), (True, "ieee", True, "ieee"), (False, "auto", True, "ieee")])
def test_scan_products_take_tf32_where_newton_schulz_takes_bf16(enabled, setting, half, want, monkeypatch):
    """The scan's own float32 products (cuBLAS) on the GPU: tf32 operands where NS runs in bf16 (whose bound has
    room for them), exact float32 under a tf32 or ieee NS and with the fast paths off (the baselines' PyTorch path)."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_enabled", enabled)
    monkeypatch.setattr(dispatch, "_ns_precision", setting)
    assert dispatch.scan_product_precision(half) == want
    with dispatch.scan_products(half):
        assert torch.backends.cuda.matmul.allow_tf32 == (want == "tf32")


@pytest.mark.parametrize("enabled,setting,half,want", [
    (True, "auto", True, "bf16"), (True, "auto", False, "ieee"), (True, "bf16", False, "bf16"),
    (True, "tf32", True, "ieee"), (False, "auto", True, "ieee")])
def test_dual_attention_takes_bf16_where_newton_schulz_does(enabled, setting, half, want, monkeypatch):
    """The dual scan's attention passes: bf16 products in a half-precision model (the precision its GPU error check
    and timings use), exact float32 otherwise."""
    from atlas_train.kernels import dispatch

    monkeypatch.setattr(dispatch, "_enabled", enabled)
    monkeypatch.setattr(dispatch, "_ns_precision", setting)
    assert dispatch.dual_attention_precision(half) == want


_MATMUL_SETTINGS = {  # how a caller may have set the TF32 switch before calling the scan (PyTorch's two APIs)
    "default": lambda: None,
    "legacy allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "legacy precision 'medium'": lambda: torch.set_float32_matmul_precision("medium"),
    "new API, cuda matmul ieee": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
    "new API, cuda matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
}


def _matmul_state():
    def readable(read):
        try:
            return read()
        except RuntimeError:  # PyTorch refuses to read the legacy value after a mix of the two APIs
            return "unreadable"

    return (readable(torch.get_float32_matmul_precision), torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision, torch.backends.fp32_precision)


@pytest.fixture
def matmul_settings_restored():
    matmul, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = torch.get_float32_matmul_precision(), matmul.fp32_precision, mkldnn.fp32_precision
    yield
    torch.set_float32_matmul_precision(saved[0])
    matmul.fp32_precision, mkldnn.fp32_precision = saved[1:]


@pytest.mark.parametrize("caller", list(_MATMUL_SETTINGS))
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_cublas_precision_works_under_either_tf32_api_and_restores_the_callers(caller, precision,
                                                                             matmul_settings_restored):
    """Inside the block cuBLAS's switch is readable and as asked, whichever of PyTorch's two APIs the caller used (a
    read of `allow_tf32` raises after the new API alone); after it the caller's settings are back, except that a
    mix of the two APIs, which makes cuBLAS raise on float32 products, may come back consistent."""
    from atlas_train.kernels.newton_schulz_cublas import cublas_precision

    _MATMUL_SETTINGS[caller]()
    before = _matmul_state()
    with cublas_precision(precision):
        assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")
    after = _matmul_state()
    if before[0] == "unreadable":
        assert after[1:] == before[1:]
    else:
        assert after == before


def test_bf16_keeps_gram_matrices_up_to_128_in_registers_both_ways():
    """Faster on the GPU (kernels/newton_schulz_kernel.py); tf32 operands stay on the scratch variant."""
    s = torch.zeros(2, 256, 128)
    for backward in (False, True):
        assert ns_kernel.launch_layout(s, "bf16", backward).variant == "stream"
        assert ns_kernel.launch_layout(s, "tf32", backward).variant == "scratch"
    assert ns_kernel.launch_layout(torch.zeros(2, 512, 256), "bf16").variant == "scratch"


def test_backward_allocates_no_gradient_for_the_saved_iterates():
    """The iterates are a non-differentiable output of the saving forward: autograd must not fill a zero tensor of
    their size (steps x the input) for them in every backward (a 5 x 1024 x 256 x 128 float32 fill per chunk at dh 64
    of the token update)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("zeros", "zeros_like", "new_zeros", "fill_", "zero_"):
                self.shapes.append(tuple(out.shape))
            return out

    s = torch.randn(4, 8, 24, dtype=torch.float64, requires_grad=True)
    out = newton_schulz(s, 3, "ieee")
    iterates_shape = ns_kernel._iterates_layout(s, 3, "ieee")[0]
    with ZeroFills() as fills:
        (grad,) = torch.autograd.grad(out, s, torch.ones_like(out))
    assert iterates_shape not in fills.shapes, fills.shapes
    assert torch.isfinite(grad).all()
