"""Scaling of tensor and context parallelism, on 2 GPUs (more when available), one command:

    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py            # the three measurements below
    torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --quick    # demo model, short contexts (CPU smoke run)

1. CP weak scaling (--cp-model, default the 340M atlas): tokens/s per GPU at CP=1 with context T (the other GPU
   runs data parallel) and at CP=2 with context 2T, same model. Efficiency = CP=2 / CP=1 per GPU; goal >= 85%.
2. TP=2 strong scaling (--tp-model, default the 760M atlas) at context T: tokens/s per GPU at TP=1 (data parallel)
   and TP=2 with and without sequence parallelism. Efficiency = TP=2 / TP=1 per GPU; goal >= 80%.
3. The longest context that trains with CP=2 (--cp-model): T doubles from 2·(--seq-len) while the peak memory
   predicted from the previous size (activations grow linearly in T) stays under 90% of the GPU and the row's
   predicted time under --row-budget-s (so a lower bound when time, not memory, stops it: the table says which).

Each step = forward + backward of micro-batch 1 in bf16 + the gradient average over DP×CP that DeepSpeed does (one
flat all-reduce), timed with a fixed loop (warm-up, barrier, N steps, synchronize; the slowest rank counts). A
failing row aborts the run, since a rank that stops mid-step would leave its peers waiting. The table comes last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from atlas_train.config import load_config
from atlas_train.model import ModelConfig, build_model
from atlas_train.parallel import ParallelConfig, setup_parallel

ROOT = Path(__file__).resolve().parents[1]


def log(*parts) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def model_config(path: str, overrides: list[str]) -> ModelConfig:
    return load_config([ROOT / path], [f"model.{o}" for o in overrides]).model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: ModelConfig, par: ParallelConfig, seq_len: int, steps: int, device: torch.device) -> dict:
    """Tokens/s per GPU and peak memory of training steps for one parallel layout."""
    plan = setup_parallel(par)
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
    with torch.device(device):
        model = build_model(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = plan.parallelize(model.to(dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    reduce_group = plan.mpu.get_data_parallel_group() if plan.mpu else None
    gen = torch.Generator().manual_seed(plan.dp_rank)  # one sequence per DP replica, the same on its TP/CP ranks
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), generator=gen).to(device)
    batch = plan.shard_batch({"tokens": tokens, "doc_start": torch.zeros_like(tokens, dtype=torch.bool)})

    def step():
        loss = model(batch["input_ids"], batch["doc_start"], labels=batch["labels"]).loss
        loss.backward()
        if reduce_group is not None:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=reduce_group)
        for p in params:
            p.grad = None

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64, device=device)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0],
                        dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    del model, params, batch
    world = dist.get_world_size()
    tokens_per_step = plan.dp_size * seq_len  # micro-batch 1 per DP replica
    return dict(step_s=elapsed.item(), tok_s_gpu=tokens_per_step / elapsed.item() / world, peak_gib=peak.item())


def row(name: str, cfg: ModelConfig, par: ParallelConfig, seq_len: int, steps: int, device, results: list) -> dict:
    log(f"-- {name}: tp={par.tensor_parallel} cp={par.context_parallel} sp={par.sequence_parallel} T={seq_len}")
    out = measure(cfg, par, seq_len, steps, device)
    out.update(name=name, tp=par.tensor_parallel, cp=par.context_parallel, sp=par.sequence_parallel, T=seq_len)
    log(f"   {out}")
    results.append(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="demo model and short contexts (CPU smoke run)")
    parser.add_argument("--cp-model", default="configs/model/340m.yaml")
    parser.add_argument("--tp-model", default="configs/model/760m.yaml")
    parser.add_argument("--seq-len", type=int, default=4096, help="context T of the CP=1 and TP rows")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=1 << 20, help="stop the longest-context search here")
    parser.add_argument("--row-budget-s", type=float, default=150, help="longest-context search: skip rows "
                        "predicted to take longer")
    parser.add_argument("--model-override", action="append", default=[], help="e.g. update=chunk (model.* key)")
    parser.add_argument("--json", help="also write the rows here (rank 0)")
    parser.add_argument("--only", choices=["cp", "tp"], help="only the CP rows (weak scaling, longest context) or "
                        "only the TP rows")
    args = parser.parse_args()
    if args.quick:
        args.cp_model = args.tp_model = "configs/model/demo.yaml"
        args.seq_len, args.steps, args.max_seq_len = 128, 2, 512

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    assert world % 2 == 0, "run on an even number of GPUs (torchrun --nproc_per_node 2)"
    cp_cfg = model_config(args.cp_model, args.model_override)
    tp_cfg = model_config(args.tp_model, args.model_override)
    T, results = args.seq_len, []

    cp_eff, tp_eff, longest = None, {}, None
    if args.only != "tp":
        base = row("cp weak: CP=1 (DP)", cp_cfg, ParallelConfig(), T, args.steps, device, results)
        cp2 = row("cp weak: CP=2 at 2T", cp_cfg, ParallelConfig(context_parallel=2), 2 * T, args.steps, device,
                  results)
        cp_eff = cp2["tok_s_gpu"] / base["tok_s_gpu"]
        longest = longest_context(cp2, 2 * T, cp_cfg, args, device, results)
    if args.only != "cp":
        tp_eff = tp_rows(tp_cfg, T, args, device, results)
    if dist.get_rank() == 0:
        print_table(results, cp_eff, tp_eff, longest, args, device)
    dist.destroy_process_group()


def tp_rows(tp_cfg, T, args, device, results) -> dict:
    """TP strong scaling: per-GPU throughput of TP=2 (and TP=2 + SP on GPUs) against TP=1 at the same context."""
    tp1 = row("tp strong: TP=1 (DP)", tp_cfg, ParallelConfig(), T, args.steps, device, results)
    tp2 = row("tp strong: TP=2", tp_cfg, ParallelConfig(tensor_parallel=2), T, args.steps, device, results)
    tp_eff = {"TP=2": tp2["tok_s_gpu"] / tp1["tok_s_gpu"]}
    if device.type == "cuda":
        sp = row("tp strong: TP=2 + SP", tp_cfg, ParallelConfig(tensor_parallel=2, sequence_parallel=True), T,
                 args.steps, device, results)
        tp_eff["TP=2+SP"] = sp["tok_s_gpu"] / tp1["tok_s_gpu"]
    return tp_eff


def longest_context(longest, length, cp_cfg, args, device, results) -> dict:
    """Double the CP=2 context while it fits in memory and in the time budget; the last row that ran."""
    cuda = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else float("inf")
    # Every condition uses numbers all ranks share (all-reduced), so every rank leaves the loop together.
    while (2 * length <= args.max_seq_len and longest["peak_gib"] * 2 < 0.9 * capacity
           and 4 * longest["step_s"] <= args.row_budget_s):  # next row: warm-up + 1 step at twice the time
        length *= 2
        longest = row("cp longest context", cp_cfg, ParallelConfig(context_parallel=2), length, 1, device, results)
    return longest


def print_table(results, cp_eff, tp_eff, longest, args, device) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{dist.get_world_size()} x {device_name}; cp model {args.cp_model}, tp model {args.tp_model} "
          f"{' '.join(args.model_override)}")
    print(f"{'row':<24}{'tp':>3}{'cp':>3}{'sp':>4}{'T':>9}{'step s':>10}{'tok/s/GPU':>12}{'peak GiB':>10}")
    for r in results:
        print(f"{r['name']:<24}{r['tp']:>3}{r['cp']:>3}{'y' if r['sp'] else 'n':>4}{r['T']:>9}"
              f"{r['step_s']:>10.3f}{r['tok_s_gpu']:>12.0f}{r['peak_gib']:>10.2f}")
    if cp_eff is not None:
        print(f"CP weak-scaling efficiency (CP=2 at 2T vs CP=1 at T): {cp_eff:.1%}  (goal >= 85%)")
    for name, eff in tp_eff.items():
        print(f"TP strong-scaling efficiency per GPU ({name} vs TP=1): {eff:.1%}  (goal >= 80%)")
    if longest is not None:
        capacity = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
        stop = "memory" if capacity and longest["peak_gib"] * 2 >= 0.9 * capacity else "time or --max-seq-len"
        print(f"longest context trained with CP=2: {longest['T']} tokens (peak {longest['peak_gib']:.1f} GiB/GPU; "
              f"the search stopped on {stop})")


if __name__ == "__main__":
    main()
