"""Training throughput of the real loop at production shapes: tokens/s, MFU, peak memory and where a step goes.

Each row is one mixer (and update) at one context length, run through `atlas_train.train.trainer.train` in its own
process (DeepSpeed engine, shard loader on a prepared random-token dataset, metrics logging, the train config's
speed settings): W warm-up steps, then D timed steps (memory rows: one warm-up step, then --memory-steps). By
default every micro-step holds 32K tokens per GPU (micro-batch 8 at 4K, 2 at 16K, 1 at 32K) with gradient
accumulation 1; `--micro-batch auto` lets the trainer's probe pick it. Rows print as they finish, so a time-limited
run keeps what it measured.

Columns:
- tokens/s: tokens of the timed steps / their wall time (logging and data included).
- MFU: model FLOPs per token (atlas_train/model/flops.py: dense layers, attention, the memory's inner loop with its
  window gradients, Newton–Schulz and reads; recomputation not counted) × tokens/s / the card's dense bf16 peak
  (--peak-tflops, 989 for an H100 SXM). "of ceiling": the same over the bf16 matmul rate measured at the start of
  this run (8192³), which is what a perfect step of large matmuls could reach on this card.
- fwd / bwd / opt: device time of the forward, backward and optimizer step per step (CUDA events, train.phase_timing);
  other: the rest of the wall time (data loading, logging, host gaps).
- overhead (rows listed in --overhead): the same row rerun on synthetic batches logged only at the two timestamps;
  real / synthetic - 1 is what the loader and the logging cost.
- --profile: one more step per row under torch.profiler (train.profile_step), after the timed ones; its kernels by
  device time go into the row's log, its trace into --logs.
- Rows listed in --baseline run first, labelled "before", with the engine's plain settings (no compilation, full
  recompute, logits + cross-entropy): the same-call baseline of the speed settings.

One GPU (the issue's table):
    python benchmarks/bench_train.py --budget-s 540
Tiny, on CPU:
    python benchmarks/bench_train.py --model configs/model/demo.yaml --rows transformer@64,atlas@64 \
        --tokens-per-step 128 --steps 2 --warmup 1 --overhead transformer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BASELINE_OVERRIDES = ["train.compile=false", "train.activation_checkpointing=full", "train.fused_cross_entropy=false"]
DEFAULT_ROWS = ("transformer@4096,atlas@4096,atlas:token@4096,titans@4096,atlas_mag@4096,"
                "transformer@16384,atlas@16384,transformer@32768,atlas@32768")


def parse_row(text: str) -> dict:
    """"mixer[:update]@seq_len[/key=value/...]" -> {"mixer", "update", "seq_len", "override"} (update defaults to
    chunk for memory mixers; the overrides apply to this row only)."""
    head, *overrides = text.split("/")
    name, _, length = head.partition("@")
    mixer, _, update = name.partition(":")
    return {"mixer": mixer, "update": update or "chunk", "seq_len": int(length), "override": overrides}


def plain_name(row: dict) -> str:
    """The row's label and length as a file name without spaces (the device returns no file with one)."""
    return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', row_label(row))}_{row['seq_len']}"


def row_label(row: dict) -> str:
    label = row["mixer"] if row["mixer"] == "transformer" else f"{row['mixer']}:{row['update']}"
    tags = [o.rsplit(".", 1)[-1] for o in row.get("override", [])] + (["before"] if row.get("baseline") else [])
    return " ".join([label, *tags])


def write_random_dataset(out_dir: Path, *, seq_len: int, vocab_size: int, rows: int) -> None:
    """Random-token shards through the project's writer: loader cost does not depend on what the tokens say."""
    from atlas_train.data_prep.writer import write_dataset

    rng = np.random.default_rng(0)

    def gen(n):
        for _ in range(n):
            doc_start = np.zeros(seq_len + 1, dtype=bool)
            doc_start[0] = True
            yield rng.integers(0, vocab_size, seq_len + 1), doc_start

    write_dataset(out_dir, {"train": gen(rows), "val": gen(4)}, seq_len=seq_len, vocab_size=vocab_size,
                  shard_size_mb=64.0)


