#!/usr/bin/env bash
# Submit atlas-train to slurm: `launch/submit.sh [sbatch options] -- ATLAS-TRAIN ARGUMENTS...`
#   e.g. launch/submit.sh --nodes 2 --gpus-per-node 8 --time 12:00:00 -- --config configs/340m.yaml train.out_dir=runs/340m
# Why a helper: slurm will not create the log folder and runs a copy of slurm.sbatch, so this makes logs/ and tells the
# job where launch/ is. Prints the job id. LOG_DIR (default logs) sets the log folder.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sbatch_args=()
while [[ $# -gt 0 && $1 != -- ]]; do sbatch_args+=("$1"); shift; done
[[ $# -gt 0 ]] || { echo "submit.sh: expected '--' before the atlas-train arguments (see the header of $0)" >&2; exit 2; }
shift
log_dir=${LOG_DIR:-logs}
mkdir -p "$log_dir"
ATLAS_LAUNCH_DIR=$here exec sbatch --parsable \
  --output="$log_dir/%x-%j.log" "${sbatch_args[@]}" "$here/slurm.sbatch" "$@"
