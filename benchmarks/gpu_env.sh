# Sourced by the GPU benchmark drivers: the tested environment of ../shared/GPU.md (NVLink multicast off) and the
# wheels the lent GPU machines lack (.whl/, filled by shared/gpu/prepare_wheels.sh), installed beside the checkout.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
       TORCH_CUDA_ARCH_LIST=9.0 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# step NAME SECONDS CMD...: run one benchmark under a time limit, its full log in $OUT/NAME.log, its tail on stdout.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
