"""memory_scan on one device: correctness of the Triton kernels first, then forward+backward speed.

    python benchmarks/bench_memory_scan.py            # on one GPU: checks, then T = 4K/16K/64K, dh 64/128
    python benchmarks/bench_memory_scan.py --quick    # T = 4K, dh 64 only (on CPU: tiny sizes, a smoke run)
    python benchmarks/bench_memory_scan.py --dh 128 --skip-checks   # split a long run over two commands
    python benchmarks/bench_memory_scan.py --ns-only  # Newton-Schulz alone: Triton kernel, cuBLAS, torch.compile
    python benchmarks/bench_memory_scan.py --ns-only --ns-sweep   # + the NS kernel's launch heuristics compared
    python benchmarks/bench_memory_scan.py --profile 20 --dh 64 --lengths 4096   # where a step's device time goes
    python benchmarks/bench_memory_scan.py --count-ops --skip-checks --dh 16 --lengths 128   # launches per chunk

1. Checks (fresh random inputs, seed printed): both fast Newton–Schulz paths (Triton kernel, cuBLAS), the memory
   MLP kernel's token pass and the token momenta kernel against a float64 PyTorch reference, per operand precision,
   outputs and gradients; then
   the whole memory_scan with the fast paths (without and with the memory MLP kernel) against the float64
   PyTorch path (GPU only: the dispatch takes CUDA tensors). Relative error bounds per precision; NaN never passes.
2. Speed (B·H = 16, or 16 × --batch, hid = 4·dh, D = 2·dh as with the default sketch map, c = 64, chunk 64): memory_scan
   update=token and chunk with the kernels, the PyTorch path compiled with torch.compile (per-chunk step compiled,
   kernels off), and SDPA causal attention (cuDNN backend on GPU) with the same heads (Newton–Schulz alone:
   --ns-only). TFLOP/s against a measured bf16 matmul ceiling; peak memory the row itself allocated (above what
   was allocated when it began, so tensors the checks or earlier rows leave behind do not count). Every row is
   guarded (an OOM or error is printed in its row), rows predicted to exceed --row-budget-s are skipped, the table
   comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import sys
import time
import traceback
from unittest import mock

import torch

if not torch.cuda.is_available():  # CPU smoke run: the kernels run in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from atlas_train import kernels  # noqa: E402
from atlas_train.kernels import dispatch as kernel_dispatch  # noqa: E402
from atlas_train.kernels import memory_mlp_kernel  # noqa: E402
from atlas_train.kernels.dispatch import (  # noqa: E402
    MEMORY_MLP_KERNEL,
    MUON_STEP_KERNEL,
    PROBE_TOLERANCE,
    memory_mlp_pass_results,
    memory_mlp_refusal,
    muon_step_results,
    noted_fallbacks,
    random_memory_mlp_pass,
    random_muon_step,
    random_token_momenta,
    relative_error,
    settings,
    token_momenta_results,
)
from atlas_train.ops import chunked_scan, memory_scan, muon_step, scan_chunks  # noqa: E402
from atlas_train.ops.cuda_graphs import clear_scan_graphs, forced_scan_mode  # noqa: E402

logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break chatter would bury the table
NS_STEPS, WINDOW, CHUNK, HEADS = 5, 64, 64, 16
BOUNDS = PROBE_TOLERANCE  # relative L2 error vs float64, outputs and gradients, per NS operand precision
# What the checks cover on a GPU: every operand precision the dispatcher can give each path (`ns_precision`,
# `memory_mlp_precision`; a test keeps these in step with it).
NS_PRECISIONS_CHECKED = ("ieee", "tf32", "bf16")
MLP_PRECISIONS_CHECKED = ("ieee", "tf32")
MOMENTA_PRECISIONS_CHECKED = ("ieee", "tf32")  # `scan_product_precision`'s
CHECK_GROUPS = ("ns", "mlp", "momenta", "muon", "scan")


def worst_of(got, want) -> tuple[int, float]:
    """(index, relative L2 error) of the worst of a path's results against the reference's, NaN first."""
    errs = [relative_error(g, w) for g, w in zip(got, want, strict=True)]
    worst = max(range(len(errs)), key=lambda i: errs[i] if math.isfinite(errs[i]) else math.inf)
    return worst, errs[worst]


def checked(rows: list, name: str, err: float, bound: float) -> None:
    """Add a check's row and print it at once: a run cut short by its time limit still shows the checks it made."""
    rows.append((name, err, bound))
    print(f"  checked {name}: {err:.2e} (bound {bound:.0e})", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, reps):
    """Median wall time of fn() over reps runs (after the caller's warm-up), in seconds."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_ceiling(device):
    """Measured dense matmul throughput (bf16 on GPU, fp32 on CPU), TFLOP/s."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / time_fn(lambda: a @ b, device, 10) / 1e12


