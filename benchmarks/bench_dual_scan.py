"""Issue 22's goal on one GPU: forward + backward of the deep_transformer mixer at B·H = 128, T = 4K, dh 64 against
cuDNN attention at the same shape, timed in the same call; then a bf16 run's error against float64 at 4K.

    python benchmarks/bench_dual_scan.py                     # timing table, then the error check
    python benchmarks/bench_dual_scan.py --profile           # + the CUDA kernels of one dual scan step, by time
    python benchmarks/bench_dual_scan.py --smoke             # CPU: tiny shapes (interpreted kernel), proves the script
    python benchmarks/bench_dual_scan.py --count-ops --precision ieee --length 512 --heads 1 --batch 1
                                                             # operators and bytes per chunk (CPU: interpreted kernel)

Rows, each forward + backward, median of --repeats after a warm-up:
* `dual_memory_scan` alone (q, k, v, gates -> y), its attention passes on the Triton kernel (products in --precision),
  and with --torch-pass on the PyTorch pass too; with --compiled-terms also with its chunk terms compiled;
* the whole DualMixer (projections, conv, gates, scan, output norm and gate) and, beside it, the transformer's
  Attention module (projections, RoPE, SDPA);
* cuDNN's causal SDPA on (B, H, T, dh) bf16 (another backend where cuDNN's is not available: the row names it).
The goal: the scan within 4x of the SDPA row (the scan's reads are attention with value dimension 4·dh, plus the
anchor pass over the keys).

Error check (--check-length tokens, one row of --check-heads heads): y and the gradients of q, k, v, eta, gamma and
every parameter of a bf16 run (kernel, --precision products) against a float64 run of the PyTorch path, relative L2;
each must stay within --bound (5e-2, memory_scan's bf16 bound). The table comes last; the exit code is 1 if a check
fails.

The script puts the kernel in at `atlas_train.ops.dual_attention.implementation` itself (`attention_pass`), with the
products of --precision, whatever the registry's fast path "dual_attention" would choose.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from unittest import mock

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU smoke run: the kernel runs in Triton's interpreter (set before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_dual_attention import SWEEP, setting  # noqa: E402

from atlas_train.model import ModelConfig, build_model  # noqa: E402
from atlas_train.ops import dual_attention, dual_memory_scan  # noqa: E402

MIXER = "deep_transformer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dh", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--precision", choices=("ieee", "tf32", "bf16"), default="bf16", help="the kernel's products")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch-pass", action="store_true", help="also time the scan on the PyTorch attention pass")
    p.add_argument("--compiled-terms", action="store_true",
                   help="also time the scan with its chunk terms compiled (ATLAS_DUAL_COMPILED_TERMS=1)")
    p.add_argument("--attention-setting", default="default", choices=["default", *(name for name, _ in SWEEP)],
                   help="run everything with the attention kernel's launch constants of this setting of "
                        "bench_dual_attention.py's SWEEP")
    p.add_argument("--check-length", type=int, default=4096)
    p.add_argument("--check-heads", type=int, default=2)
    p.add_argument("--bound", type=float, default=5e-2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run")
    p.add_argument("--count-ops", action="store_true",
                   help="only count the operators and the bytes they move per chunk, forward and backward")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.heads, args.length, args.dh, args.chunk = 1, 2, 48, 8, 16
        args.check_length, args.check_heads, args.repeats, args.precision = 40, 2, 1, "ieee"
    return args


@contextlib.contextmanager
def attention_pass(kind: str, precision: str):
    """The scan's attention passes on the Triton kernel ("kernel", where it takes them) or on PyTorch ("torch")."""
    if kind == "torch":
        with mock.patch.object(dual_attention, "implementation", lambda *_: dual_attention.TORCH):
            yield
        return
    from atlas_train.kernels.dispatch import dual_attention_fast

    def chosen(x, width, kernel, half_inputs):
        return dual_attention_fast(x, width, kernel, precision) or dual_attention.TORCH

    with mock.patch.object(dual_attention, "implementation", chosen):
        yield