def matmul_ceiling_tflops() -> float | None:
    """The bf16 dense matmul rate of this card (8192³, median of 20), or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


# ---------------------------------------------------------------------------------------------------------- child


def batch_overrides(spec: dict) -> list[str]:
    """A fixed micro-batch runs `grad_accum` of them; `auto` makes up tokens-per-step rows with accumulation."""
    if spec["micro_batch"] == "auto":
        rows = max(1, spec["tokens_per_step"] // spec["seq_len"]) * spec["grad_accum"]
        return [f"train.global_batch_size={rows}", "train.grad_accum=1"]
    return ["train.global_batch_size=null", f"train.grad_accum={spec['grad_accum']}"]


def run_training(spec: dict, *, synthetic: bool, out_dir: Path) -> dict:
    """One training run of `spec`'s row; its timed-window figures from metrics.jsonl."""
    from atlas_train.config import load_config
    from atlas_train.train.trainer import train

    warm, span = spec["warmup"], spec["steps"]
    steps = warm + span
    profiled = spec["profile"] and not synthetic  # one more step after the timed ones, under the profiler
    # synthetic: logged only at the end of warm-up and at the end (the two timestamps); real: every step
    log_every = math.gcd(warm, span) if synthetic else 1
    overrides = [
        f"model.mixer={spec['mixer']}", f"model.update={spec['update']}", f"model.max_seq_len={spec['seq_len']}",
        f"data.path={spec['data_dir']}", f"data.num_workers={spec['workers']}", f"train.out_dir={out_dir}",
        f"train.steps={steps + profiled}", f"train.seq_len={spec['seq_len']}",
        f"train.micro_batch_size={spec['micro_batch']}", *batch_overrides(spec),
        f"train.precision={'bf16' if torch.cuda.is_available() else 'fp32'}", f"train.zero_stage={spec['zero_stage']}",
        "train.eval_every=0", "train.save_every=0", "train.max_minutes=null", "train.resume=none",
        "train.progress=false", f"train.warmup_steps={steps}", f"train.synthetic_data={str(synthetic).lower()}",
        f"train.log_every={log_every}", f"train.phase_timing={str(not synthetic).lower()}",
        f"train.peak_tflops={spec['peak_tflops']}", *([f"train.profile_step={steps + 1}"] if profiled else []),
        *spec["override"],
    ]
    cfg = load_config([REPO / "configs" / "train" / "pretrain.yaml", spec["model"]], overrides)
    train(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "perf/elapsed_s" in r}
    step_s = (by_step[steps]["perf/elapsed_s"] - by_step[warm]["perf/elapsed_s"]) / span
    timed = [r for s, r in by_step.items() if warm < s <= steps]
    resolved = load_config([out_dir / "config.yaml"]).train
    tokens_per_step = resolved.micro_batch_size * resolved.grad_accum * spec["seq_len"]
    result = {"step_s": step_s, "tokens_s": tokens_per_step / step_s, "micro_batch": resolved.micro_batch_size,
              "grad_accum": resolved.grad_accum, "recompute": resolved.activation_checkpointing}

    def mean(key):
        values = [r[key] for r in timed if key in r]
        return sum(values) / len(values) if values else None

    result.update({name: mean(f"perf/{name}") for name in ("mfu", "forward_s", "backward_s", "optimizer_s")})
    result["mem_gb"] = max((r["perf/max_mem_gb"] for r in timed if "perf/max_mem_gb" in r), default=None)
    if profiled:
        print((out_dir / "profile" / "kernels.rank0.txt").read_text(), flush=True)  # into the row's log
        if spec["logs"]:
            shutil.copy(out_dir / "profile" / "trace.rank0.json.gz",
                        Path(spec["logs"]) / f"{spec['name']}.trace.json.gz")
    return result