def copy_bandwidth(device):
    """Measured memory bandwidth of a large device copy (read + write), GB/s: the byte roof of --profile's ops."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    a = torch.empty(n, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * 4 * n / time_fn(lambda: b.copy_(a), device, 10) / 1e9


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm")


def op_bytes(name: str, shapes) -> int:
    """Bytes an op must move at least, at 4 per element (the scan computes in float32): its tensor inputs, plus its
    output unless it writes in place (a trailing underscore) — a matmul's product, else the largest input's size.
    An estimate for a roofline, not a measurement."""
    sizes = [math.prod(s) for s in shapes if s]
    if not sizes:
        return 0
    if name in MATMUL_OPS:
        a, b = [s for s in shapes if len(s) >= 2][-2:]
        out = math.prod(a[:-1]) * b[-1]
    else:
        out = 0 if name.endswith("_") else max(sizes)
    return 4 * (sum(sizes) + out)


def ns_reference(s, steps):
    """Float64 Newton–Schulz by the PyTorch path (kernels never take float64 CPU copies)."""
    from atlas_train.ops.newton_schulz import newton_schulz
    return newton_schulz(s.double().cpu(), steps)


def check_ns_paths(device, sizes):
    """Both fast NS implementations (Triton kernel, cuBLAS chain) per precision against float64, y and dS."""
    from atlas_train.kernels import newton_schulz_cublas

    implementations = {"kernel": kernels.newton_schulz, "cuBLAS": newton_schulz_cublas.newton_schulz}
    rows = []
    precisions = NS_PRECISIONS_CHECKED if device.type == "cuda" else ("ieee",)
    for shape in sizes:
        s = torch.randn(shape, device=device)
        upstream = torch.randn(shape, device=device)
        ref_in = s.double().cpu().requires_grad_()
        ref_out = ns_reference(ref_in, NS_STEPS)
        (ref_grad,) = torch.autograd.grad(ref_out, ref_in, upstream.double().cpu())
        for (impl, ns), precision in itertools.product(implementations.items(), precisions):
            leaf = s.clone().requires_grad_()
            out = ns(leaf, NS_STEPS, precision)
            (grad,) = torch.autograd.grad(out, leaf, upstream)
            for what, got, want in (("y", out, ref_out), ("dS", grad, ref_grad)):
                err = relative_error(got.cpu(), want.detach())
                checked(rows, f"NS {impl} {tuple(shape)} {precision} {what}", err, BOUNDS[precision])
    return rows


def make_inputs(batch, length, heads, dh, device, dtype, seed=None):
    """Random memory_scan inputs with gates in their usual ranges; float leaves that require grad."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    dim, hid = 2 * dh, 4 * dh

    def rand(*shape, scale=1.0, low=None, high=None, dt=dtype):
        if low is None:
            t = torch.randn(*shape, generator=gen, device=device) * scale
        else:
            t = low + (high - low) * torch.rand(*shape, generator=gen, device=device)
        return t.to(dt).requires_grad_()

    zq = F.normalize(torch.randn(batch, length, heads, dim, generator=gen, device=device), dim=-1)
    zk = F.normalize(torch.randn(batch, length, heads, dim, generator=gen, device=device), dim=-1)
    tensors = dict(zq=zq.to(dtype).requires_grad_(), zk=zk.to(dtype).requires_grad_(),
                   v=rand(batch, length, heads, dh), alpha=rand(batch, length, heads, low=0.95, high=1.0),
                   eta=rand(batch, length, heads, low=0.0, high=0.05),
                   theta=rand(batch, length, heads, low=0.5, high=0.95),
                   gamma=rand(batch, length, heads, WINDOW, low=0.0, high=1.0))
    params = {"W1": rand(heads, dh, hid, scale=hid**-0.5, dt=torch.float32),
              "W2": rand(heads, hid, dim, scale=dim**-0.5, dt=torch.float32),
              "ln_weight": rand(heads, dh, low=0.8, high=1.2, dt=torch.float32),
              "ln_bias": rand(heads, dh, scale=0.02, dt=torch.float32)}
    return tensors, params


def scan_fwd_bwd(tensors, params, update, upstream=None):
    """One memory_scan forward+backward; returns y and the gradients of every float input."""
    y, _ = memory_scan(**tensors, params=params, chunk_size=CHUNK, ns_steps=NS_STEPS, update=update)
    leaves = list(tensors.values()) + list(params.values())
    grads = torch.autograd.grad(y, leaves, upstream if upstream is not None else torch.ones_like(y))
    return y, grads


def check_mlp_kernel(device, shapes, tokens):
    """The memory MLP kernel's token pass alone per precision against float64 (f, the gradient factors, and the
    gradients of z, W1, W2, v and the LayerNorm), reads and window gradients, at (D, dv, hidden) shapes with HEADS
    heads of `tokens` tokens; one row per pass and precision, its worst result named."""
    names = {False: ["f", "dz", "dW1", "dW2", "dln_w", "dln_b"],
             True: ["f", "g_out", "hidden", "g_pre", "dz", "dW1", "dW2", "dv", "dln_w", "dln_b"]}
    precisions = MLP_PRECISIONS_CHECKED if device.type == "cuda" else ("ieee",)
    rows, setting = [], settings()[1]
    for (dim, dv, hidden), factors in itertools.product(shapes, (False, True)):
        heads = HEADS if device.type == "cuda" else 2
        inputs, upstream, reference, ref_upstream = random_memory_mlp_pass(
            dim, dv, hidden, heads=heads, tokens=tokens, with_ln=True, factors=factors, device=device,
            dtype=torch.float32)
        loss = "l2" if factors else None
        want = memory_mlp_pass_results(**reference, loss=loss, upstream=ref_upstream, kernel=False)
        for precision in precisions:
            kernels.set_ns_precision(precision)
            got = memory_mlp_pass_results(**inputs, loss=loss, upstream=upstream, kernel=True)
            worst, err = worst_of(got, want)
            checked(rows, f"mlp kernel {dim}/{dv}/{hidden} {'factors' if factors else 'read'} {precision} "
                          f"(worst: {names[factors][worst]})", err, BOUNDS[precision])
        kernels.set_ns_precision(setting)
    return rows


def check_momenta_kernel(device, shapes, heads):
    """The token momenta kernel alone per precision against float64 (the momenta and the gradients of mix, left,
    right, scale and prev) at (L, K, out, in) shapes; one row per shape and precision, its worst result named."""
    names = ["M", "dmix", "dleft", "dright", "dscale", "dprev"]
    precisions = MOMENTA_PRECISIONS_CHECKED if device.type == "cuda" else ("ieee",)
    rows = []
    for length, keys, n_out, n_in in shapes:
        inputs = random_token_momenta(length, keys, n_out, n_in, heads=heads, device=device, dtype=torch.float32)
        want = token_momenta_results(*(t.double().cpu() for t in inputs), kernel=False)
        for precision in precisions:
            got = token_momenta_results(*inputs, kernel=True, precision=precision)
            worst, err = worst_of(got, want)
            checked(rows, f"momenta kernel {length}/{keys}/{n_out}x{n_in} {precision} (worst: {names[worst]})", err,
                    BOUNDS[precision])
    return rows


def check_muon_kernel(device, shapes, heads):
    """The fused Muon step kernel alone against float64 (M', A' and the gradients of its nine inputs) at (K, out,
    in) shapes (the first also with a prior gradient sum), in each pair of precisions the dispatcher gives it (G's
    products, NS); one row per case and precision, its worst result named (bound: NS's precision)."""
    names = ["M'", "A'", "dcoef", "dleft", "dright", "dprior", "dM", "dA", "dθ", "ddescent", "ddecay"]
    pairs = [("ieee", "ieee"), ("ieee", "tf32"), ("tf32", "bf16")] if device.type == "cuda" else [("ieee", "ieee")]
    rows = []
    cases = [(shape, False) for shape in shapes] + [(shapes[0], True)]  # a prior sum: one shape is enough
    for (keys, n_out, n_in), prior in cases:
        inputs, upstream = random_muon_step(1, heads, keys, n_out, n_in, prior=prior, device=device,
                                            dtype=torch.float32)
        as64 = [None if t is None else t.double().cpu() for t in inputs]
        want = muon_step_results(as64, [u.double().cpu() for u in upstream], NS_STEPS, kernel=False)
        labels = names if prior else names[:5] + names[6:]
        for product, precision in pairs:
            got = muon_step_results(inputs, upstream, NS_STEPS, kernel=True, product=product, precision=precision)
            worst, err = worst_of(got, want)
            checked(rows, f"muon kernel {keys}/{n_out}x{n_in}{' +prior' if prior else ''} {product}/{precision} "
                          f"(worst: {labels[worst]})", err, BOUNDS[precision])
    return rows


