# Sourced by the GPU benchmark drivers: the GPU machines' tested environment (NVLink multicast off), then the wheels
# they lack (.whl/: deepspeed, megatron-core, webdataset, liger-kernel and their pure-Python dependencies, downloaded
# for Python 3.12 with `pip download --python-version 3.12` on a machine with an index) and atlas-train itself, installed
# into /tmp/site: the machines have no package index. The project is installed, not put on the path: its kernels reach
# the ops through an entry point (pyproject.toml), which only an installed distribution carries. Building it takes a
# setuptools with bdist_wheel (there as a dependency of torch; where it is missing or old, the build stops with
# "invalid command 'bdist_wheel'": `pip download setuptools wheel -d .whl` on a CPU machine, and they install first).
# --upgrade replaces what an earlier call on the same machine installed, and build/ goes first so that no file of an
# earlier call's tree rides along into the wheel.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
       TORCH_CUDA_ARCH_LIST=9.0 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONPATH=/tmp/site
pip_install=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
rm -rf build && "${pip_install[@]}" .whl/*.whl && "${pip_install[@]}" --no-build-isolation . || exit 1
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
