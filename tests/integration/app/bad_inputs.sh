#!/usr/bin/env bash
# Every class of bad input to the examoe command (docs/errors.md), table-driven: each row runs
# `mpiexec -n 2 examoe ...` under a timeout and must end with a non-zero exit that is neither
# a timeout (a hang) nor a signal (a crash), with the expected message printed by EVERY rank.
# usage: bad_inputs.sh <examoe> [mpiexec]
set -uo pipefail
examoe=$1 mpiexec=${2:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-bad.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
small=(--model.d_model 16 --model.n_heads 2 --model.seq_len 16 --model.d_hidden 16 --train.batch 4
       --train.steps 1 --log.quiet true)

# ---- files the rows use
mkdir adir empty_ckpt && touch empty.txt afile && printf '0123456789' > short.txt
echo '{"train": {"steps": [1, 2]}}' > types.json
echo '{"train": {"batch": "many"}}' > string.json
echo '{"model": {"d_modle": 3}}' > unknown.json
echo '{"model": ' > bad.json
echo '[1]' > list.json
echo "== a good checkpoint to damage"
# (In its own directory: the rows' new runs in the default checkpoints/ must not find it.)
if ! "$mpiexec" -n 2 "$examoe" train "${small[@]}" --checkpoint.interval 1 --checkpoint.dir good_ckpt > good.log 2>&1; then
  cat good.log; echo "FAIL: could not write the checkpoint the rows need"; exit 1
fi
good=good_ckpt/step-00000001.h5
size=$(stat -c %s "$good")
head -c $((size / 2)) "$good" > truncated.h5
python3 - "$good" <<'PY'
import sys
b = bytearray(open(sys.argv[1], "rb").read())
flipped = bytearray(b)
for i in range(len(b) // 2, len(b) // 2 + 4):
    flipped[i] ^= 0xFF
open("flipped.h5", "wb").write(flipped)
open("v1.h5", "wb").write(b[512:])                        # HDF5 without the ExaMoE header
open("v7.h5", "wb").write(b.replace(b"format 2\n", b"format 7\n", 1))  # another version
PY
printf 'hello' > notes.h5
cat > tokens.cfg <<'EOF'
PATH tokens
INPUT-CLASS TEXTIN
RANK 2
DIMENSION-SIZES 2 16
OUTPUT-CLASS IN
OUTPUT-SIZE 32
OUTPUT-ARCHITECTURE NATIVE
EOF
python3 -c "print(' '.join(['65'] * 31 + ['300']))" > tokens.txt
h5import tokens.txt -c tokens.cfg -o high.h5 || { echo "FAIL: h5import"; exit 1; }

# ---- the table: row NAME 'expected text' [mpmd|eval] ARGS...
pass=0 fail=0
row() {
  local name=$1 want=$2
  shift 2
  local cmd=(timeout 60 "$mpiexec" -n 2 "$examoe" train "${small[@]}" "$@")
  if [ "${1:-}" = mpmd ]; then  # a different argument on each rank
    shift
    cmd=(timeout 60 "$mpiexec" -n 1 "$examoe" train "${small[@]}" "$1" "$2" : -n 1 "$examoe" train "${small[@]}" "$1" "$3")
  elif [ "${1:-}" = eval ]; then
    shift
    cmd=(timeout 60 "$mpiexec" -n 2 "$examoe" eval "$@")
  fi
  "${cmd[@]}" > out.txt 2>&1
  local rc=$? why=""
  if [ $rc -eq 0 ]; then why="accepted (exit 0)"
  elif [ $rc -eq 124 ]; then why="timed out: a rank hangs"
  elif [ $rc -ge 128 ] || grep -q "BAD TERMINATION" out.txt; then why="crashed (exit $rc)"
  else
    for r in 0 1; do
      grep -F "examoe: error on rank $r:" out.txt | grep -qF -- "$want" || why="${why}rank $r did not print the message; "
    done
  fi
  if [ -z "$why" ]; then
    pass=$((pass + 1))
    printf 'ok   %-28s exit %d: %s\n' "$name" "$rc" "$want"
  else
    fail=$((fail + 1))
    printf 'FAIL %-28s %s\n     expected: %s\n' "$name" "$why" "$want"
    sed 's/^/     | /' out.txt | head -n 20
  fi
}

# config keys: wrong type (one per type), out of range
row int-wrong-type        "model.d_model must be an integer, got 'abc'"              --model.d_model abc
row uint-wrong-type       "train.seed must be a non-negative integer, got '-1'"      --train.seed -1
row float-wrong-type      "train.lr must be a number, got 'fast'"                   --train.lr fast
row float-non-finite      "train.lr must be a finite number, got 'inf'"             --train.lr inf
row bool-wrong-type       "log.quiet must be true or false, got 'maybe'"            --log.quiet maybe
row choice-wrong-type     "model.activation must be gelu or swiglu, got 'relu'"     --model.activation relu
row json-unsupported      "key 'train.steps' in types.json has an unsupported value" --config types.json
row json-string-for-int   "train.batch must be an integer, got 'many'"              --config string.json
row top-k-out-of-range    "model.top_k must be in [1, model.num_experts = 4] (got 9)" --model.top_k 9
row beta2-out-of-range    "train.beta2 must be in [0, 1) (got 1)"                   --train.beta2 1
row heads-not-divisor     "model.n_heads must be a divisor of model.d_model = 16 (got 3)" --model.n_heads 3
row digits-out-of-range   "data.digits must be in [1, 6] (got 9)"                   --data.digits 9
row memory-limit-syntax   "train.memory_limit must be auto, off or a size"          --train.memory_limit lots
# unknown keys, stray arguments, config files
row unknown-option        "unknown option '--model.dmodel' (did you mean '--model.d_model'?" --model.dmodel 3
row unknown-json-key      "unknown key 'model.d_modle' in unknown.json (did you mean 'model.d_model'?)" --config unknown.json
row stray-argument        "unexpected argument 'extra'"                              extra
row config-missing        "cannot read config file 'missing.json': No such file or directory" --config missing.json
row config-directory      "config file 'adir' is not a regular file"                --config adir
row config-not-json       "bad.json is not valid JSON"                               --config bad.json
row config-not-object     "list.json must hold a JSON object"                        --config list.json
# mesh, memory, ranks that disagree
row ep-not-divisor        "parallel.ep = 3 must divide the world size 2"            --parallel.ep 3
row fewer-experts-than-ep "model.num_experts (1) must be at least the expert-parallel size ep = 2" --model.num_experts 1 --model.top_k 1
row memory-auto           "are available per rank (train.memory_limit = auto"       --model.num_experts 1000000 --model.d_model 1024 --model.n_heads 8 --model.d_hidden 4096
row memory-explicit       "(65536 bytes) are available per rank (train.memory_limit = 64KiB)" --train.memory_limit 64KiB
row config-differs        "rank 1 has train.lr = 0.02 (rank 0: 0.01)"               mpmd --train.lr 0.01 0.02
# data files
row data-missing          "cannot open 'missing.txt': No such file or directory"    --data missing.txt
row data-empty            "'empty.txt' is empty"                                     --data empty.txt
row data-directory        "cannot read 'adir': Is a directory"                       --data adir
row data-too-short        "'short.txt' (10 bytes) is too short for seq_len 16"       --data short.txt
row metrics-directory     "cannot open metrics file 'adir'"                          --log.metrics adir
row checkpoint-dir-file   "cannot create checkpoint directory 'afile'"               --checkpoint.dir afile --checkpoint.interval 1
# checkpoints
row ckpt-missing          "cannot read 'missing.h5': No such file or directory"     --resume missing.h5
row ckpt-none-latest      "no checkpoint step-<N>.h5 in 'empty_ckpt'"                --resume latest --checkpoint.dir empty_ckpt
row ckpt-truncated        "'truncated.h5' is truncated: it has $((size / 2)) bytes" --resume truncated.h5
row ckpt-bit-flipped      "'flipped.h5' fails its whole-file checksum: the file is corrupt" --resume flipped.h5
row ckpt-not-a-checkpoint "'notes.h5' is too short to be an ExaMoE checkpoint"      --resume notes.h5
row ckpt-format-1         "'v1.h5' is an HDF5 file without an ExaMoE header"        --resume v1.h5
row ckpt-format-7         "'v7.h5' has format version 7; this ExaMoE reads version 2" --resume v7.h5
row ckpt-other-shape      "was written for model.d_hidden = 16, this run has model.d_hidden = 32" --resume "$good" --model.d_hidden 32
row ckpt-other-precision  "holds float parameters; this run uses double"            --resume "$good" --train.precision double
# eval input files
row eval-token-range      "examoe eval: token 300 outside [0, 256)"                  eval "$good" --input high.h5 --output out.h5
row eval-input-missing    "examoe eval: cannot open input 'nothing.h5' as HDF5"      eval "$good" --input nothing.h5 --output out.h5

echo "bad inputs: $pass refused cleanly on every rank, $fail failed"
[ $fail -eq 0 ]