def mlp_kernel_refusals(tensors, params) -> list[str]:
    """Why the memory MLP kernel would not take the scan's passes for these inputs at the current precision (reads,
    and window gradients with the l2 loss), if it would not."""
    z = tensors["zq"].detach().float().transpose(1, 2)
    weights = {w: params[w].detach().unsqueeze(0) for w in ("W1", "W2")}
    ln = {k: params[k].detach() for k in ("ln_weight", "ln_bias")}
    reasons = [memory_mlp_refusal(weights, z, ln, factors=factors, loss="l2" if factors else None)
               for factors in (False, True)]
    return [r for r in reasons if r is not None]


def check_memory_scan(device, updates=("token", "chunk"), batch=2, length=4 * CHUNK, heads=8, dh=64):
    """memory_scan with kernels (each precision, and the default for bf16 inputs) against the float64 PyTorch path
    at a small real shape, for each of `updates`."""
    rows, setting = [], settings()[1]
    for update in updates:
        tensors, params = make_inputs(batch, length, heads, dh, device, torch.float32)
        upstream = torch.randn(batch, length, heads, dh, device=device)
        as64 = lambda d: {k: t.detach().double().requires_grad_() for k, t in d.items()}  # noqa: E731
        with scan_settings(graphs=False, use_kernels=False, compiled=False):  # the reference: plain eager float64
            ref_y, ref_grads = scan_fwd_bwd(as64(tensors), as64(params), update, upstream.double())
        names = ["y"] + [f"d{k}" for k in list(tensors) + list(params)]
        err_by_mode = {}
        for graphs in (False, True):
            with scan_settings(graphs=graphs, use_kernels=False, compiled=False):
                y, grads = scan_fwd_bwd(tensors, params, update, upstream)
            err_by_mode[graphs] = worst_of((y, *grads), (ref_y, *ref_grads))[1]
            checked(rows, f"memory_scan {update} PyTorch fp32, {'CUDA graphs' if graphs else 'eager'} (worst)",
                    err_by_mode[graphs], 1e-3)
        torch_err = err_by_mode[False]
        for precision, mlp_kernel in itertools.product(("ieee", "tf32", "bf16"), (False, True)):
            kernels.set_ns_precision(precision)
            with scan_settings(graphs=True, use_kernels=True, compiled=False, mlp_kernel=mlp_kernel):  # the default
                y, grads = scan_fwd_bwd(tensors, params, update, upstream)
            worst, err = worst_of((y, *grads), (ref_y, *ref_grads))
            bound = max(BOUNDS[precision], 2 * torch_err)  # never asked to beat the fp32 PyTorch path itself
            checked(rows, f"memory_scan {update} {precision}{' +mlp kernel' if mlp_kernel else ''} "
                          f"(worst: {names[worst]})", err, bound)
            if mlp_kernel:  # a kernel that fell back would pass by being absent: why it did fails the check
                rows += [(f"  mlp kernel not used: {reason[:70]}", math.nan, bound)
                         for reason in mlp_kernel_refusals(tensors, params)]
        kernels.set_ns_precision("auto")  # the default, as the timed rows run it: bf16 inputs, so bf16 NS
        half, half_params = make_inputs(batch, length, heads, dh, device, torch.bfloat16)
        with scan_settings(graphs=False, use_kernels=False, compiled=False):
            ref_y, ref_grads = scan_fwd_bwd(as64(half), as64(half_params), update, upstream.bfloat16().double())
        # the default, then (update="chunk") with the fused Muon step, off by default until timed
        for muon_kernel in (False, True) if update == "chunk" else (False,):
            with scan_settings(graphs=True, use_kernels=True, compiled=False, muon_kernel=muon_kernel):
                y, grads = scan_fwd_bwd(half, half_params, update, upstream.bfloat16())
            worst, err = worst_of((y, *grads), (ref_y, *ref_grads))
            checked(rows, f"memory_scan {update} default{' +muon kernel' if muon_kernel else ''}, bf16 inputs "
                          f"(worst: {names[worst]})", err, BOUNDS[kernel_dispatch.ns_precision(True)])
        if update == "chunk":  # a kernel that fell back would pass by being absent: why it did fails the check
            rows += [(f"  muon kernel not used: {reason[:70]}", math.nan, 0.0)
                     for reason in noted_fallbacks(MUON_STEP_KERNEL)]
        kernels.set_ns_precision(setting)
    return rows


def ns_flops(rows, cols, steps):
    """Algorithmic NS flops of one matrix (forward, backward) with m = short side, n = long side."""
    m, n = min(rows, cols), max(rows, cols)
    return (4 * m * m * n + 2 * m**3) * steps, (8 * m * m * n + 6 * m**3) * steps


