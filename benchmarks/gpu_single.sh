#!/usr/bin/env bash
# One H100/H200, one call of at most 10 minutes per mode (from the repository root, .whl/ carried along):
#   bash benchmarks/gpu_single.sh scan     issue 6: Newton-Schulz alone (Triton kernel, cuBLAS path, compiled
#                                          PyTorch), then the scan at 4K, dh 64 and 128, against its baselines
#   bash benchmarks/gpu_single.sh ns-rounding  issue 6: Newton-Schulz alone at dh 64 and 128 with its checks and the scan
#                                          at 4K (graphs, tf32 and bf16), then NS and the tf32 scan again with tf32
#                                          operands left to tl.dot (truncated on Hopper; the kernels before the
#                                          seventh session) as the same-call baseline
#   bash benchmarks/gpu_single.sh ns-routing   issue 6: the scan at 4K (graphs, the default bf16 NS) with its checks under
#                                          the dispatcher's rule, then under the rule before the seventh session
#                                          (Triton NS only up to a short side of 64) as the same-call baseline
#   bash benchmarks/gpu_single.sh scan-table DH [--skip-checks]   issue 6's table for one head dim: the scan at
#                                          4K/16K/64K, both updates, graphs vs the compiled baseline vs cuDNN SDPA
#   bash benchmarks/gpu_single.sh scan-mlp issue 6: the opt-in memory MLP kernel (checks of the pass alone and of the
#                                          scan with and without it, then the default graphs path with and without
#                                          it, 4K/16K, dh 64 and 128)
#   bash benchmarks/gpu_single.sh train    issue 4: 340M transformer (with the loader + logging overhead) and atlas
#                                          (token and chunk update) at 4K, one call
#   bash benchmarks/gpu_single.sh decode   issue 8: decode at 4K/32K, batch 1/32, eager and CUDA graph (cold Triton cache)
#   bash benchmarks/gpu_single.sh recall   issue 8: five members trained at once (round-robin over however many GPUs
#                                          are visible) and scored on MQAR, 8.5 minutes in all; afterwards, on a CPU
#                                          machine with matplotlib: python benchmarks/recall_study.py --render DIR
cd "$(dirname "$0")/.." && source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  scan)
    step ns_only 200 python3 benchmarks/bench_memory_scan.py --ns-only --dh 64 128 --budget-s 160
    step memory_scan_4k 330 python3 benchmarks/bench_memory_scan.py --dh 64 128 --lengths 4096 --budget-s 270 \
      --row-budget-s 12
    ;;
  ns-rounding)
    scan=(python3 benchmarks/bench_memory_scan.py --dh 64 128 --lengths 4096 --variants graphs --row-budget-s 12
          --skip-checks --budget-s 70)
    step ns_only 200 python3 benchmarks/bench_memory_scan.py --ns-only --dh 64 128 --budget-s 180
    step scan_tf32 90 "${scan[@]}" --ns-precision tf32
    step scan_bf16 90 "${scan[@]}" --ns-precision bf16
    # Same-call baseline: the kernels as they were, tf32 operands left to tl.dot (which truncates them on Hopper).
    # Edits only this machine's copy of the tree.
    sed -i 's/tl.dot(as_operand(x, PRECISION), as_operand(y, PRECISION),/tl.dot(x, y,/' kernels/triton_common.py
    ! grep -q "tl.dot(as_operand" kernels/triton_common.py || { echo "baseline edit failed"; exit 1; }
    step ns_only_truncating 150 python3 benchmarks/bench_memory_scan.py --ns-only --dh 64 128 --budget-s 130 \
      --skip-checks
    step scan_tf32_truncating 90 "${scan[@]}" --ns-precision tf32
    ;;
  ns-routing)
    scan=(python3 benchmarks/bench_memory_scan.py --dh 64 128 --lengths 4096 --variants graphs --row-budget-s 12)
    step scan_rule 330 "${scan[@]}" --budget-s 300
    step scan_short_side_64 100 "${scan[@]}" --budget-s 80 --skip-checks --triton-max-short-side 64
    ;;
  scan-table)
    step "memory_scan_dh$2" 580 python3 benchmarks/bench_memory_scan.py --dh "$2" --lengths 4096 16384 65536 \
      --variants torch.compile graphs --budget-s 520 --row-budget-s 25 "${@:3}"
    ;;
  scan-mlp)
    step memory_scan_mlp 580 python3 benchmarks/bench_memory_scan.py --dh 64 128 --lengths 4096 16384 \
      --variants graphs graphs-mlp --budget-s 520 --row-budget-s 25
    ;;
  train)
    step train_transformer 90 python3 benchmarks/bench_train.py --model configs/model/340m.yaml --mixers transformer \
      --seq-len 4096
    step train_atlas_chunk 90 python3 benchmarks/bench_train.py --model configs/model/340m.yaml --mixers atlas \
      --seq-len 4096 --steps 2 --warmup 1 --log-every 1 --no-overhead --override model.update=chunk
    step train_atlas_token 200 python3 benchmarks/bench_train.py --model configs/model/340m.yaml --mixers atlas \
      --seq-len 4096 --steps 1 --warmup 1 --log-every 1 --no-overhead
    ;;
  decode)
    # An empty Triton cache, as on a fresh machine: the condition under which a capture once failed (static_calls)
    step decode 240 env TRITON_CACHE_DIR="$(mktemp -d)" python3 benchmarks/bench_decode.py --cuda-graph --steps 8 \
      --warmup 2 --out "$OUT/decode.json"
    ;;
  recall)
    step recall_study 560 python3 benchmarks/recall_study.py --out "$OUT/recall" --work /tmp/recall --budget-minutes 8.5
    ;;
  *)
    echo "usage: bash benchmarks/gpu_single.sh scan|ns-rounding|ns-routing|scan-table DH [--skip-checks]|scan-mlp|train|decode|recall" >&2
    exit 2
    ;;
esac
