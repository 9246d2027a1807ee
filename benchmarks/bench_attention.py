"""Document-masked attention at production shapes: compiled FlexAttention (the model's GPU path for packed rows)
against SDPA with a dense mask (the path it replaces) and cuDNN's causal kernel without documents (the ceiling).

Every shape holds the same number of tokens (micro-batch 8 at 4K, 2 at 16K, 1 at 32K by default); H heads of dh,
bf16, forward + backward; rows packed with documents of random lengths (a document starts at each token with
probability 1/--mean-doc). Rows:
- cudnn causal: `attention._attend(is_causal=True)` (cuDNN first), no documents.
- flex docs / sdpa docs: causal within documents: FlexAttention with the model's BlockMask against
  `attention._attend` with the dense (B, T, T) mask (SDPA then picks the memory-efficient or math backend).
- flex swa / sdpa swa: the same inside a --window-token window (the hybrids' sliding-window attention).
- block mask: building the BlockMask from doc_start, eagerly (once per forward, shared by the layers).
Columns: milliseconds per call (median of --reps), TFLOP/s over the (query, key) pairs the mask allows (4·dh·H flops
a pair forward, 2.5 times that backward; for the ceiling, the causal pairs), the dense mask's time over this row's
(speed-up), and this row's rate over cuDNN causal's. Rows print as they finish.

Checks run first, at --check-shape, and the run exits 1 when one misses its bound (max |difference| over max
|reference|): FlexAttention's output and q, k, v gradients against float32 math attention with the dense mask
(SDPA's dense-mask path alongside, for scale); then, in bf16 as DeepSpeed casts the model, the Attention module (full
and windowed), a transformer Block (eager, compiled, selective and full recompute) and a two-layer model with
compiled blocks, each on the flex path against the same module on SDPA's path. A flex call that fell back to the
unfused implementation fails its check.

One GPU:
    python benchmarks/bench_attention.py
Tiny, on CPU (forward only, no block or model checks: torch's CPU FlexAttention has no backward):
    python benchmarks/bench_attention.py --shapes 2x256 --check-shape 2x256 --heads 2 --head-dim 16 \
        --mean-doc 64 --window 100 --reps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as flex_module

from atlas_train.model import ModelConfig, build_model
from atlas_train.model import attention as attention_module
from atlas_train.model.attention import Attention, _attend
from atlas_train.model.block import Block
from atlas_train.model.document_mask import build_block_mask, flex_attend

BOUND = 2e-2  # bf16 against a float32 reference, as benchmarks/check_speed_paths.py


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"8x4096,2x16384" -> [(8, 4096), (2, 16384)]."""
    shapes = []
    for item in text.split(","):
        batch, _, length = item.partition("x")
        shapes.append((int(batch), int(length)))
    return shapes


def random_doc_starts(batch: int, length: int, mean_doc: float, device, seed: int = 0) -> torch.Tensor:
    """(B, T) bool: token 0 and each later token with probability 1/mean_doc start a document."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=gen) < 1.0 / mean_doc
    starts[:, 0] = True
    return starts.to(device)


def dense_mask(doc_start: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, T, T) bool, the rule of attention.py's dense path: not in the future, in the window, same document."""
    length = doc_start.shape[1]
    band = torch.ones(length, length, dtype=torch.bool, device=doc_start.device).tril()
    if window is not None:
        band = band.triu(1 - window)
    doc = doc_start.long().cumsum(1)
    return band[None] & (doc[:, :, None] == doc[:, None, :])


def allowed_pairs(doc_start: torch.Tensor, window: int | None) -> int:
    """Number of (query, key) pairs the mask allows: per token, the keys of its document so far, within the window."""
    pos = torch.arange(doc_start.shape[1], device=doc_start.device)
    start = torch.cummax(torch.where(doc_start, pos, torch.zeros_like(pos)), dim=1).values
    seen = pos - start + 1
    return int((seen.clamp(max=window) if window is not None else seen).sum())


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def flex_path(device: torch.device, on: bool):
    """The model's attention with FlexAttention on this device (on) or SDPA's dense mask (off)."""
    saved = attention_module.FLEX_DEVICE_TYPES
    attention_module.FLEX_DEVICE_TYPES = (device.type,) if on else ()
    try:
        yield
    finally:
        attention_module.FLEX_DEVICE_TYPES = saved