def scan_flops(length, heads, dh, update):
    """Model flops of memory_scan forward+backward (3x forward; the scan's recomputation is not counted)."""
    dim, hid, dv, keys = 2 * dh, 4 * dh, dh, CHUNK + WINDOW - 1
    weights = dv * hid + hid * dim
    ns = sum(ns_flops(r, c, NS_STEPS)[0] for r, c in ((dv, hid), (hid, dim)))
    # window gradient factors of every key at the anchor, window weights, reads of the chunk's queries
    per_chunk = 2 * keys * (hid * dim + 2 * dv * hid) + 2 * CHUNK * keys * CHUNK + 2 * CHUNK * weights
    if update == "token":  # per-token momenta (outer-product sums), NS of each, per-token weights
        per_chunk += 2 * CHUNK * keys * weights + CHUNK * ns + 2 * CHUNK * CHUNK * weights
    else:  # one summed gradient, one NS
        per_chunk += 2 * keys * weights + ns
    return 3 * per_chunk * heads * (length // CHUNK)


def compiled_chunk_steps():
    """Swap the scan's per-chunk step functions for torch.compile'd ones; returns a restore callback."""
    saved = {name: getattr(chunked_scan, name) for name in ("step_token_update", "step_chunk_update")}
    for name in saved:
        setattr(chunked_scan, name, torch.compile(getattr(scan_chunks, name)))

    def restore():
        for name, fn in saved.items():
            setattr(chunked_scan, name, fn)
    return restore


def scan_variants(on_gpu, quick, first_length):
    """(row name, CUDA graphs, NS kernels, torch.compile'd chunk steps, memory MLP kernel, fused Muon step kernel) of
    the scan rows. The issue's baseline is the compiled PyTorch path (no graphs, no kernels); plain eager only at the
    first length, to show the launch overhead that graphs remove; "graphs-mlp" is the default without the memory MLP
    kernel, "graphs+muon" the default with the fused Muon step (update=chunk; off by default until timed)."""
    if not on_gpu:  # CPU smoke run: compiling the chunk step takes minutes on 2 cores
        return [("eager (cpu)", False, True, False, False, False)] + (
            [] if quick else [("torch.compile", False, False, True, False, False)])
    rows = [("eager", False, True, False, True, False)] if first_length else []
    return rows + [("torch.compile", False, False, True, False, False), ("graphs", True, True, False, True, False),
                   ("graphs+muon", True, True, False, True, True), ("graphs-mlp", True, True, False, False, False),
                   ("graphs+compile", True, True, True, True, False)]


@contextlib.contextmanager
def scan_settings(graphs, use_kernels, compiled, mlp_kernel=True, muon_kernel=False):
    """Run the scan with or without CUDA graphs, NS kernels, compiled chunk steps, the memory MLP kernel and the
    fused Muon step kernel; restores the settings it found."""
    enabled, _, mlp_before, muon_before = settings()
    kernels.set_kernels_enabled(use_kernels)
    kernels.set_memory_mlp_kernel(mlp_kernel)
    kernel_dispatch.set_muon_step_kernel(muon_kernel)
    restore = compiled_chunk_steps() if compiled else (lambda: None)
    clear_scan_graphs()
    try:
        with forced_scan_mode("1" if graphs else "0"):
            yield
    finally:
        restore()
        clear_scan_graphs()
        kernels.set_kernels_enabled(enabled)
        kernels.set_memory_mlp_kernel(mlp_before)
        kernel_dispatch.set_muon_step_kernel(muon_before)


class Bench:
    def __init__(self, device, ceiling, budget_s, row_budget_s):
        self.device, self.ceiling = device, ceiling
        self.deadline = time.monotonic() + budget_s
        self.row_budget_s = row_budget_s
        self.rows = []
        self.first_times = {}  # (impl key) -> (length, seconds) of the smallest T, for the skip prediction

    def run(self, label, shape, make_step, flops, scale_key=None, length=None):
        """Build the step (inputs included), warm up once, time a few repetitions; record time, TFLOP/s and peak
        memory, or the failure, as a row."""
        if time.monotonic() > self.deadline:
            self.rows.append((label, shape, "skipped: total time budget spent"))
            return
        if scale_key in self.first_times:
            base_len, base_s = self.first_times[scale_key]
            predicted = base_s * length / base_len
            if predicted > self.row_budget_s:
                self.rows.append((label, shape, f"skipped: predicted {predicted:.0f} s per step"))
                return
        try:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
            fn = make_step()
            start = time.perf_counter()
            fn()  # warm-up (and compilation)
            sync(self.device)
            warm = time.perf_counter() - start
            reps = max(1, min(5, int(self.row_budget_s / max(warm, 1e-6) / 2)))
            seconds = time_fn(fn, self.device, reps)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if self.device.type == "cuda" else math.nan
            del fn
        except Exception as exc:  # noqa: BLE001 — one failing row must not stop the others
            kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            self.rows.append((label, shape, f"{kind}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"))
            print("".join(traceback.format_exc().splitlines(True)[-6:]), file=sys.stderr)
            return
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if scale_key is not None and scale_key not in self.first_times:
            self.first_times[scale_key] = (length, seconds)
        tflops = flops / seconds / 1e12
        self.rows.append((label, shape, f"{seconds * 1e3:10.2f} ms {tflops:8.3g} TFLOP/s "
                                        f"{100 * tflops / self.ceiling:5.1f}% {peak:7.2f} GiB"))
        print(f"  {label:<34} {shape:<22} {self.rows[-1][2]}", flush=True)


def sdpa_step(length, dh, device, batch=1):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, HEADS, length, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))
    return step


def scan_step(length, dh, update, device, batch=1):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensors, params = make_inputs(batch, length, HEADS, dh, device, dtype, seed=0)

    def step():
        y, _ = memory_scan(**tensors, params=params, chunk_size=CHUNK, ns_steps=NS_STEPS, update=update)
        y.backward(torch.ones_like(y))
    return step


def profile_table(length, dh, update, device, top, batch=1, roofs=None, muon_kernel=False):
    """The `top` kernels, then the `top` PyTorch ops with their input shapes (what launched those kernels), by self
    time over one forward+backward of the scan with the fast paths, eager (CUDA graphs hide the kernels of a replay
    from the profiler; the kernels are the same), after a warm-up. On CPU both tables are of CPU ops.

    With `roofs` (the matmul ceiling in TFLOP/s and the copy bandwidth in GB/s, measured in the same run) the ops get
    a roofline: the profiler's FLOP count of each matmul and `op_bytes`'s estimate of the bytes of every op over its
    time, as a share of the roof that binds it, and a last line sums matmuls and the rest. `muon_kernel`: with the
    fused Muon step."""
    from torch.profiler import ProfilerActivity, profile

    step = scan_step(length, dh, update, device, batch)
    on_gpu = device.type == "cuda"
    with scan_settings(graphs=False, use_kernels=True, compiled=False, muon_kernel=muon_kernel):
        step()
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities, record_shapes=True, with_flops=roofs is not None) as prof:
            step()
            sync(device)
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    lines = []
    for title, events in (("kernels" if on_gpu else "ops", prof.key_averages()),
                          ("ops by input shapes", prof.key_averages(group_by_input_shape=True))):
        if on_gpu:  # kernels have no shapes, ops launch kernels: one table of each (custom ops, whose rows repeat
            # their kernels' time, in neither)
            from torch.autograd import DeviceType

            events = [e for e in events if (e.device_type == DeviceType.CUDA if title == "kernels"
                                            else e.key.startswith("aten::"))]
        events = [e for e in events if getattr(e, attr) > 0]
        total = sum(getattr(e, attr) for e in events)
        with_roofs = roofs is not None and title == "ops by input shapes"
        lines.append(f"== profile: scan {update}, T={length} dh={dh}: {total / 1e3:.1f} ms of "
                     f"{'device' if on_gpu else 'CPU'} self time, {title}; top {top}"
                     f"{'; TFLOP/s, GB/s and % of the binding roof' if with_roofs else ''} ==")
        for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
            shapes = f" {e.input_shapes}"[:70] if title != "kernels" and e.input_shapes else ""
            roof = roofline_cells(e, getattr(e, attr), roofs) if with_roofs else ""
            lines.append(f"{100 * getattr(e, attr) / total:5.1f}% {getattr(e, attr) / 1e3:9.2f} ms {e.count:6d}x  "
                         f"{roof}{e.key[:80]}{shapes}")
        if with_roofs:
            lines.append(roofline_summary(events, attr, roofs))
    return lines


