#!/usr/bin/env bash
# One GPU, one call of at most 10 minutes per mode (from the repository root, .whl/ carried along):
#   bash benchmarks/gpu_single.sh scan     Newton-Schulz alone (Triton kernel, cuBLAS path, compiled PyTorch), then
#                                          the scan at 4K, dh 64 and 128, against its baselines
#   bash benchmarks/gpu_single.sh scan-table DH [--skip-checks]   the scan's table for one head dim: 4K/16K/64K,
#                                          both updates, graphs vs the compiled baseline vs cuDNN SDPA
#   bash benchmarks/gpu_single.sh scan-batch   the scan at the production shape (B·H = 128 at 4K, dh 64) against
#                                          cuDNN attention of the same shape, both updates, with and without the chunk
#                                          steps compiled, then where the chunk update's time goes (profile with a
#                                          roofline) and its operators and bytes per chunk at dh 64
#   bash benchmarks/gpu_single.sh dual     the deep_transformer scan at B·H = 128, 4K, dh 64 against cuDNN attention
#                                          of that shape, then a bf16 run's error against float64 at 4K
#   bash benchmarks/gpu_single.sh speed    one call for scarce machines: the speed paths' checks, the scan at B·H = 128
#                                          (graphs) against cuDNN attention, then as much of train's table as fits
#   bash benchmarks/gpu_single.sh train    the speed paths checked against the plain ones, then the 340M at 4K and
#                                          32K tokens per micro-step: the transformer with plain settings (baseline)
#                                          and the speed settings, atlas, titans, atlas_mag, then atlas with the
#                                          token update (its steps take tens of seconds, so it goes last)
#   bash benchmarks/gpu_single.sh train-long   the same at 16K and 32K: transformer and atlas
#   bash benchmarks/gpu_single.sh engine   the transformer alone at 4K: plain settings (baseline), speed settings at
#                                          micro-batch 8 and 16, each with a profiled step (kernel table in its log)
#   bash benchmarks/gpu_single.sh tune     most needed first: the chunk scan at B·H = 128 as configured, with the
#                                          fused Muon step and with its chunk steps compiled; the fused Muon step's
#                                          and the chunk scan's checks; the fused step alone against the unfused
#                                          one (bench_muon_step.py: its roofline); the dual scan, with and without
#                                          its chunk terms compiled, its profile and bf16 check; the dual attention
#                                          kernel's launch settings alone, then the dual scan under the fastest; the
#                                          same for the memory MLP kernel and the chunk scan
#   bash benchmarks/gpu_single.sh tune-train  the transformer, atlas, titans and deep_transformer at 4K in the
#                                          training loop, atlas and titans again with the fused Muon step; profiles
#                                          of the chunk scan without and with it
#   bash benchmarks/gpu_single.sh decode   decode at 4K/32K, batch 1/32, eager and CUDA graph (cold Triton cache)
#   bash benchmarks/gpu_single.sh recall   the eight members trained at once (round-robin over however many GPUs are
#                                          visible) and scored on MQAR, 8.5 minutes in all; afterwards, on a CPU
#                                          machine with matplotlib: python benchmarks/recall_study.py --render DIR
# A baseline that needs another code path comes from a flag of the benchmark (bench_memory_scan.py --variants,
# --ns-precision, --triton-max-short-side; bench_train.py --override), never from editing the tree.
cd "$(dirname "$0")/.." && source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  scan)
    step ns_only 200 python3 benchmarks/bench_memory_scan.py --ns-only --dh 64 128 --budget-s 160
    step memory_scan_4k 330 python3 benchmarks/bench_memory_scan.py --dh 64 128 --lengths 4096 --budget-s 270 \
      --row-budget-s 12
    ;;
  speed)
    step check_speed_paths 90 python3 benchmarks/check_speed_paths.py
    step memory_scan_b8 150 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 \
      --variants graphs --skip-checks --budget-s 120 --row-budget-s 30
    step train_4k 320 python3 benchmarks/bench_train.py --baseline transformer@4096 \
      --rows transformer@4096,atlas@4096,titans@4096,atlas_mag@4096,atlas:token@4096 --budget-s 260 \
      --json "$OUT/train_4k.json" --logs "$OUT/rows"
    ;;
  scan-batch)
    step memory_scan_b8 240 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 \
      --variants graphs graphs+compile --skip-checks --budget-s 200 --row-budget-s 40
    step profile_b8 150 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 --updates chunk \
      --profile 25 --skip-checks
    step count_ops 90 python3 benchmarks/bench_memory_scan.py --count-ops --skip-checks --dh 64 --lengths 4096
    ;;
  dual)
    step dual_scan 300 python3 benchmarks/bench_dual_scan.py --torch-pass
    ;;
  scan-table)
    step "memory_scan_dh$2" 580 python3 benchmarks/bench_memory_scan.py --dh "$2" --lengths 4096 16384 65536 \
      --variants torch.compile graphs --budget-s 520 --row-budget-s 25 "${@:3}"
    ;;
  train)
    step check_speed_paths 120 python3 benchmarks/check_speed_paths.py
    step train_4k 440 python3 benchmarks/bench_train.py --baseline transformer@4096 \
      --rows transformer@4096,atlas@4096,titans@4096,atlas_mag@4096,atlas:token@4096 --budget-s 380 \
      --json "$OUT/train_4k.json" --logs "$OUT/rows"
    ;;
  engine)
    step engine_4k 300 python3 benchmarks/bench_train.py --baseline transformer@4096 \
      --rows transformer@4096,transformer@4096/train.micro_batch_size=16 --overhead "" --profile --budget-s 240 \
      --json "$OUT/engine_4k.json" --logs "$OUT/rows"
    ;;
  tune)
    scan_b8=(python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 --updates chunk --variants graphs
             --skip-checks --budget-s 35 --row-budget-s 30)
    step scan_b8 120 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 --updates chunk \
      --variants graphs graphs+muon graphs+compile --skip-checks --budget-s 110 --row-budget-s 30
    step scan_checks 130 python3 benchmarks/bench_memory_scan.py --checks muon scan --updates chunk --dh 64 \
      --lengths 4096 --budget-s 0 --triton-max-short-side 128
    step muon_step 40 python3 benchmarks/bench_muon_step.py
    step dual_scan 110 python3 benchmarks/bench_dual_scan.py --profile --repeats 3 --compiled-terms
    step dual_attention_sweep 50 python3 benchmarks/bench_dual_attention.py --sweep
    best=$(sed -n 's/^best setting: //p' "$OUT/dual_attention_sweep.log")
    [ -n "$best" ] && [ "$best" != default ] && step dual_scan_best 40 python3 benchmarks/bench_dual_scan.py \
      --repeats 3 --attention-setting "$best"
    step mlp_sweep 40 python3 benchmarks/bench_memory_mlp.py --sweep
    best=$(sed -n 's/^best setting: //p' "$OUT/mlp_sweep.log")
    [ -n "$best" ] && [ "$best" != default ] && step scan_b8_mlp_best 30 "${scan_b8[@]}" --mlp-setting "$best"
    ;;
  tune-train)
    step train_4k 180 python3 benchmarks/bench_train.py \
      --rows transformer@4096,atlas@4096,titans@4096,deep_transformer@4096 --overhead "" --budget-s 150 \
      --json "$OUT/train_4k.json" --logs "$OUT/rows"
    step train_4k_muon 130 env ATLAS_MUON_STEP_KERNEL=1 python3 benchmarks/bench_train.py \
      --rows atlas@4096,titans@4096 --overhead "" --budget-s 100 --json "$OUT/train_4k_muon.json" \
      --logs "$OUT/rows_muon"
    step profile_b8 40 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 --updates chunk \
      --profile 40 --skip-checks
    step profile_b8_muon 40 python3 benchmarks/bench_memory_scan.py --batch 8 --dh 64 --lengths 4096 --updates chunk \
      --profile 40 --skip-checks --muon-kernel
    ;;
  train-long)
    step train_long 580 python3 benchmarks/bench_train.py --baseline transformer@16384 \
      --rows transformer@16384,atlas@16384,transformer@32768,atlas@32768 --overhead "" --budget-s 480 \
      --json "$OUT/train_long.json" --logs "$OUT/rows"
    ;;
  decode)
    # An empty Triton cache, as on a fresh machine: it changes what Python allocates before each CUDA-graph capture,
    # so the captures (ops/cuda_graphs.py) are checked where a garbage collection is likeliest to land inside one
    step decode 240 env TRITON_CACHE_DIR="$(mktemp -d)" python3 benchmarks/bench_decode.py --cuda-graph --steps 8 \
      --warmup 2 --out "$OUT/decode.json"
    ;;
  recall)
    step recall_study 560 python3 benchmarks/recall_study.py --out "$OUT/recall" --work /tmp/recall --budget-minutes 8.5
    ;;
  *)
    echo "usage: bash benchmarks/gpu_single.sh scan|scan-batch|speed|dual|scan-table DH [--skip-checks]|train|train-long|engine|tune|tune-train|decode|recall" >&2
    exit 2
    ;;
esac
