"""Decode speed: tokens/s of recurrent decoding at batch 1 and 32, 340M atlas vs transformer, at 4K and 32K context.

A memory model carries a fixed-size state (fast weights, momentum, window, conv), so its cost per new token must not
depend on how long the context already is; the transformer's KV cache grows with the context, and so does its cost
(and its memory: at 32K and batch 32 the 340M transformer's cache alone is about 100 GiB). One command on one GPU:

    python benchmarks/bench_decode.py --out $OUT/decode.json

For each model the context is built once at batch 1 by a real prefill (in segments that carry the cache), 4K then
continued to 32K; the batch-32 cache is that state repeated along the batch dimension (the cost of a decode step
depends on the cache's shapes, not on its values). Each point times `--steps` decode steps after `--warmup` steps,
each step a T=1 forward with the cache plus the greedy choice of the next token, as `generate` does it.
The table is printed last; `flat` is the time per step at the longest context over the shortest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/model/340m.yaml"))
    p.add_argument("--mixers", default="atlas,transformer")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prefill segment length (a multiple of chunk_size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", help="results JSON")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache: dict) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())


@torch.no_grad()
def batch_dims(model, vocab: int, chunk: int, device) -> dict[str, int | None]:
    """Which dim of each cache entry is the batch: compare caches of batch 1 and 2 (None: shared, e.g. `pos`)."""
    ids = torch.randint(0, vocab, (2, chunk + 1), device=device)
    one, two = model(ids[:1], use_cache=True).cache, model(ids, use_cache=True).cache
    dims = {}
    for key, t in one.items():
        differ = [d for d, (a, b) in enumerate(zip(t.shape, two[key].shape)) if a != b]
        if len(differ) > 1 or (differ and (t.shape[differ[0]], two[key].shape[differ[0]]) != (1, 2)):
            raise RuntimeError(
                f"cache entry {key}: cannot tell its batch dim from {tuple(t.shape)} vs {tuple(two[key].shape)}"
            )
        dims[key] = differ[0] if differ else None
    return dims


def repeat_cache(cache: dict, dims: dict, batch: int) -> dict:
    """A fresh copy of a batch-1 cache with every per-sequence entry repeated to `batch` rows."""
    out = {}
    for key, t in cache.items():
        d = dims[key]
        out[key] = t.clone() if d is None else t.repeat(*[batch if i == d else 1 for i in range(t.dim())])
    return out


@torch.no_grad()
def prefill(model, cache, n_tokens: int, vocab: int, segment: int, device):
    """Extend a batch-1 context by n_tokens random tokens, segment by segment; returns the new cache."""
    for start in range(0, n_tokens, segment):
        ids = torch.randint(0, vocab, (1, min(segment, n_tokens - start)), device=device)
        cache = model(ids, cache=cache, use_cache=True).cache
    return cache


@torch.no_grad()
def time_decode(model, cache: dict, batch: int, steps: int, warmup: int, device) -> float:
    """Seconds per decode step (T=1 forward with the cache + greedy next token) at this batch."""
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


def free_bytes(device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def bench_mixer(mixer: str, args, device, dtype) -> list[dict]:
    from atlas_train.config import load_config
    from atlas_train.model import build_model

    cfg = load_config([args.config], [f"model.mixer={mixer}"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    dims = batch_dims(model, cfg.vocab_size, cfg.chunk_size, device)
    rows, cache, have = [], None, 0
    for context in sorted(int(c) for c in args.contexts.split(",")):
        sync(device)
        t0 = time.perf_counter()
        cache = prefill(model, cache, context - have, cfg.vocab_size, args.prefill_chunk, device)
        sync(device)
        prefill_s, have = time.perf_counter() - t0, context
        per_seq = cache_bytes({k: t for k, t in cache.items() if dims[k] is not None})
        for batch in (int(b) for b in args.batches.split(",")):
            row = {
                "mixer": mixer,
                "context": context,
                "batch": batch,
                "cache_gib": per_seq * batch / 2**30,
                "prefill_s": round(prefill_s, 2),
            }
            free = free_bytes(device)
            if free is not None and per_seq * batch * 1.2 > free:
                row["skipped"] = f"cache needs {per_seq * batch / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
            else:
                try:
                    step_s = time_decode(
                        model, repeat_cache(cache, dims, batch), batch, args.steps, args.warmup, device
                    )
                    row.update(ms_per_step=1000 * step_s, tokens_per_s=batch / step_s)
                except torch.cuda.OutOfMemoryError:
                    row["skipped"] = "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    from atlas_train.eval.report import format_table

    shortest = {}
    for r in rows:
        if "ms_per_step" in r:
            shortest.setdefault((r["mixer"], r["batch"]), r["ms_per_step"])
    body = [
        [
            r["mixer"],
            r["context"],
            r["batch"],
            r.get("ms_per_step"),
            r.get("tokens_per_s"),
            r["cache_gib"],
            r["ms_per_step"] / shortest[(r["mixer"], r["batch"])] if "ms_per_step" in r else None,
            r.get("skipped", ""),
        ]
        for r in rows
    ]
    return format_table(["model", "context", "batch", "ms/step", "tokens/s", "cache GiB", "flat", "note"], body)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for mixer in args.mixers.split(","):
        rows += bench_mixer(mixer, args, device, dtype)
    if args.out:
        from atlas_train.eval.report import write_json

        write_json(args.out, {"device": info, "dtype": args.dtype, "config": args.config, "rows": rows})
    print(f"decode speed on {info}, {args.dtype}, {args.steps} steps after {args.warmup} warm-up steps")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
