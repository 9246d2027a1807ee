#!/usr/bin/env bash
# Start atlas-train on this node with torchrun: one process per GPU (or N CPU processes), one node or many.
#
#   launch/torchrun.sh [launcher options] [--] ATLAS-TRAIN ARGUMENTS...
#
# Launcher options (everything else goes to atlas-train unchanged):
#   --nproc-per-node N     processes on this node (default: the visible GPUs, or 1 without GPUs)
#   --nnodes N             nodes in the job (default 1; MIN:MAX for elastic)
#   --rdzv-endpoint H:P    c10d rendezvous at host H port P (the same on every node; ranks are assigned)
#   --rdzv-id ID           rendezvous id shared by the nodes of one job (default: "atlas")
#   --node-rank R --master-addr A --master-port P
#                          static rendezvous instead: every node names its rank and the rank-0 host
#   -h, --help             this text
#
# Exit code: 0 done; 75 the workers wrote a preemption checkpoint (SIGTERM/SIGUSR1) and want to be resumed with
# train.resume=auto; anything else is a failure.
#
# Environment (each only a default; set it to override):
#   PYTHON                 interpreter with atlas-train installed (default: the repository's .venv, else python3)
#   ATLAS_ENTRY            the per-process command (default: $PYTHON -m atlas_train.train.cli); word-split
#   OMP_NUM_THREADS        CPU threads per process (default: this node's CPUs / processes, at least 1)
#   NCCL_DEBUG             WARN
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  1 (a hung collective aborts the job instead of hanging it)
#   ATLAS_SHUTDOWN_TIMEOUT seconds the workers get to checkpoint after the launcher is stopped (default 120)
set -euo pipefail

die() { echo "torchrun.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nproc="" nnodes=1 rdzv_endpoint="" rdzv_id=atlas node_rank="" master_addr="" master_port=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) nproc=${2:?"$1 needs a value"}; shift 2 ;;
    --nnodes) nnodes=${2:?"$1 needs a value"}; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) rdzv_endpoint=${2:?"$1 needs a value"}; shift 2 ;;
    --rdzv-id|--rdzv_id) rdzv_id=${2:?"$1 needs a value"}; shift 2 ;;
    --node-rank|--node_rank) node_rank=${2:?"$1 needs a value"}; shift 2 ;;
    --master-addr|--master_addr) master_addr=${2:?"$1 needs a value"}; shift 2 ;;
    --master-port|--master_port) master_port=${2:?"$1 needs a value"}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $here/../.venv/bin/python ]]; then PYTHON=$(cd "$here/.." && pwd)/.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "python interpreter not found: $PYTHON (set PYTHON)"
if [[ -z ${ATLAS_ENTRY:-} ]]; then
  # `-m` rather than the console script: it works wherever the interpreter can import the installed package. The
  # package must be installed (editable or not): its kernels and data_prep live in folders it maps under atlas_train.
  "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("atlas_train") is None)' \
    || die "atlas_train is not importable by $PYTHON: install it (make install, or pip install -e .), or set PYTHON"
  ATLAS_ENTRY="$PYTHON -m atlas_train.train.cli"
fi
read -r -a entry <<< "$ATLAS_ENTRY"

visible_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    [[ -z $CUDA_VISIBLE_DEVICES ]] && { echo 0; return; }
    tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}
if [[ -z $nproc ]]; then
  nproc=$(visible_gpus)
  [[ $nproc -gt 0 ]] || nproc=1
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$nproc'"

cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}

rdzv=()
if [[ -n $node_rank || -n $master_addr || -n $master_port ]]; then
  [[ -n $rdzv_endpoint ]] && die "use either --rdzv-endpoint or --node-rank/--master-addr/--master-port, not both"
  [[ -n $node_rank && -n $master_addr ]] || die "static rendezvous needs --node-rank and --master-addr"
  rdzv=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "${master_port:-29500}")
elif [[ -n $rdzv_endpoint ]]; then
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id")
elif [[ $nnodes != 1 ]]; then
  die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (or --node-rank/--master-addr)"
fi
# With one node and no endpoint torchrun picks a free local port itself.

exec "$PYTHON" "$here/elastic_run.py" --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}" \
  --max-restarts 0 --shutdown-timeout "${ATLAS_SHUTDOWN_TIMEOUT:-120}" --no-python "${entry[@]}" "$@"
