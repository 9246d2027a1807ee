"""Decode speed: tokens/s of recurrent decoding at batch 1 and 32, 340M atlas vs transformer, at 4K and 32K context.

A memory model carries a fixed-size state (fast weights, momentum, window, conv), so its cost per new token must not
depend on how long the context already is; the transformer's KV cache grows with the context, and so does its cost
(and its memory: at 32K and batch 32 the 340M transformer's cache alone is about 100 GiB, so that point is skipped
on an 80 GB card). One command on one GPU:

    python benchmarks/bench_decode.py --cuda-graph --out $OUT/decode.json

The context is not prefilled: the decode cache of a context of T tokens is built directly, at the batch size being
timed (`synthetic_cache`). For a memory layer that is the state at position T: random fast weights, momentum and
conv tails of the right shapes and dtypes, a full Omega window of random keys, all in one document; for attention, a
KV cache of T (full attention) or window-1 (sliding window) random keys and values. The cost of a decode step depends
on the cache's shapes, never on its values, and a real 32K prefill through the token-mode memory would take far
longer than the measurement. `--prefill` builds the context by a real prefill instead (batch 1, in segments that
carry the cache, then repeated along the batch), for small contexts and to check the synthetic cache.

Each point times `--steps` decode steps after `--warmup` steps, each step a T=1 forward with the cache plus the greedy
choice of the next token, as `generate` does it. `--cuda-graph` adds, for every point, a row whose steps each replay
one captured CUDA graph on static buffers (atlas_train.eval.static_decode); a cache that grows every step (attention)
cannot be captured, and its graph row says so. The table is printed last; `vs shortest` is the time per step over
that of the shortest context for the same model, batch and mode (the 32K/4K ratio: 1 is flat). `cache GiB` is the
cache of the context as the model sees it (state, or T keys and values), not the spare room of a decode buffer; a
point whose decode would peak above the free memory (`peak_bytes`: about 3x that cache, 4x with a graph) is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
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
    p.add_argument("--prefill", action="store_true", help="build each context by a real prefill (slow at long T)")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prefill segment length (a multiple of chunk_size)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each point with every decode step replayed as one CUDA graph")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", help="results JSON")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache: dict) -> int:
    """Bytes of the cache's visible entries: an attention cache that is a view of a decode buffer counts the keys it
    holds, not the buffer's spare room (`attention._append`)."""
    return sum(t.numel() * t.element_size() for t in cache.values())


# How many caches' worth of memory a timed decode peaks at, beyond the weights. `_time_point` holds the cache it
# gives `time_decode` for the whole timing. An attention step copies its KV cache once into a buffer of twice the
# length and then fills it in place (`attention._append`): given + 2x buffer = 3x from the first step. A memory
# model's step builds a new state beside the previous one: given + old + new = 3x from the second step. A CUDA graph
# holds the given cache, its static inputs and outputs and the captured step's results in its pool: 4x. The extra
# 0.3 is room for the step's activations.
PEAK_CACHES = {"eager": 3.3, "graph": 4.3}


def peak_bytes(visible: int, mode: str) -> float:
    """Predicted peak memory of timing a decode (mode 'eager' or 'graph') from a cache of `visible` bytes."""
    return PEAK_CACHES[mode] * visible


