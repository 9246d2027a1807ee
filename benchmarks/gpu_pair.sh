#!/usr/bin/env bash
# Two GPUs of one host, one call of at most 10 minutes: the distributed equivalence checks over NCCL (90 s at most),
# then the scaling study (benchmarks/bench_parallel.py: TP=2 strong scaling of the 760M, CP=2 weak scaling and the
# longest CP=2 context of the 340M; its budget stops it by 380 s + 30 s grace and it always prints its table).
#   bash benchmarks/gpu_pair.sh        (from the repository root, .whl/ carried along)
cd "$(dirname "$0")/.." && source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step parallel_equivalence 90 torchrun --nproc_per_node 2 tests/parallel_worker.py
step parallel_bench 470 python3 benchmarks/bench_parallel.py --gpus 2 --budget-s 380 \
  --log-dir "$OUT/bench_parallel" --json "$OUT/bench_parallel.json"
