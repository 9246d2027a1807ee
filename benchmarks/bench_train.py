"""Training throughput: tokens/s and MFU per model, and what the data loader + logging cost on top of the step.

For each mixer, two runs of the real training loop (`atlas_train.train.trainer.train`, same engine, same settings,
same process):
  real:      the shard loader on a prepared dataset, metrics logged at the configured interval (train.log_every of
             configs/train/pretrain.yaml unless --log-every), tensorboard + metrics.jsonl
  synthetic: random batches made in the loop (no loader), metrics logged only at the two timestamps
Both run W warm-up steps and D timed steps (--warmup and --steps rounded up to multiples of the log interval); the
synthetic run logs every gcd(W, D) steps (only at W and W + D when W == D), so that both ends of the timed window
are logged steps of both runs. Per-step time is the wall time between them / D, so it includes everything the loop
does; the overhead column is real / synthetic - 1 (target: under 3%). With --no-overhead the real run logs every
step and nothing is rounded up (for models whose steps take minutes).

One H100 (the issue's numbers):
    python benchmarks/bench_train.py --model configs/model/340m.yaml --mixers atlas,transformer --seq-len 4096
Tiny, on CPU:
    python benchmarks/bench_train.py --model configs/model/demo.yaml --mixers atlas,transformer --seq-len 64 --steps 2 --log-every 2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


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


def run_once(model_cfg: str, mixer: str, *, synthetic: bool, data_dir: Path, out_dir: Path, args) -> dict:
    from atlas_train.config import load_config
    from atlas_train.train.trainer import train

    warm, span = args.warm, args.window
    steps = warm + span
    overrides = [
        f"model.mixer={mixer}", f"model.max_seq_len={args.seq_len}", f"data.path={data_dir}",
        f"data.num_workers={args.workers}", f"train.out_dir={out_dir}", f"train.steps={steps}",
        f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
        f"train.precision={'bf16' if torch.cuda.is_available() else 'fp32'}", f"train.zero_stage={args.zero_stage}",
        "train.eval_every=0", "train.save_every=0", "train.max_minutes=null", "train.resume=none",
        "train.progress=false",
        f"train.warmup_steps={steps}", f"train.synthetic_data={str(synthetic).lower()}",
        # synthetic: log only at the end of warm-up and at the end (the two timestamps); real: the configured interval
        f"train.log_every={math.gcd(warm, span) if synthetic else args.log_every}",
        *args.override,
    ]
    cfg = load_config([REPO / "configs" / "train" / "demo.yaml", model_cfg, REPO / "configs" / "data" / "demo.yaml"],
                      overrides)
    train(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "perf/elapsed_s" in r}
    step_s = (by_step[steps]["perf/elapsed_s"] - by_step[warm]["perf/elapsed_s"]) / span
    timed = [r for s, r in by_step.items() if s > warm]
    mfu = statistics.mean(r["perf/mfu"] for r in timed) if "perf/mfu" in timed[0] else None
    mem = max(r["perf/max_mem_gb"] for r in timed) if "perf/max_mem_gb" in timed[0] else None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"step_s": step_s, "tokens_s": args.micro_batch * args.seq_len / step_s, "mfu": mfu, "mem_gb": mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "configs" / "model" / "340m.yaml"), help="model config YAML")
    p.add_argument("--mixers", default="atlas,transformer", help="comma-separated model.mixer values")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps (rounded up to a multiple of the log interval)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (rounded up like --steps)")
    p.add_argument("--log-every", type=int, default=None,
                   help="log interval of the real run (default: train.log_every of configs/train/pretrain.yaml)")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the synthetic-batch run (and the overhead column): for models whose steps take minutes")
    p.add_argument("--override", nargs="*", default=[], metavar="key=value", help="extra config overrides")
    args = p.parse_args()

    from atlas_train.config import load_config

    if args.no_overhead:
        args.log_every = 1
    elif args.log_every is None:
        args.log_every = load_config([REPO / "configs" / "train" / "pretrain.yaml"]).train.log_every
    args.warm, args.window = (-(-n // args.log_every) * args.log_every for n in (args.warmup, args.steps))

    vocab = load_config([args.model]).model.vocab_size
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_dir = Path(tmp) / "data"
        rows = (args.warm + args.window + 2) * args.micro_batch
        write_random_dataset(data_dir, seq_len=args.seq_len, vocab_size=vocab, rows=rows)
        for mixer in args.mixers.split(","):
            real = run_once(args.model, mixer, synthetic=False, data_dir=data_dir, out_dir=Path(tmp) / f"{mixer}_real",
                            args=args)
            synth = None if args.no_overhead else run_once(args.model, mixer, synthetic=True, data_dir=data_dir,
                                                           out_dir=Path(tmp) / f"{mixer}_synth", args=args)
            results.append((mixer, real, synth))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nbench_train: {Path(args.model).name}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
          f"ZeRO-{args.zero_stage}, {args.window} timed steps after {args.warm}, real run logging every "
          f"{args.log_every}, on {device}")
    print(f"{'mixer':<12} {'tokens/s':>10} {'step ms':>9} {'MFU':>7} {'max mem GB':>11} {'synthetic ms':>13} "
          f"{'loader+log overhead':>20}")
    for mixer, real, synth in results:
        mfu = f"{100 * real['mfu']:.1f}%" if real["mfu"] is not None else "n/a"
        mem = f"{real['mem_gb']:.1f}" if real["mem_gb"] is not None else "n/a"
        synth_ms = f"{1000 * synth['step_s']:.1f}" if synth else "n/a"
        overhead = f"{100 * (real['step_s'] / synth['step_s'] - 1):.1f}%" if synth else "n/a"
        print(f"{mixer:<12} {real['tokens_s']:>10.0f} {1000 * real['step_s']:>9.1f} {mfu:>7} {mem:>11} "
              f"{synth_ms:>13} {overhead:>20}")


if __name__ == "__main__":
    main()