def roofline_cells(event, micros, roofs) -> str:
    """TFLOP/s (matmuls), GB/s, and the share of the roof that binds: the matmul ceiling for matmuls, the copy
    bandwidth for the rest."""
    seconds = micros / 1e6
    tflops = event.flops / seconds / 1e12 if event.flops else 0.0
    gbs = op_bytes(event.key, event.input_shapes) * event.count / seconds / 1e9
    share = tflops / roofs[0] if event.key in MATMUL_OPS else gbs / roofs[1]
    return f"{tflops:6.1f} {gbs:7.0f} {100 * share:5.1f}%  "


def roofline_summary(events, attr, roofs) -> str:
    """One line: the matmuls' time and mean TFLOP/s against the ceiling, the other ops' time and mean GB/s against
    the bandwidth."""
    mm = [e for e in events if e.key in MATMUL_OPS]
    rest = [e for e in events if e.key not in MATMUL_OPS]
    mm_s = sum(getattr(e, attr) for e in mm) / 1e6
    rest_s = sum(getattr(e, attr) for e in rest) / 1e6
    tflops = sum(e.flops for e in mm) / max(mm_s, 1e-12) / 1e12
    gbs = sum(op_bytes(e.key, e.input_shapes) * e.count for e in rest) / max(rest_s, 1e-12) / 1e9
    return (f"roofline: matmuls {1e3 * mm_s:.1f} ms at {tflops:.1f} TFLOP/s ({100 * tflops / roofs[0]:.1f}% of "
            f"{roofs[0]:.3g}); other ops {1e3 * rest_s:.1f} ms at {gbs:.0f} GB/s ({100 * gbs / roofs[1]:.1f}% of "
            f"{roofs[1]:.0f}, bytes estimated); aten ops only, the Triton kernels are in the kernel table")


class OpCounter(TorchDispatchMode):
    """Counts the operators a region dispatches, views and other metadata-only ops left out (they launch nothing),
    and the bytes they must move at least: each one's tensor inputs, and its outputs unless written in place into
    an input. A kernel custom op counts as one operator moving its inputs and outputs once."""

    METADATA_ONLY = {"view", "_unsafe_view", "expand", "t", "transpose", "unsqueeze", "squeeze", "permute", "slice",
                     "select", "alias", "detach", "as_strided", "split", "unbind", "_reshape_alias", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bytes = 0
        self._inside_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._inside_kernel and func.__name__.split(".")[0] not in self.METADATA_ONLY:
            self._add(args, kwargs, out)
        return out

    def _add(self, args, kwargs, out) -> None:
        self.count += 1
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        written_in_place = {t.data_ptr() for t in ins}
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.data_ptr() not in written_in_place]
        self.bytes += sum(t.numel() * t.element_size() for t in ins + outs)

    def kernel(self, fn):
        """fn (a Triton kernel's launcher that is not a torch custom op) counted as one operator moving its tensor
        arguments and results once, like a custom op: what it dispatches itself is the launcher's bookkeeping (and
        in Triton's interpreter, its copies to and from the host), not kernels of its own."""
        def counted(*args, **kwargs):
            self._inside_kernel = True
            try:
                out = fn(*args, **kwargs)
            finally:
                self._inside_kernel = False
            self._add(args, kwargs, out)
            return out
        return counted


@contextlib.contextmanager
def _fast_paths_as_on_a_gpu(mlp_kernel, muon_kernel=False):
    """On CPU, the NS kernel, the token momenta kernel and (if asked) the memory MLP kernel and the fused Muon step in
    the scan where a GPU's dispatch would put them (interpreted): op counts then match the GPU's. On a GPU, the
    dispatch itself."""
    if torch.cuda.is_available():
        with scan_settings(graphs=False, use_kernels=True, compiled=False, mlp_kernel=mlp_kernel,
                           muon_kernel=muon_kernel):
            yield
        return
    from atlas_train.kernels.memory_mlp_kernel import memory_mlp_pass
    from atlas_train.kernels.muon_step_kernel import muon_step as muon_step_kernel
    from atlas_train.kernels.token_momenta_kernel import token_momenta
    from atlas_train.ops import memory_mlp, outer_sums

    def kernel_pass(weights, z, ln, v=None, loss=None):
        if not mlp_kernel or any(isinstance(w, memory_mlp.TokenWeights) for w in weights.values()):
            return None
        return memory_mlp_pass(z, weights["W1"], weights["W2"], ln, v=v, loss=loss, precision="ieee")

    def step(*args):  # the last argument: half_inputs
        if muon_kernel:
            return muon_step_kernel(*args[:-1], "ieee", "ieee")
        return muon_step.muon_step_reference(*args)

    saved = (scan_chunks.newton_schulz, muon_step.newton_schulz, muon_step.muon_step, outer_sums.weighted_outer_sums,
             memory_mlp._fast_pass)
    scan_chunks.newton_schulz = muon_step.newton_schulz = (
        lambda s, steps, half_inputs: kernels.newton_schulz(s, steps, "ieee"))
    muon_step.muon_step = step
    outer_sums.weighted_outer_sums = lambda *tensors: token_momenta(*tensors[:5], "ieee")  # last: half_inputs
    memory_mlp._fast_pass = kernel_pass
    try:
        yield
    finally:
        (scan_chunks.newton_schulz, muon_step.newton_schulz, muon_step.muon_step, outer_sums.weighted_outer_sums,
         memory_mlp._fast_pass) = saved