def median_seconds(fn, device, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def scan_inputs(batch, length, heads, dh, chunk, device, dtype, seed=0):
    """q, k (unit), v, eta, gamma (window 1) and params at the mixer's initial scales, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    hid = 4 * dh

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    x = [F.normalize(randn(batch, length, heads, dh), dim=-1), F.normalize(randn(batch, length, heads, dh), dim=-1),
         randn(batch, length, heads, dh), 0.01 + 0.02 * randn(batch, length, heads).abs(),
         torch.sigmoid(randn(batch, length, heads, 1))]
    params = {"W1": randn(heads, dh, hid, scale=hid ** -0.5), "K0": randn(heads, 64, dh), "A0": randn(heads, 64, hid),
              "scale": torch.full((heads,), math.sqrt(dh), device=device, dtype=dtype),
              "ln_weight": torch.ones(heads, dh, device=device, dtype=dtype),
              "ln_bias": torch.zeros(heads, dh, device=device, dtype=dtype)}
    return [t.requires_grad_() for t in x], {n: t.requires_grad_() for n, t in params.items()}


def scan_step(x, params, chunk, upstream):
    """Forward and backward of one dual_memory_scan call; returns y and every gradient."""
    y, _ = dual_memory_scan(*x, params, chunk_size=chunk)
    leaves = [*x, *params.values()]
    return [y.detach(), *torch.autograd.grad(y, leaves, upstream)]


def module_step(module, x):
    out = module(x)[0]
    out.float().square().mean().backward()


def timing_rows(args, device) -> list[str]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, t, h, dh = args.batch, args.length, args.heads, args.dh
    x, params = scan_inputs(b, t, h, dh, args.chunk, device, dtype)
    upstream = torch.randn(b, t, h, dh, device=device, dtype=dtype)
    rows, seconds = [], {}
    passes = ["kernel"] + (["torch"] if args.torch_pass else [])
    for kind in passes:
        with attention_pass(kind, args.precision):
            seconds[f"scan ({kind})"] = median_seconds(lambda: scan_step(x, params, args.chunk, upstream), device,
                                                       args.repeats)
    if args.compiled_terms:
        with attention_pass("kernel", args.precision), mock.patch.dict(os.environ, {"ATLAS_DUAL_COMPILED_TERMS": "1"}):
            seconds["scan (kernel), compiled terms"] = median_seconds(
                lambda: scan_step(x, params, args.chunk, upstream), device, args.repeats)
    cfg = ModelConfig(mixer=MIXER, d_model=h * dh, n_heads=h, n_layers=1, chunk_size=args.chunk, vocab_size=64)
    hidden = torch.randn(b, t, h * dh, device=device, dtype=dtype, requires_grad=True)
    mixer = build_model(cfg).layers[0].mixer.to(device=device, dtype=dtype)
    with attention_pass("kernel", args.precision):
        seconds["DualMixer"] = median_seconds(lambda: module_step(mixer, hidden), device, args.repeats)
    attention = build_model(ModelConfig(mixer="transformer", d_model=h * dh, n_heads=h, n_layers=1, vocab_size=64,
                                        max_seq_len=t)).layers[0].mixer.to(device=device, dtype=dtype)
    seconds["Attention module"] = median_seconds(lambda: module_step(attention, hidden), device, args.repeats)
    qkv = [torch.randn(b, h, t, dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    backend, sdpa = sdpa_backend(device)
    with sdpa:
        seconds[f"SDPA ({backend})"] = median_seconds(
            lambda: F.scaled_dot_product_attention(*qkv, is_causal=True).backward(qkv[0]), device, args.repeats)
    base = seconds[f"SDPA ({backend})"]
    rows.append(f"== forward + backward, B={b} H={h} T={t} dh={dh} chunk={args.chunk}, {dtype}, kernel products "
                f"{args.precision}, on {device_name(device)}")
    rows.append(f"{'row':<28} {'ms':>10} {'x SDPA':>8}")
    rows += [f"{name:<28} {1000 * s:>10.2f} {s / base:>8.2f}" for name, s in seconds.items()]
    if args.profile and device.type == "cuda":
        with attention_pass("kernel", args.precision):
            rows += profile_table(lambda: scan_step(x, params, args.chunk, upstream))
    return rows


def sdpa_backend(device):
    """(name, context) of the SDPA backend the goal compares with: cuDNN where available."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda" and torch.backends.cudnn.is_available():
        return "cuDNN", sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])
    return "default", contextlib.nullcontext()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def profile_table(fn, top: int = 15) -> list[str]:
    """The `top` CUDA kernels of one scan step by self time, after the total and the number of launches: how much of the
    step is the attention kernels, how much the per-chunk PyTorch terms around them."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    total = sum(e.self_device_time_total for e in events)
    lines = [f"== CUDA kernels of one scan step: {total / 1e3:.1f} ms of device time in "
             f"{sum(e.count for e in events)} launches; top {top}"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"{100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / 1e3:9.2f} ms "
                     f"{e.count:6d}x  {e.key[:80]}")
    return lines


def error_rows(args, device) -> tuple[list[str], bool]:
    """bf16 (kernel) against float64 (PyTorch pass) at --check-length: relative L2 error of y and every gradient."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, params = scan_inputs(1, args.check_length, args.check_heads, args.dh, args.chunk, device, torch.float64, 1)
    upstream = torch.randn(1, args.check_length, args.check_heads, args.dh, device=device, dtype=torch.float64)
    with attention_pass("torch", args.precision):
        want = scan_step(x, params, args.chunk, upstream)
    x_low = [t.detach().to(low).requires_grad_() for t in x]
    params_low = {n: t.detach().to(low).requires_grad_() for n, t in params.items()}
    with attention_pass("kernel", args.precision):
        got = scan_step(x_low, params_low, args.chunk, upstream.to(low))
    rows = [f"== error of a {low} run against float64, T={args.check_length}, H={args.check_heads}, kernel products "
            f"{args.precision} (relative L2, bound {args.bound:.0e})"]
    ok = True
    for name, g, w in zip(["y", "dq", "dk", "dv", "deta", "dgamma", *(f"d{n}" for n in params)], got, want):
        error = float((g.double() - w).norm() / w.norm().clamp_min(1e-30))
        ok &= error <= args.bound
        rows.append(f"{'ok  ' if error <= args.bound else 'FAIL'} {name:<12} {error:.2e}")
    return rows, ok