@torch.no_grad()
def synthetic_cache(model, batch: int, context: int, device) -> dict:
    """The decode cache of `batch` sequences that have each seen `context` tokens of one document, built directly.

    The entries, their dtypes and their per-sequence shapes come from a real 1-token forward (batch-major, so only the
    batch and an attention cache's length differ); values are that state plus noise, KV caches random.
    """
    from atlas_train.model.atlas_mixer import AtlasMixer
    from atlas_train.model.attention import Attention

    template = model(torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).cache
    owners = {name + ".": m for name, m in model.named_modules() if isinstance(m, (AtlasMixer, Attention))}
    cache = {}
    for key, t in template.items():
        prefix = max((p for p in owners if key.startswith(p)), key=len)
        module, entry = owners[prefix], key[len(prefix):]
        if t.dim() == 0:  # positions: tokens seen
            cache[key] = torch.full_like(t, context)
        elif isinstance(module, Attention):
            kept = context if module.window is None else min(context, module.window - 1)
            if entry in ("k", "v"):
                cache[key] = torch.randn(batch, t.shape[1], kept, t.shape[3], dtype=t.dtype, device=device)
            else:  # k_doc (B, kept), doc (B,): everything in document 0
                cache[key] = torch.zeros(batch, *((kept,) if t.dim() == 2 else ()), dtype=t.dtype, device=device)
        elif t.dtype == torch.bool:  # the Omega window's validity: every cached key is in the document
            cache[key] = torch.ones(batch, *t.shape[1:], dtype=torch.bool, device=device)
        elif entry.endswith("count"):  # update="chunk": tokens of the open chunk
            cache[key] = torch.full((batch,), context % model.config.chunk_size, dtype=t.dtype, device=device)
        else:
            base = t.expand(batch, *t.shape[1:])
            cache[key] = base + 0.01 * torch.randn(base.shape, dtype=t.dtype, device=device)
    return cache


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
def time_decode(model, cache: dict, batch: int, steps: int, warmup: int, device, graph: bool = False) -> float:
    """Seconds per decode step (T=1 forward with the cache + greedy next token) at this batch; with `graph`, each
    step replays one captured CUDA graph (raises GrowingCacheError for a cache that grows)."""
    from atlas_train.eval.static_decode import StaticDecodeStep

    static = StaticDecodeStep(model, cache, use_graph=True) if graph else None
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        if static is not None:
            logits = static.step(token)
        else:
            out = model(token, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
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
    dims = batch_dims(model, cfg.vocab_size, cfg.chunk_size, device) if args.prefill else None
    rows, cache, have = [], None, 0
    for context in sorted(int(c) for c in args.contexts.split(",")):
        sync(device)
        t0 = time.perf_counter()
        if args.prefill:
            cache = prefill(model, cache, context - have, cfg.vocab_size, args.prefill_chunk, device)
            have, one = context, cache
        else:
            one = synthetic_cache(model, 1, context, device)
        sync(device)
        build_s = time.perf_counter() - t0
        per_seq = cache_bytes({k: t for k, t in one.items() if t.dim() > 0})
        del one
        for batch in (int(b) for b in args.batches.split(",")):
            for mode in ("eager", "graph") if args.cuda_graph else ("eager",):
                row = {"mixer": mixer, "context": context, "batch": batch, "mode": mode,
                       "cache_gib": per_seq * batch / 2**30,
                       "context_build": "prefill" if args.prefill else "synthetic", "build_s": round(build_s, 2)}
                row.update(_time_point(model, cache, dims, per_seq, context, batch, mode, args, device))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _time_point(model, cache, dims, per_seq: int, context: int, batch: int, mode: str, args, device) -> dict:
    """{ms_per_step, tokens_per_s} of one point, or {skipped: why}."""
    from atlas_train.eval.static_decode import GrowingCacheError

    free, need = free_bytes(device), peak_bytes(per_seq * batch, mode)
    if free is not None and need > free:
        return {"skipped": f"decoding from its {per_seq * batch / 2**30:.0f} GiB cache needs about "
                           f"{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"}
    try:
        start = repeat_cache(cache, dims, batch) if args.prefill else synthetic_cache(model, batch, context, device)
        step_s = time_decode(model, start, batch, args.steps, args.warmup, device, graph=mode == "graph")
    except torch.cuda.OutOfMemoryError:
        return {"skipped": "out of memory"}
    except GrowingCacheError:
        return {"skipped": "KV cache grows every step: no static graph buffers"}
    except RuntimeError as err:  # a failed capture costs this row, not the run's other rows
        if mode != "graph":
            raise
        traceback.print_exc()  # the log keeps which operation broke the capture
        return {"skipped": f"graph capture failed: {str(err).splitlines()[0][:100]}"}
    return {"ms_per_step": 1000 * step_s, "tokens_per_s": batch / step_s}


def table(rows: list[dict]) -> str:
    from atlas_train.eval.report import format_table

    shortest = {}
    for r in rows:
        if "ms_per_step" in r:
            shortest.setdefault((r["mixer"], r["batch"], r["mode"]), r["ms_per_step"])
    body = [
        [
            r["mixer"],
            r["context"],
            r["batch"],
            r.get("ms_per_step"),
            r.get("tokens_per_s"),
            r["cache_gib"],
            r["ms_per_step"] / shortest[(r["mixer"], r["batch"], r["mode"])] if "ms_per_step" in r else None,
            r["mode"],
            r.get("skipped", ""),
        ]
        for r in rows
    ]
    headers = ["model", "context", "batch", "ms/step", "tokens/s", "cache GiB", "vs shortest", "mode", "note"]
    return format_table(headers, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.cuda_graph and device.type != "cuda":
        print("bench_decode: error: --cuda-graph needs a CUDA device", file=sys.stderr)
        return 2
    info = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for mixer in args.mixers.split(","):
        rows += bench_mixer(mixer, args, device, dtype)
    if args.out:
        from atlas_train.eval.report import write_json

        write_json(args.out, {"device": info, "dtype": args.dtype, "config": args.config, "rows": rows,
                              "cuda_graph": args.cuda_graph,
                              "context_build": "prefill" if args.prefill else "synthetic"})
    build = "prefilled" if args.prefill else "synthetic (state at position T, see --help)"
    print(f"decode speed on {info}, {args.dtype}, {args.steps} steps after {args.warmup} warm-up steps, "
          f"context cache {build}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