def count_ops_table(length, dh, updates, device):
    """Operators per chunk of one forward+backward (backward = each chunk's recompute and gradient), eager, with the
    fast paths and without/with the memory MLP kernel, and the bytes they move at least per chunk and (batch, head)
    chain. On a GPU each operator is a kernel launch, and a CUDA graph replays the same launches, so where launches
    rather than arithmetic bound a chunk this is what fusion buys; where bytes bound it (the production shape, see
    --profile's roofline), bytes over the card's bandwidth are a floor under the time of a scan made of these
    operators, and what a fused kernel keeping the fast weights on chip would not move. Not a timing: deterministic,
    float32 inputs (a bf16 model's scan computes in float32 too; its bf16 NS operands add casts not counted here).
    (On a GPU the backward runs in autograd's device thread, and a dispatch mode is thread-local: there the backward's
    count may miss operators, so the CPU count is the reference.)"""
    lines = [f"== operators and bytes per chunk: T={length} dh={dh} chunk={CHUNK}, fast paths as dispatched on a GPU; "
             f"MB per chunk and (batch, head) chain; GB per call at B·H = 128, T = 4K and this dh ==",
             f"{'update':<8} {'kernels':<12} {'forward':>8} {'backward':>9} {'total':>7} {'MB fwd':>8} "
             f"{'MB bwd':>8} {'GB/call':>8}"]
    for update in updates:
        rows = [("PyTorch", False, False), ("mlp", True, False)] + ([("mlp+muon", True, True)] if update == "chunk"
                                                                      else [])
        for label, mlp_kernel, muon_kernel in rows:
            heads = HEADS if device.type == "cuda" else 2  # counts do not depend on it; the interpreter is slow
            tensors, params = make_inputs(1, length, heads, dh, device, torch.float32, seed=0)
            with _fast_paths_as_on_a_gpu(mlp_kernel, muon_kernel):
                with OpCounter() as forward:
                    y, _ = memory_scan(**tensors, params=params, chunk_size=CHUNK, ns_steps=NS_STEPS, update=update)
                with OpCounter() as backward:
                    y.backward(torch.ones_like(y))
            chunks = length // CHUNK
            per_chain = [c.bytes / chunks / heads / 1e6 for c in (forward, backward)]
            production = sum(per_chain) * 128 * (4096 // CHUNK) / 1e3
            lines.append(f"{update:<8} {label:<12} {forward.count / chunks:8.0f} "
                         f"{backward.count / chunks:9.0f} {(forward.count + backward.count) / chunks:7.0f} "
                         f"{per_chain[0]:8.2f} {per_chain[1]:8.2f} {production:8.1f}")
    return lines


# Launch settings of the memory MLP kernel (module constants of memory_mlp_kernel) that bench_memory_mlp.py --sweep
# times alone and --mlp-setting applies to a whole run.
MLP_SWEEP = [("hidden tiles 64", dict(BLOCK_HID=64)),
             ("hidden tiles 16", dict(BLOCK_HID=16)),
             ("token blocks of 16 (tile 2K)", dict(TILE_ELEMENTS=2048)),
             ("token blocks of 64 (tile 8K)", dict(TILE_ELEMENTS=8192)),
             ("8 warps", dict(NUM_WARPS={128: 8, 256: 8})),
             ("2 warps", dict(NUM_WARPS={128: 2, 256: 8})),
             ("2 pipeline stages", dict(NUM_STAGES=2)),
             ("tile 2K, hidden tiles 64", dict(TILE_ELEMENTS=2048, BLOCK_HID=64)),
             ("tile 8K, 8 warps", dict(TILE_ELEMENTS=8192, NUM_WARPS={128: 8, 256: 8}))]


# --ns-sweep: launch heuristics of the NS kernel to compare on the GPU (module constants of newton_schulz_kernel).
# Not here: 2K-column tiles with 4 warps, whose backward hits an illegal memory access on the GPU at 64 x 256 in bf16
# (the interpreter computes it exactly), which ends every later row of the run.
NS_SWEEP = [("stages 1", dict(NUM_STAGES={"forward": 1, "backward": 1})),
            ("stages 3/2", dict(NUM_STAGES={"forward": 3, "backward": 2})),
            ("streamed 4K tiles", dict(SINGLE_TILE_ELEMENTS=0, SCRATCH_TILE_ELEMENTS=4096)),
            ("streamed 16K tiles", dict(SINGLE_TILE_ELEMENTS=0, SCRATCH_TILE_ELEMENTS=16384)),
            ("streamed 4K tiles, 4 warps", dict(SINGLE_TILE_ELEMENTS=0, SCRATCH_TILE_ELEMENTS=4096,
                                                NUM_WARPS={"stream": 4, "scratch": 4})),
            ("register Gram to 128 in tf32 too", dict(REGISTER_GRAM_MAX=128)),
            ("bf16 register Gram only to 64", dict(REGISTER_GRAM_MAX_BF16=64)),
            ("maxnreg 128 (2 programs/SM)", dict(MAX_REGISTERS=128)),
            ("maxnreg 128, stages 1", dict(MAX_REGISTERS=128, NUM_STAGES={"forward": 1, "backward": 1}))]


def ns_only_bench(device, shapes, precisions, budget_s, ceiling, sweep=False):
    """Newton–Schulz alone on one chunk's matrices of update=token (tokens x heads), forward and forward+backward:
    the Triton kernel per operand precision, the PyTorch NS compiled with torch.compile (bf16 inputs, kernels
    off), and the same matmul chain by cuBLAS in bf16 (bmm/baddbmm: exactly the NS forward's FLOPs, its
    elementwise work fused into the GEMMs) as the attainable rate for these shapes. `sweep` adds the kernel in bf16
    under each launch heuristic of NS_SWEEP. Returns the table's lines."""
    import atlas_train.kernels.newton_schulz_kernel as ns_kernel
    from atlas_train.kernels import newton_schulz_cublas
    from atlas_train.ops.newton_schulz import NS_COEFFICIENTS
    from atlas_train.ops.newton_schulz import newton_schulz as ns_torch

    mats = HEADS * CHUNK if device.type == "cuda" else 2  # interpreter: two matrices are plenty
    deadline = time.monotonic() + budget_s
    a, b, c = NS_COEFFICIENTS

    def cublas_chain(x):  # the forward's GEMMs on the wide orientation, no normalisation
        for _ in range(NS_STEPS):
            gram = torch.bmm(x, x.transpose(1, 2))
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x

    compiled_ns = torch.compile(ns_torch, dynamic=False)

    def torch_ns(s):
        kernels.set_kernels_enabled(False)  # the PyTorch path, not the kernel it would dispatch to on a GPU
        try:
            return compiled_ns(s, NS_STEPS)
        finally:
            kernels.set_kernels_enabled(True)

    def kernel(precision):
        return lambda t: kernels.newton_schulz(t, NS_STEPS, precision)

    def cublas_ns(precision):  # the dispatcher's path above the Triton kernel's short sides
        return lambda t: newton_schulz_cublas.newton_schulz(t, NS_STEPS, precision)

    lines = []
    for rows, cols in shapes:
        fwd_flops, bwd_flops = (mats * f for f in ns_flops(rows, cols, NS_STEPS))
        m, n = min(rows, cols), max(rows, cols)
        # (label, kernel precision or None, input dtype, function, input shape, kernel constants patched)
        impls = [("cuBLAS bf16 bmm chain", None, torch.bfloat16, cublas_chain, (mats, m, n), {})]
        impls += [(f"kernel {p}", p, torch.float32, kernel(p), (mats, rows, cols), {}) for p in precisions]
        impls += [(f"NS on cuBLAS {p}, hand bwd", None, torch.float32, cublas_ns(p), (mats, rows, cols), {})
                  for p in precisions]
        impls += [(f"kernel bf16, {name}", "bf16", torch.float32, kernel("bf16"), (mats, rows, cols), patches)
                  for name, patches in (NS_SWEEP if sweep else [])]
        if device.type == "cuda":  # bf16 inputs: cuBLAS bf16 GEMMs, the kernel's bf16 mode's counterpart
            impls.append(("torch.compile NS bf16", None, torch.bfloat16, torch_ns, (mats, rows, cols), {}))
        chain_rate = None
        for label, precision, dtype, fn, shape, patches in impls:
            head = f"{label:<34} {rows}x{cols:<7}"
            if time.monotonic() > deadline:
                lines.append(f"{head} skipped: --budget-s spent")
                continue
            if precision is not None and kernels.newton_schulz_unsupported(
                    torch.empty(rows, cols, device=device), precision):
                lines.append(f"{head} not covered by the kernel (PyTorch path)")
                continue
            cells = []
            for backward in (False, True):
                if backward and label.startswith("cuBLAS"):
                    continue  # the reference rate is the forward chain's
                try:
                    s = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)

                    def step():
                        # the backward launches inside the patch too
                        with mock.patch.multiple(ns_kernel, **patches) if patches else contextlib.nullcontext():
                            out = fn(s)
                            if backward:
                                out.backward(torch.ones_like(out))
                    step()  # warm-up and compilation
                    seconds = time_fn(step, device, 5)
                except Exception as exc:  # noqa: BLE001 — one failing row must not stop the others
                    cells.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:50] if str(exc) else ''}")
                    continue
                rate = (fwd_flops + (bwd_flops if backward else 0)) / seconds / 1e12
                if label.startswith("cuBLAS"):
                    chain_rate = rate
                versus = f"{100 * rate / chain_rate:4.0f}% of cuBLAS chain" if chain_rate else "no cuBLAS rate"
                cells.append(f"{'fwd+bwd' if backward else 'fwd'} {seconds * 1e3:8.3f} ms {rate:6.1f} TFLOP/s "
                             f"{100 * rate / ceiling:4.1f}% of ceiling ({versus})")
            lines.append(f"{head} " + " | ".join(cells))
            print(f"  {lines[-1]}", flush=True)
    return lines