def count_ops_rows(args, device) -> list[str]:
    """Operators per chunk of one forward + backward on the kernel pass, and the bytes they move at least per chunk and
    (batch, head) chain (bench_memory_scan's OpCounter: a kernel counts as one operator moving its inputs and outputs
    once). Deterministic, so it can measure on CPU (interpreted kernel, float32) what fusing the chunk terms saves; the
    attention passes' share grows with the length (each chunk's anchor pass reads every earlier key)."""
    from bench_memory_scan import OpCounter  # this script's neighbour

    x, params = scan_inputs(args.batch, args.length, args.heads, args.dh, args.chunk, device, torch.float32)
    with attention_pass("kernel", args.precision):
        impl = dual_attention.implementation(x[0].detach().transpose(1, 2), 4 * args.dh, "exp", False)
    if impl is dual_attention.TORCH:
        return [f"== --count-ops: the dual attention kernel declined these shapes with {args.precision} products (the "
                "log says why), so there is no kernel pass to count"]
    counter = OpCounter()  # one counter: the backward reuses the pass the forward chose
    counted = dual_attention.Implementation(counter.kernel(impl.forward), counter.kernel(impl.backward))
    with mock.patch.object(dual_attention, "implementation", lambda *_: counted), counter:
        y, _ = dual_memory_scan(*x, params, chunk_size=args.chunk)
        forward = counter.count, counter.bytes
        y.backward(torch.ones_like(y))
    backward = counter.count - forward[0], counter.bytes - forward[1]
    chunks, chains = -(-args.length // args.chunk), args.batch * args.heads
    return [f"== operators and bytes per chunk: T={args.length} dh={args.dh} chunk={args.chunk}, kernel products "
            f"{args.precision}, on {device_name(device)}; MB per chunk and (batch, head) chain",
            f"{'forward':>8} {'backward':>9} {'MB fwd':>8} {'MB bwd':>8}",
            f"{forward[0] / chunks:8.0f} {backward[0] / chunks:9.0f} "
            f"{forward[1] / chunks / chains / 1e6:8.2f} {backward[1] / chunks / chains / 1e6:8.2f}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    if args.count_ops:
        print("\n".join(count_ops_rows(args, device)))
        return 0
    with setting(dict(SWEEP).get(args.attention_setting, {})):
        rows = timing_rows(args, device)
        checks, ok = error_rows(args, device)
    rows[0] += f"; attention kernel setting: {args.attention_setting}"
    print("\n".join(rows + checks))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
