"""Forward+backward time, throughput, peak memory and MFU of one model config on this machine.

    python -m atlas_train.model.bench --config configs/model/340m.yaml --seq-len 4096 --batch 1 [--mixers atlas,transformer]
    [--dtype bf16] [--steps 3] [key=value ...]

Prints one table row per mixer (the config's mixer unless --mixers lists several), so one command compares the
family at one shape. MFU uses AtlasLM.flops_per_token and --peak-tflops (H100 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from atlas_train.config import ConfigError, load_config
from atlas_train.model import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg, seq_len: int, batch: int, steps: int, dtype: torch.dtype, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocator, kernels)
        _sync(device)
        start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    step = min(times[1:])
    tokens = batch * seq_len
    flops = model.flops_per_token(seq_len) * tokens
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(mixer=cfg.mixer, params_m=sum(p.numel() for p in model.parameters()) / 1e6, step_s=step,
                tok_s=tokens / step, tflops=flops / step / 1e12, peak_gib=peak, loss=loss.item())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="YAML file(s) with a model: section")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixers", default=None, help="comma-separated family members to compare")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.update=chunk")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides).model
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixers = args.mixers.split(",") if args.mixers else [base.mixer]
    rows = []
    for mixer in mixers:
        try:
            cfg = load_config(args.config, [*args.overrides, f"model.mixer={mixer}"]).model
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        try:
            rows.append(measure(cfg, args.seq_len, args.batch, args.steps, DTYPES[args.dtype], device))
        except torch.OutOfMemoryError:
            rows.append(dict(mixer=mixer, error="out of memory"))
            torch.cuda.empty_cache()
    print(f"\ndevice {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {args.dtype}, "
          f"seq_len {args.seq_len}, batch {args.batch}")
    print(f"{'mixer':<12}{'params M':>10}{'step s':>10}{'tok/s':>11}{'TFLOP/s':>10}{'MFU %':>8}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mixer']:<12}{r['error']:>69}")
            continue
        mfu = 100 * r["tflops"] / args.peak_tflops
        print(f"{r['mixer']:<12}{r['params_m']:>10.1f}{r['step_s']:>10.3f}{r['tok_s']:>11.0f}{r['tflops']:>10.2f}"
              f"{mfu:>8.2f}{r['peak_gib']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