def main(argv=None):
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 4K and dh 64 only (CPU: tiny sizes)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after this many seconds")
    parser.add_argument("--row-budget-s", type=float, default=30.0, help="skip rows predicted slower than this")
    parser.add_argument("--dh", type=int, nargs="+", help="head dims to time (default 64 128; --quick: 64)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths to time (default 4K 16K 64K)")
    parser.add_argument("--skip-checks", action="store_true", help="timing only (not for reported numbers)")
    parser.add_argument("--checks", nargs="+", choices=CHECK_GROUPS, default=CHECK_GROUPS,
                        help="which checks to run (default all): NS paths, memory MLP kernel, token momenta kernel, "
                             "the whole scan (GPU only)")
    parser.add_argument("--ns-only", action="store_true",
                        help="Newton-Schulz alone: NS checks, then kernel vs cuBLAS vs torch.compile (dh 64 128 256)")
    parser.add_argument("--ns-sweep", action="store_true",
                        help="with --ns-only: also the bf16 kernel under each launch heuristic of NS_SWEEP")
    parser.add_argument("--batch", type=int, default=1,
                        help=f"sequences per call: B·H = batch × {HEADS} (8 is the production shape at 4K)")
    parser.add_argument("--updates", nargs="+", choices=("chunk", "token"), default=("chunk", "token"),
                        help="memory updates to time or profile")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="scan rows to time, by name (eager, torch.compile, graphs, graphs-mlp, graphs+compile, "
                             "graphs+muon); default all")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="instead of timings: the N costliest kernels and PyTorch ops (with input shapes) of one "
                             "step, per --dh and update, at the first --lengths")
    parser.add_argument("--muon-kernel", action="store_true",
                        help="with --profile: profile the scan with the fused Muon step (the timed rows name it as "
                             "graphs+muon)")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timings: operators per chunk (kernel launches on a GPU) of each update, "
                             "without and with the memory MLP kernel, at the first --dh and --lengths")
    parser.add_argument("--ns-precision", choices=kernel_dispatch.NS_PRECISION_SETTINGS, default="auto",
                        help="operand precision setting of the fast paths in the timed rows and the profile "
                             "(default auto: bf16 NS for the timed rows' bf16 inputs; the checks cover every one)")
    parser.add_argument("--triton-max-short-side", type=int, metavar="N",
                        help="send NS matrices with a short side up to N to the Triton kernel whatever their number "
                             "and precision, checks included (default: the dispatcher's rule, triton_takes)")
    parser.add_argument("--mlp-setting", choices=["default", *(name for name, _ in MLP_SWEEP)], default="default",
                        help="run everything with the memory MLP kernel under this launch setting of MLP_SWEEP "
                             "(bench_memory_mlp.py --sweep times them alone and names the fastest)")
    args = parser.parse_args(argv)
    patches = dict(MLP_SWEEP)[args.mlp_setting] if args.mlp_setting != "default" else {}
    with mock.patch.multiple(memory_mlp_kernel, **patches) if patches else contextlib.nullcontext():
        return _run(args, started)


