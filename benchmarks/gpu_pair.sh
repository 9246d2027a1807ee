#!/usr/bin/env bash
# Two GPUs of one host, one call (about 9.5 minutes): the distributed equivalence checks over NCCL, the 340M atlas
# training step on one of the GPUs, and the CP/TP scaling rows.
#   bash benchmarks/gpu_pair.sh        (from the repository root, .whl/ carried along)
cd "$(dirname "$0")/.." && source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step parallel_equivalence 90 torchrun --nproc_per_node 2 tests/parallel_worker.py
CUDA_VISIBLE_DEVICES=0 step train_340m_atlas 250 python3 benchmarks/bench_train.py --model configs/model/340m.yaml \
  --mixers atlas --seq-len 4096 --steps 1 --warmup 1 --no-overhead
step parallel_bench 220 torchrun --nproc_per_node 2 benchmarks/bench_parallel.py --cp-model configs/model/170m.yaml \
  --tp-model configs/model/170m.yaml --model-override update=chunk --steps 2 --max-seq-len 65536 --row-budget-s 30 \
  --json "$OUT/bench_parallel.json"