@contextlib.contextmanager
def unfused_flex_detector():
    """Yields a list that gets an entry when a FlexAttention call runs unfused (torch warns once per process; the
    record of that is cleared here so every check can see it)."""
    getattr(flex_module, "_WARNINGS_SHOWN", set()).discard("flex_attention_performance")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list = []
        yield found
    found.extend(w for w in caught if "without torch.compile" in str(w.message))


def median_ms(fn, reps: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls (the first compiles)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def call(attend, q, k, v, grad, backward: bool):
    """attend(q, k, v), then its backward with `grad` when asked: (out, dq, dk, dv) or (out,)."""
    if not backward:
        with torch.no_grad():
            return (attend(q, k, v),)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def math_reference(q, k, v, grad, mask, backward: bool):
    """Float32 math attention with the dense mask, one row of the batch at a time (bounded memory)."""
    parts = []
    for b in range(q.shape[0]):
        one = (t[b : b + 1].float() for t in (q, k, v, grad))

        def attend(q_, k_, v_, m=mask[b : b + 1, None]):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m)

        parts.append(call(attend, *one, backward))
    return tuple(torch.cat(group) for group in zip(*parts))


# ------------------------------------------------------------------------------------------------------- checks

def check_kernels(rows: list, args, device, backward: bool) -> None:
    (batch, length), = parse_shapes(args.check_shape)
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(batch, args.heads, length, args.head_dim, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    doc_start = random_doc_starts(batch, length, args.mean_doc, device)
    parts = ("out", "dq", "dk", "dv") if backward else ("out",)
    for name, window in (("docs", None), ("swa", args.window)):
        mask = dense_mask(doc_start, window)
        ref = math_reference(q, k, v, grad, mask, backward)
        block_mask = build_block_mask(doc_start, length, window, device)
        with unfused_flex_detector() as unfused:
            flex = call(lambda *t: flex_attend(*t, block_mask), q, k, v, grad, backward)
        sdpa = call(lambda *t, m=mask: _attend(*t, attn_mask=m[:, None]), q, k, v, grad, backward)
        for label, got in (("flex", flex), ("sdpa", sdpa)):
            for part, x, r in zip(parts, got, ref):
                rows.append((f"{label} {name} {part} vs fp32 math", rel_error(x, r), BOUND))
        if unfused:
            rows.append((f"flex {name}: ran unfused", float("inf"), 0.0))
        del mask, ref


def _module_pass(module, inputs, grad, backward: bool):
    """A module's output, and with backward its input's gradient and q_proj's weight gradient."""
    if not backward:
        with torch.no_grad():
            return (module(*inputs)[0],)
    x = inputs[0].detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = module(x, *inputs[1:])[0]
    out.backward(grad)
    weight = next(m for name, m in module.named_modules() if name.endswith("q_proj")).weight
    return out, x.grad, weight.grad


def _compare_module(rows, label, module, reference, inputs, grad, backward, device):
    with flex_path(device, on=False):
        ref = _module_pass(reference, inputs, grad, backward)
    with flex_path(device, on=True), unfused_flex_detector() as unfused:
        got = _module_pass(module, inputs, grad, backward)
    for part, x, r in zip(("out", "dx", "dWq"), got, ref):
        rows.append((f"{label} {part}", rel_error(x, r), BOUND))
    if unfused:
        rows.append((f"{label}: flex ran unfused", float("inf"), 0.0))


def check_attention_module(rows: list, args, device, backward: bool) -> None:
    (batch, length), = parse_shapes(args.check_shape)
    cfg = ModelConfig(mixer="transformer", d_model=args.heads * args.head_dim, n_heads=args.heads,
                      max_seq_len=length)
    torch.manual_seed(1)
    x = torch.randn(batch, length, cfg.d_model, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    doc_start = random_doc_starts(batch, length, args.mean_doc, device, seed=1)
    for name, window in (("attention docs", None), ("attention docs+swa", args.window), ("attention swa", args.window)):
        attn = Attention(cfg, window=window).to(device).bfloat16()
        starts = None if name == "attention swa" else doc_start
        _compare_module(rows, name, attn, attn, (x, starts), grad, backward, device)


def check_block(rows: list, args, device) -> None:
    (batch, length), = parse_shapes(args.check_shape)
    cfg = ModelConfig(mixer="transformer", vocab_size=32000, d_model=args.heads * args.head_dim, n_layers=24,
                      n_heads=args.heads, max_seq_len=length).resolved()
    torch.manual_seed(2)
    reference = Block(cfg).to(device).bfloat16()
    x = torch.randn(batch, length, cfg.d_model, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    doc_start = random_doc_starts(batch, length, args.mean_doc, device, seed=2)
    for name, mode, compiled in (("eager", "none", False), ("compiled", "none", True),
                                 ("selective", "selective", False), ("full", "full", False),
                                 ("compiled+selective", "selective", True), ("compiled+full", "full", True)):
        block = Block(cfg).to(device).bfloat16()
        block.load_state_dict(reference.state_dict())
        block.recompute = mode
        if compiled:
            block.compile()
        _compare_module(rows, f"block {name}", block, reference, (x, doc_start), grad, True, device)


def check_model(rows: list, args, device) -> None:
    """Two layers with compiled blocks (the BlockMask built inside each block's graph), loss and gradients."""
    from atlas_train.train.speed import compile_blocks

    (batch, length), = parse_shapes(args.check_shape)
    cfg = ModelConfig(mixer="transformer", vocab_size=32000, d_model=args.heads * args.head_dim, n_layers=2,
                      n_heads=args.heads, max_seq_len=length)
    torch.manual_seed(3)
    reference = build_model(cfg).to(device).bfloat16()
    model = build_model(cfg).to(device).bfloat16()
    model.load_state_dict(reference.state_dict())
    compile_blocks(model)
    ids = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=device)
    doc_start = random_doc_starts(batch, length, args.mean_doc, device, seed=3)

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = m(ids[:, :-1], doc_start, labels=ids[:, 1:]).loss
        loss.backward()
        return loss, m.layers[0].mixer.q_proj.weight.grad, m.embed.weight.grad

    with flex_path(device, on=False):
        ref = step(reference)
    with flex_path(device, on=True), unfused_flex_detector() as unfused:
        got = step(model)
    for part, x, r in zip(("loss", "dWq layer 0", "d embedding"), got, ref):
        rows.append((f"model compiled {part}", rel_error(x, r), BOUND))
    if unfused:
        rows.append(("model compiled: flex ran unfused", float("inf"), 0.0))


def run_checks(args, device) -> int:
    backward = device.type == "cuda"
    rows: list[tuple[str, float, float]] = []
    checks = [("kernels", lambda: check_kernels(rows, args, device, backward)),
              ("attention module", lambda: check_attention_module(rows, args, device, backward))]
    if backward:
        checks += [("block", lambda: check_block(rows, args, device)),
                   ("model", lambda: check_model(rows, args, device))]
    print(f"{'check':<44} {'rel error':>10} {'bound':>8}  ok", flush=True)
    failed = 0
    for name, check in checks:
        start = len(rows)
        try:
            check()
        except Exception as err:  # report and go on: the other checks still tell something
            rows.append((f"{name} check raised {type(err).__name__}: {err}"[:120], float("inf"), 0.0))
        for name, err, bound in rows[start:]:
            ok = err <= bound
            failed += not ok
            print(f"{name:<44} {err:>10.2e} {bound:>8.0e}  {'yes' if ok else 'NO'}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not backward:
        print("(CPU: forward only; block and model checks need a GPU)", flush=True)
    return failed


# ------------------------------------------------------------------------------------------------------ timings

def time_shape(batch: int, length: int, args, device, backward: bool, emit) -> None:
    # Compile afresh for each shape, as a training run does for its one shape: static-shape kernels, and no shape
    # from before counting towards the compiler's recompile limit (past it, FlexAttention would run unfused).
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(batch, args.heads, length, args.head_dim, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    doc_start = random_doc_starts(batch, length, args.mean_doc, device)
    flops_per_pair = 4 * args.head_dim * args.heads * (3.5 if backward else 1.0)

    def timed(attend):
        return median_ms(lambda: call(attend, q, k, v, grad, backward), args.reps, device)

    causal_pairs = batch * length * (length + 1) // 2
    ceiling_ms = timed(lambda *t: _attend(*t, is_causal=True))
    ceiling_rate = causal_pairs * flops_per_pair / ceiling_ms / 1e9
    emit(batch, length, "cudnn causal", ceiling_ms, ceiling_rate, None, 1.0)
    for name, window in (("docs", None), ("swa", args.window)):
        pairs = allowed_pairs(doc_start, window)
        block_mask = build_block_mask(doc_start, length, window, device)
        dense_ms = None
        for label in ("sdpa", "flex"):
            try:
                if label == "flex":
                    ms = timed(lambda *t: flex_attend(*t, block_mask))
                else:
                    mask = dense_mask(doc_start, window)[:, None]
                    ms = dense_ms = timed(lambda *t: _attend(*t, attn_mask=mask))
                    del mask
            except Exception as err:  # an out-of-memory dense mask at 32K is a result too
                emit(batch, length, f"{label} {name}", None, None, None, None, note=f"{type(err).__name__}")
                continue
            rate = pairs * flops_per_pair / ms / 1e9
            speedup = dense_ms / ms if label == "flex" and dense_ms else None
            emit(batch, length, f"{label} {name}", ms, rate, speedup, rate / ceiling_rate)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        mask_ms = median_ms(lambda: build_block_mask(doc_start, length, window, device), args.reps, device)
        emit(batch, length, f"block mask {name}", mask_ms, None, None, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x4096,2x16384,1x32768", help="micro-batch x length, comma-separated")
    parser.add_argument("--check-shape", default="8x4096", help="micro-batch x length of the checks")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048, help="sliding window of the swa rows")
    parser.add_argument("--mean-doc", type=float, default=1024.0, help="mean document length in tokens")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-checks", action="store_true", help="timings only")
    parser.add_argument("--checks-only", action="store_true", help="no timings")
    parser.add_argument("--json", help="also write the timing rows here (rewritten as each row finishes)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = device.type == "cuda"
    print(f"# {torch.cuda.get_device_name() if backward else 'CPU'}, torch {torch.__version__}, "
          f"H {args.heads}, dh {args.head_dim}, bf16, {'fwd+bwd' if backward else 'fwd only'}, "
          f"mean document {args.mean_doc:g} tokens, window {args.window}", flush=True)
    failed = 0 if args.no_checks else run_checks(args, device)

    records = []
    if not args.checks_only:
        print(f"\n{'shape':<10} {'row':<16} {'ms':>9} {'TFLOP/s':>8} {'speed-up':>9} {'of ceiling':>10}",
              flush=True)

    def emit(batch, length, row, ms, rate, speedup, of_ceiling, note=""):
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        print(f"{f'{batch}x{length}':<10} {row:<16} {fmt(ms, '9.3f'):>9} {fmt(rate, '8.1f'):>8} "
              f"{fmt(speedup, '8.2f') + ('x' if speedup else ''):>9} {fmt(of_ceiling, '10.2f'):>10} {note}", flush=True)
        records.append({"batch": batch, "length": length, "row": row, "ms": ms, "tflops": rate,
                        "speedup_vs_dense": speedup, "of_ceiling": of_ceiling, "note": note})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name() if backward else "cpu", "rows": records}, f,
                          indent=1)

    for batch, length in [] if args.checks_only else parse_shapes(args.shapes):
        time_shape(batch, length, args, device, backward, emit)
    if failed:
        print(f"\n{failed} check(s) missed their bound", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