def _run(args, started) -> int:
    """main's work on parsed arguments."""
    if args.triton_max_short_side is not None:
        kernel_dispatch.TRITON_MAX_SHORT_SIDE = args.triton_max_short_side
        kernel_dispatch.TRITON_MAX_SHORT_SIDE_BF16_MANY = args.triton_max_short_side

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu (Triton interpreter for the kernels)'}; "
          f"torch {torch.__version__}", flush=True)
    seed = int.from_bytes(os.urandom(6), "little")  # fresh inputs on every run; printed to reproduce a failure
    torch.manual_seed(seed)
    print(f"random seed of this run: {seed}", flush=True)

    checks = []
    if not args.skip_checks:
        ns_sizes = ([(64, 64, 256), (64, 256, 128), (16, 128, 512), (8, 512, 256), (4, 256, 1024), (4, 1024, 256),
                     (8, 40, 200)] if on_gpu
                    else [(3, 8, 24), (2, 24, 8)])
        if on_gpu and args.ns_only and args.dh:  # only the timed shapes (each compiles its own kernels) and one odd
            ns_sizes = [(8, *shape) for dh in args.dh for shape in ((dh, 4 * dh), (4 * dh, 2 * dh))] + [(8, 40, 200)]
        groups = [("ns", "NS paths", lambda: check_ns_paths(device, ns_sizes))]
        if not args.ns_only:  # the memory MLP kernel at the scan's (D, dv, hidden) and an odd one; c + chunk − 1 keys
            mlp_shapes = [(128, 64, 256), (256, 128, 512), (200, 100, 300)] if on_gpu else [(20, 12, 40)]
            groups.append(("mlp", "memory MLP kernel",
                           lambda: check_mlp_kernel(device, mlp_shapes, WINDOW + CHUNK - 1 if on_gpu else 21)))
            # the token momenta of W1 and W2 at dh 64 and W2 at dh 128 (c = 64, chunk 64), and an odd shape
            momenta_shapes = ([(CHUNK, WINDOW + CHUNK - 1, *shape) for shape in ((64, 256), (256, 128), (512, 256))]
                              + [(CHUNK, 150, 200, 100)]) if on_gpu else [(4, 7, 6, 10)]
            groups.append(("momenta", "token momenta kernel",
                           lambda: check_momenta_kernel(device, momenta_shapes, 4 if on_gpu else 1)))
            # the chunk update's W1 and W2 at dh 64 (c = 64, chunk 64: 127 keys), and an odd shape
            muon_shapes = ([(WINDOW + CHUNK - 1, *shape) for shape in ((64, 256), (256, 128))] + [(150, 200, 100)]
                           if on_gpu else [(7, 6, 10), (9, 12, 5)])
            groups.append(("muon", "fused Muon step kernel",
                           lambda: check_muon_kernel(device, muon_shapes, 4 if on_gpu else 1)))
        if on_gpu and not args.ns_only:
            groups.append(("scan", "memory_scan", lambda: check_memory_scan(device, args.updates)))
        for group, name, run_checks in groups:
            if group not in args.checks:
                continue
            try:
                checks += run_checks()
            except Exception as exc:  # noqa: BLE001 — a crashing check is a failed check, and the run goes on
                print("".join(traceback.format_exc().splitlines(True)[-6:]), file=sys.stderr)
                checks.append((f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}", math.nan, 0.0))
    failed = [c for c in checks if not (c[1] <= c[2])]  # NaN compares False: it never passes
    # Printed now, not only with the final table: a run cut short by its time limit must still show its checks.
    print("\n== correctness (relative L2 error vs float64; NaN fails) ==")
    for name, err, bound in checks:
        print(f"{'ok  ' if err <= bound else 'FAIL'} {name:<58} {err:9.2e}  bound {bound:.0e}", flush=True)
    if not checks:
        print("(skipped)", flush=True)

    ceiling = matmul_ceiling(device)
    kernels.set_ns_precision(args.ns_precision)  # after the checks, which set each precision in turn
    print(f"matmul ceiling: {ceiling:.3g} TFLOP/s ({'bf16' if on_gpu else 'fp32'})", flush=True)
    if args.ns_only:
        # update=token's matrices, W1 (dh x 4dh) and W2 (4dh x 2dh), most used first; up to 256 x 1024
        shapes = [(64, 256), (256, 128), (128, 512), (512, 256), (256, 1024)] if on_gpu else [(8, 32), (32, 16)]
        if args.dh:
            shapes = [shape for dh in args.dh for shape in ((dh, 4 * dh), (4 * dh, 2 * dh))]
        # --budget-s counts from the start (checks included): rows past it print as skipped
        budget = args.budget_s - (time.monotonic() - started)
        lines = ns_only_bench(device, shapes, ("tf32", "bf16") if on_gpu else ("ieee",), budget, ceiling,
                              sweep=args.ns_sweep)
        print(f"\n== correctness: {len(checks)} checks, {len(failed)} failed (listed before the timings) ==")
        print(f"\n== Newton-Schulz alone, {HEADS * CHUNK if on_gpu else 2} matrices, ns={NS_STEPS}; bf16 matmul "
              f"ceiling {ceiling:.3g} TFLOP/s (8192^2); % of the cuBLAS bf16 chain of the same shapes and FLOPs ==")
        print("\n".join(lines))
        return 1 if failed else 0
    if on_gpu:
        lengths = (4096,) if args.quick else (4096, 16384, 65536)
        head_dims = (64,) if args.quick else (64, 128)
    else:
        lengths, head_dims = ((128,), (16,)) if args.quick else ((128, 256), (16,))
    lengths, head_dims = args.lengths or lengths, args.dh or head_dims
    if args.count_ops:
        print("\n" + "\n".join(count_ops_table(lengths[0], head_dims[0], args.updates, device)), flush=True)
        return 1 if failed else 0
    if args.profile:
        roofs = ceiling, copy_bandwidth(device)
        print(f"copy bandwidth: {roofs[1]:.0f} GB/s", flush=True)
        for dh in head_dims:
            for update in args.updates:
                print("\n" + "\n".join(profile_table(lengths[0], dh, update, device, args.profile, args.batch,
                                                       roofs, args.muon_kernel)), flush=True)
        return 1 if failed else 0
    bench = Bench(device, ceiling, args.budget_s, args.row_budget_s)

    heads = args.batch * HEADS  # B·H of the timed rows
    for length in lengths:  # shortest context first, so a spent time budget drops the longest rows
        for dh in head_dims:
            shape = f"T={length} dh={dh}"
            bench.run("sdpa causal" + (" cudnn" if on_gpu else ""), shape,
                      lambda: sdpa_step(length, dh, device, args.batch), 7 * length * length * dh * heads,
                      ("sdpa", dh), length)
            for update in args.updates:
                flops = scan_flops(length, heads, dh, update)
                for name, *setting in scan_variants(on_gpu, args.quick, length == lengths[0]):
                    if args.variants and name not in args.variants:
                        continue
                    with scan_settings(*setting):
                        bench.run(f"scan {update} {name}", shape,
                                  lambda: scan_step(length, dh, update, device, args.batch),
                                  flops, (name, update, dh), length)

    print(f"\n== correctness: {len(checks)} checks, {len(failed)} failed (listed before the timings) ==")
    for reason in noted_fallbacks(MEMORY_MLP_KERNEL):  # then its "+mlp" rows ran (partly) without it
        print(f"memory MLP kernel not used for some passes: {reason}")
    for reason in noted_fallbacks(MUON_STEP_KERNEL):  # then "graphs+muon" ran (partly) unfused
        print(f"fused Muon step not used for some steps: {reason}")
    print(f"\n== forward+backward, B*H={heads}, c={WINDOW}, chunk={CHUNK}, ns={NS_STEPS}, NS operands "
          f"{kernel_dispatch.ns_precision(on_gpu)} (setting {args.ns_precision}; inputs {'bf16' if on_gpu else 'fp32'}"
          f"), memory MLP kernel {kernel_dispatch.memory_mlp_precision()}, Triton NS up to "
          f"{kernel_dispatch.TRITON_MAX_SHORT_SIDE} (bf16, many matrices: "
          f"{kernel_dispatch.TRITON_MAX_SHORT_SIDE_BF16_MANY}); ceiling {ceiling:.3g} TFLOP/s; "
          "time, TFLOP/s, % of ceiling, peak memory of the row ==")
    for label, shape, result in bench.rows:
        print(f"{label:<34} {shape:<22} {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
