#!/usr/bin/env bash
# One H100/H200, one call of at most 10 minutes each:
#   bash benchmarks/gpu_single.sh          the single-GPU figures of benchmarks/RESULTS.md (about 8 minutes)
#   bash benchmarks/gpu_single.sh recall   issue 8's recall study: five members trained and scored on MQAR (about
#                                          8 minutes; afterwards, on a CPU machine with matplotlib:
#                                          python benchmarks/recall_study.py --render <files_at>/recall)
# (from the repository root, .whl/ carried along)
cd "$(dirname "$0")/.." && source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ "${1:-}" == recall ]]; then
  step recall_study 570 python3 benchmarks/recall_study.py --out "$OUT/recall" --work /tmp/recall
  exit
fi
step train_340m_transformer 120 python3 benchmarks/bench_train.py --model configs/model/340m.yaml \
  --mixers transformer --seq-len 4096 --steps 5 --warmup 2
step train_340m_atlas 290 python3 benchmarks/bench_train.py --model configs/model/340m.yaml \
  --mixers atlas --seq-len 4096 --steps 1 --warmup 1 --no-overhead
step memory_scan_16k 110 python3 benchmarks/bench_memory_scan.py --dh 64 --lengths 16384 --budget-s 60
