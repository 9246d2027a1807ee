source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
scan=(python3 benchmarks/bench_memory_scan.py --lengths 4096 --variants graphs --row-budget-s 12)
step checks 290 "${scan[@]}" --dh 64 --updates token --budget-s 270
step token_new1 50 "${scan[@]}" --dh 64 128 --updates token --skip-checks --budget-s 45
cp atlas_train/ops/scan_chunks.py /tmp/sc_keep.py
sed -i 's/^    if mix.is_cuda:$/    if False:/' atlas_train/ops/scan_chunks.py
grep -c "if False:" atlas_train/ops/scan_chunks.py
step token_old1 50 "${scan[@]}" --dh 64 128 --updates token --skip-checks --budget-s 45
cp /tmp/sc_keep.py atlas_train/ops/scan_chunks.py
step token_new2 50 "${scan[@]}" --dh 64 128 --updates token --skip-checks --budget-s 45
step profile 80 python3 benchmarks/bench_memory_scan.py --profile 25 --skip-checks --dh 64 --lengths 4096 --updates token