def child(spec: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_train_run_") as tmp:
        result = run_training(spec, synthetic=False, out_dir=Path(tmp) / "real")
        if spec["overhead"]:
            result["synthetic_step_s"] = run_training(spec, synthetic=True, out_dir=Path(tmp) / "synth")["step_s"]
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------- parent


def failure_reason(log: Path) -> str:
    """The line of a failed row's log that says why (the last error message, a C++ abort's "what()"), else its
    last lines."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    said = [line for line in lines if "Error" in line or "what():" in line or "error:" in line]
    return (said[-1] if said else " | ".join(lines[-3:]))[-300:]


HEADER = (f"{'row':<24} {'T':>6} {'mb':>3} {'acc':>3} {'recompute':>9} {'tokens/s':>9} {'MFU':>6} {'of ceil':>7} "
          f"{'step ms':>9} {'fwd':>8} {'bwd':>8} {'opt':>7} {'other':>7} {'peak GiB':>8} {'overhead':>8}")


def format_row(row: dict, r: dict, ceiling: float | None, peak: float) -> str:
    def ms(x):
        return f"{1000 * x:.1f}" if x is not None else "n/a"

    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    of_ceiling = f"{100 * r['mfu'] * peak / ceiling:.1f}%" if r.get("mfu") is not None and ceiling else "n/a"
    phases = [r.get(k) for k in ("forward_s", "backward_s", "optimizer_s")]
    other = r["step_s"] - sum(phases) if None not in phases else None
    mem = f"{r['mem_gb']:.1f}" if r.get("mem_gb") is not None else "n/a"
    overhead = f"{100 * (r['step_s'] / r['synthetic_step_s'] - 1):.1f}%" if r.get("synthetic_step_s") else ""
    return (f"{row_label(row):<24} {row['seq_len']:>6} {r['micro_batch']:>3} {r['grad_accum']:>3} "
            f"{r['recompute']:>9} {r['tokens_s']:>9.0f} {mfu:>6} {of_ceiling:>7} {ms(r['step_s']):>9} "
            f"{ms(phases[0]):>8} {ms(phases[1]):>8} {ms(phases[2]):>7} {ms(other):>7} {mem:>8} {overhead:>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "configs" / "model" / "340m.yaml"), help="model config YAML")
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help="comma-separated mixer[:update]@seq_len[/key=value...] (overrides for that row only)")
    p.add_argument("--tokens-per-step", type=int, default=32768, help="tokens per GPU per micro-step")
    p.add_argument("--micro-batch", default=None, help="fixed micro-batch, or auto (default: tokens-per-step / T)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (compilation, graph capture)")
    p.add_argument("--memory-steps", type=int, default=2,
                   help="timed steps for memory rows (steps of seconds; one warm-up step captures their graphs)")
    p.add_argument("--slow-steps", type=int, default=1,
                   help="timed steps for memory rows with update=token (steps of tens of seconds)")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--baseline", default="", help="comma-separated rows to run first with the plain settings")
    p.add_argument("--overhead", default="transformer",
                   help="comma-separated row labels that also run on synthetic batches (the overhead column)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    p.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    p.add_argument("--row-timeout-s", type=float, default=420.0)
    p.add_argument("--json", default=None, help="write every row's figures here")
    p.add_argument("--logs", default=None, help="keep every row's training log in this folder")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step after the timed ones: its kernel table goes into the row's log, and "
                        "with --logs its trace beside it")
    p.add_argument("--override", nargs="*", default=[], metavar="key=value", help="extra config overrides (all rows)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return

    from atlas_train.config import load_config

    started = time.monotonic()
    rows = [{**parse_row(text), "baseline": True} for text in args.baseline.split(",") if text]
    rows += [parse_row(text) for text in args.rows.split(",") if text]
    overhead_rows = set(args.overhead.split(",")) if args.overhead else set()
    vocab = load_config([args.model]).model.vocab_size
    ceiling = matmul_ceiling_tflops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"bench_train: {Path(args.model).name}, {args.tokens_per_step} tokens per micro-step, "
          f"ZeRO-{args.zero_stage}, on {device}; bf16 matmul ceiling "
          f"{f'{ceiling:.0f} TFLOP/s ({100 * ceiling / args.peak_tflops:.0f}% of peak)' if ceiling else 'n/a'}",
          flush=True)
    print(HEADER, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        datasets = {}
        for number, row in enumerate(rows):
            if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                print(f"{row_label(row):<24} {row['seq_len']:>6}  not run: budget spent", flush=True)
                continue
            T = row["seq_len"]
            micro = args.micro_batch or str(max(1, args.tokens_per_step // T))
            memory = row["mixer"] != "transformer"
            steps = (args.slow_steps if row["update"] == "token" else args.memory_steps) if memory else args.steps
            warmup = 1 if memory else args.warmup
            if T not in datasets:
                datasets[T] = Path(tmp) / f"data_{T}"
                rows_needed = (warmup + steps + 2) * args.grad_accum * max(1, args.tokens_per_step // T) * 2
                write_random_dataset(datasets[T], seq_len=T, vocab_size=vocab, rows=rows_needed)
            spec = {**row, "model": args.model, "data_dir": str(datasets[T]), "micro_batch": micro,
                    "grad_accum": args.grad_accum, "tokens_per_step": args.tokens_per_step,
                    "zero_stage": args.zero_stage, "workers": args.workers,
                    "warmup": warmup, "steps": steps, "peak_tflops": args.peak_tflops,
                    "override": args.override + row["override"] + (BASELINE_OVERRIDES if row.get("baseline") else []),
                    "overhead": row_label(row) in overhead_rows, "result": str(Path(tmp) / "result.json"),
                    "profile": args.profile, "logs": args.logs, "name": f"{number:02d}_{plain_name(row)}"}
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            Path(spec["result"]).unlink(missing_ok=True)
            log = Path(tmp) / f"{plain_name(row)}.log"
            try:
                with log.open("w") as out:
                    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], stdout=out,
                                          stderr=subprocess.STDOUT, timeout=args.row_timeout_s, env=os.environ.copy())
                failed = proc.returncode != 0 or not Path(spec["result"]).exists()
                reason = f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed, reason = True, f"timed out after {args.row_timeout_s:.0f} s"
            if args.logs:
                shutil.copy(log, Path(args.logs) / f"{spec['name']}.log")
            if failed:
                print(f"{row_label(row):<24} {T:>6}  failed ({reason}): {failure_reason(log)}", flush=True)
                continue
            result = json.loads(Path(spec["result"]).read_text())
            results.append({**row, **result})
            print(format_row(row, result, ceiling, args.peak_tflops), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "ceiling_tflops": ceiling, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
