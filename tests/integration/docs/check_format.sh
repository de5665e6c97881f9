#!/usr/bin/env bash
# docs/checkpoint-format.md and docs/model.md are exact: an independent reader written from
# them alone (check_format.py: h5py + numpy, no ExaMoE code) verifies the header checksum,
# every tensor checksum, the initial parameters and the placement history of real checkpoints.
# usage: check_format.sh <examoe> <mpiexec>
set -euo pipefail
examoe=$(readlink -f "$1") mpiexec=${2:-mpiexec}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=/usr/bin/python3  # Debian's interpreter, where Debian's h5py and numpy live
"$py" -c "import h5py, numpy" 2> /dev/null || { echo "python3-h5py-serial / python3-numpy missing (cmake/dev.sh deps)"; exit 77; }
tmp=$(mktemp -d /tmp/examoe-docs.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
shape=(--model.d_model 16 --model.n_heads 2 --model.seq_len 16 --model.d_hidden 24 --train.batch 8)
# The initial model (0 steps, float, GELU) and a trained SwiGLU model in double with migrations.
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --train.steps 0 --checkpoint.interval 1 \
  --checkpoint.dir init > init.log 2>&1 || { cat init.log; exit 1; }
"$mpiexec" -n 3 "$examoe" train "${shape[@]}" --model.num_experts 6 --model.activation swiglu \
  --train.precision double --train.steps 6 --checkpoint.interval 6 --placement.rebalance_interval 2 \
  --checkpoint.dir trained > trained.log 2>&1 || { cat trained.log; exit 1; }
# An initial model with shared experts (SwiGLU, width 8): their parameters follow every other.
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --model.activation swiglu --model.num_shared_experts 2 \
  --model.shared_hidden 8 --train.steps 0 --checkpoint.interval 1 --checkpoint.dir shared > shared.log 2>&1 ||
  { cat shared.log; exit 1; }
"$py" "$here/check_format.py" init/step-00000000.h5 trained/step-00000006.h5 shared/step-00000000.h5
