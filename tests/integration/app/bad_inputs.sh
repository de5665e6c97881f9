#!/usr/bin/env bash
# Every class of bad input to the examoe command (docs/errors.md), table-driven: each row runs
# `mpiexec -n 2 examoe ...` (NP=3: 3 ranks) under a timeout and must end with a non-zero exit
# that is neither a timeout (a hang) nor a signal (a crash), with the expected message printed
# by EVERY rank, and at most 64 KiB of output with no number of 40 digits or more (messages
# quote a bounded prefix of what they were given).
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
# Files and streams that are not what they seem: FIFOs (one with a writer holding it open and
# bytes waiting: a read-write open does not block), a 50 GB sparse data file, a 100 MB config.
mkfifo data.fifo fed.fifo
exec 3<>fed.fifo
printf 'bytes waiting in the pipe' >&3
truncate -s 50G sparse.bin
truncate -s 100M big.json
echo '{"train": {"lr": 0.1, "lr": 0.2}}' > dup.json
echo '{"model": {"d_model": 32}, "model.d_model": 64}' > both.json
python3 -c 'import json; print(json.dumps({"model": {"d_model": "x" * 50000000}}))' > huge.json
# Eval inputs: [2][16] tokens (int32) with targets (int32, or int64 from binary input so that
# 2^40+65 is stored as it is), or float tokens.
h5cfg() {  # h5cfg DATASET INPUT-CLASS INPUT-SIZE OUTPUT-CLASS OUTPUT-SIZE
  printf 'PATH %s\nINPUT-CLASS %s\n%bRANK 2\nDIMENSION-SIZES 2 16\nOUTPUT-CLASS %s\nOUTPUT-SIZE %s\nOUTPUT-ARCHITECTURE NATIVE\n' \
    "$1" "$2" "${3:+INPUT-SIZE $3\n}" "$4" "$5"
}
h5cfg tokens TEXTIN "" IN 32 > tok32.cfg
h5cfg targets TEXTIN "" IN 32 > tgt32.cfg
h5cfg targets IN 64 IN 64 > tgt64.cfg
h5cfg tokens IN 64 IN 64 > tok64.cfg
h5cfg tokens TEXTFP "" FP 32 > tokfp.cfg
python3 - <<'PY'
import struct
ok = ["65"] * 32
def text(name, at):
    v = ["-1"] * 32
    for i, x in at.items(): v[i] = str(x)
    open(name, "w").write(" ".join(v) + "\n")
open("ok.txt", "w").write(" ".join(ok) + "\n")
open("float.txt", "w").write(" ".join(["65.5"] * 32) + "\n")
text("t999.txt", {3: 999})
text("t1e9.txt", {16: 10**9, 17: 10**9})
text("tneg5.txt", {7: -5})
t40 = [-1] * 32; t40[31] = 2**40 + 65
open("t40.bin", "wb").write(struct.pack("<32q", *t40))
k40 = [65] * 32; k40[0] = 2**40 + 65
open("k40.bin", "wb").write(struct.pack("<32q", *k40))
PY
for t in t999 t1e9 tneg5; do
  h5import ok.txt -c tok32.cfg $t.txt -c tgt32.cfg -o $t.h5 || { echo "FAIL: h5import $t"; exit 1; }
done
h5import ok.txt -c tok32.cfg t40.bin -c tgt64.cfg -o t40.h5 && h5import k40.bin -c tok64.cfg -o k40.h5 &&
  h5import float.txt -c tokfp.cfg -o kfloat.h5 || { echo "FAIL: h5import"; exit 1; }

# ---- the table: [NP=3] [ROW_ENV="VAR=value"] [MAXSECS=S] row NAME 'expected text' [MODE] ARGS...
#   no mode: examoe train <small config> ARGS      mpmd KEY V0 V1: --KEY V0 on rank 0, V1 on rank 1
#   eval: examoe eval ARGS      raw: examoe ARGS      split A... : B...: examoe A on rank 0, B on the rest
pass=0 fail=0
row() {
  local name=$1 want=$2
  shift 2
  local np=${NP:-2}
  local pre=(timeout 60 env ${ROW_ENV:-} "$mpiexec")
  local cmd=("${pre[@]}" -n "$np" "$examoe" train "${small[@]}" "$@")
  if [ "${1:-}" = mpmd ]; then  # a different argument on each rank
    shift
    cmd=("${pre[@]}" -n 1 "$examoe" train "${small[@]}" "$1" "$2" : -n 1 "$examoe" train "${small[@]}" "$1" "$3")
  elif [ "${1:-}" = eval ]; then
    shift
    cmd=("${pre[@]}" -n "$np" "$examoe" eval "$@")
  elif [ "${1:-}" = raw ]; then
    shift
    cmd=("${pre[@]}" -n "$np" "$examoe" "$@")
  elif [ "${1:-}" = split ]; then
    shift
    local a=()
    while [ "$1" != : ]; do a+=("$1"); shift; done
    shift
    cmd=("${pre[@]}" -n 1 "$examoe" "${a[@]}" : -n $((np - 1)) "$examoe" "$@")
  fi
  local t0=$SECONDS
  "${cmd[@]}" > out.txt 2>&1
  local rc=$? why="" secs=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then why="accepted (exit 0)"
  elif [ $rc -eq 124 ]; then why="timed out: a rank hangs"
  elif [ $rc -ge 128 ] || grep -q "BAD TERMINATION" out.txt; then why="crashed (exit $rc)"
  else
    for r in $(seq 0 $((np - 1))); do
      grep -F "examoe: error on rank $r:" out.txt | grep -qF -- "$want" || why="${why}rank $r did not print the message; "
    done
    [ "$(stat -c %s out.txt)" -le 65536 ] || why="${why}$(stat -c %s out.txt) bytes of output; "
    ! grep -qE '[0-9]{40}' out.txt || why="${why}a number of 40 digits or more in the output; "
    [ -z "${MAXSECS:-}" ] || [ $secs -le "$MAXSECS" ] || why="${why}took $secs s (at most $MAXSECS); "
  fi
  if [ -z "$why" ]; then
    pass=$((pass + 1))
    printf 'ok   %-30s %d ranks, exit %d, %2d s: %s\n' "$name" "$np" "$rc" "$secs" "$want"
  else
    fail=$((fail + 1))
    printf 'FAIL %-30s %s\n     expected: %s\n' "$name" "$why" "$want"
    head -c 4000 out.txt | sed 's/^/     | /' | head -n 20
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
row data-directory        "'adir' is a directory, not a regular file"                --data adir
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
row eval-input-missing    "examoe eval: cannot open input 'nothing.h5': No such file or directory" eval "$good" --input nothing.h5 --output out.h5
row eval-input-not-hdf5   "examoe eval: cannot open input 'notes.h5' as HDF5"        eval "$good" --input notes.h5 --output out.h5
row eval-target-999       "examoe eval: target 999 outside [0, 256) at targets[0][3] of 't999.h5' (-1 marks a position without a target" eval "$good" --input t999.h5 --output out.h5
row eval-target-1e9       "examoe eval: target 1000000000 outside [0, 256) at targets[1][0] of 't1e9.h5'" eval "$good" --input t1e9.h5 --output out.h5
row eval-target-minus-5   "examoe eval: target -5 outside [0, 256) at targets[0][7] of 'tneg5.h5'" eval "$good" --input tneg5.h5 --output out.h5
row eval-target-2^40+65   "examoe eval: target 1099511627841 outside [0, 256) at targets[1][15]" eval "$good" --input t40.h5 --output out.h5
row eval-token-2^40+65    "examoe eval: token 1099511627841 outside [0, 256) at tokens[0][0]" eval "$good" --input k40.h5 --output out.h5
row eval-float-tokens     "dataset 'tokens' of 'kfloat.h5' holds floating-point numbers; token ids and targets must be an HDF5 integer type" eval "$good" --input kfloat.h5 --output out.h5
NP=3 row eval-target-999-3-ranks "examoe eval: target 999 outside [0, 256)" eval "$good" --input t999.h5 --output out.h5
# files and streams that are not what they seem
row data-dev-zero         "'/dev/zero' is a character device, not a regular file"   --data /dev/zero
row data-dev-urandom      "'/dev/urandom' is a character device, not a regular file" --data /dev/urandom
row data-fifo             "'data.fifo' is a FIFO (named pipe), not a regular file"  --data data.fifo
row data-fifo-with-writer "'fed.fifo' is a FIFO (named pipe), not a regular file"   --data fed.fifo
NP=3 row data-fifo-3-ranks "'data.fifo' is a FIFO (named pipe), not a regular file" --data data.fifo
MAXSECS=20 row data-sparse-50G "the data file 'sparse.bin' 50.0 GiB (53687091200 bytes), held whole by every rank" --data sparse.bin
row config-fifo           "config file 'data.fifo' is not a regular file (it is a FIFO (named pipe))" --config data.fifo
row config-too-big        "config file 'big.json' has 104857600 bytes; a config file is at most 64 MiB" --config big.json
row eval-input-fifo       "examoe eval: input 'data.fifo' is a FIFO (named pipe), not a regular file" eval "$good" --input data.fifo --output out.h5
row eval-input-device     "examoe eval: input '/dev/zero' is a character device, not a regular file" eval "$good" --input /dev/zero --output out.h5
row ckpt-fifo             "'data.fifo' is not a regular file"                        --resume data.fifo
# the command line: CLI11's errors in the same style, on every rank, exit 1
row cli-unknown-command   "examoe: unknown command 'frobnicate' (commands: train, bench, inspect, eval" raw frobnicate
row cli-no-command        "examoe: no command given"                                 raw
row cli-unknown-top-option "examoe: unknown option '--frob' before the command"      raw --frob
row cli-option-no-value   "examoe train: option --config needs a value"              raw train --config
row cli-bench-top-k-0     "examoe bench: --top-k is out of range: it must be an integer >= 1, got '0'" raw bench --top-k 0
row cli-bench-fraction    "examoe bench: --tokens must be an integer >= 0, got '2.5'" raw bench --tokens 2.5
row cli-bench-1e400       "examoe bench: --temperature is out of range: '1e400' is beyond the largest double" raw bench --temperature 1e400
row cli-eval-no-input     "examoe eval: --input is required"                         raw eval "$good" --output out.h5
NP=3 row cli-differs-by-rank "examoe bench: --top-k is out of range"                split bench --top-k 0 : bench --top-k 1 --tokens 16 --d-model 8 --d-hidden 8 --steps 1 --warmup 0
# values as written, bounded messages, JSON keys given twice, a resume past the end
row float-out-of-range    "train.lr is out of range: '1e400' is beyond the largest double (about 1.8e308); train.lr must be a finite number" --train.lr 1e400
row int-out-of-range      "model.d_model is out of range: it must be an integer in [-2147483648, 2147483647], got '99999999999'" --model.d_model 99999999999
row huge-value            "model.d_model must be an integer, got 'xxxxxxxxxx"       --config huge.json
row json-duplicate-key    "key 'train.lr' appears twice in the same object of dup.json" --config dup.json
row json-nested-and-dotted "key 'model.d_model' is given twice in both.json"         --config both.json
row resume-past-steps     "checkpoint '$good' is at step 1, past train.steps = 0"   --resume "$good" --train.steps 0
# environment variables that are malformed or can never take effect
ROW_ENV="EXAMOE_DEVICE_ID=abc" row device-id-abc "EXAMOE_DEVICE_ID='abc' is not a device id" --train.steps 1
ROW_ENV="EXAMOE_DEVICE_ID=-1" row device-id-minus-1 "EXAMOE_DEVICE_ID='-1' is not a device id" --train.steps 1
ROW_ENV="EXAMOE_DEVICE_ID=" row device-id-empty "EXAMOE_DEVICE_ID='' is not a device id" --train.steps 1
ROW_ENV="EXAMOE_FAULT=nan:step=1:rank=2" row fault-rank-outside "rank=2 is outside this run's ranks [0, 2), so the fault would never fire" --train.steps 1
NP=3 ROW_ENV="EXAMOE_FAULT=kill:rank=3:step=1" row fault-rank-outside-3-ranks "rank=3 is outside this run's ranks [0, 3)" --train.steps 1
ROW_ENV="EXAMOE_FAULT=hang:rank=0:step=1:phase=moe.dispach" row fault-unknown-phase "phase 'moe.dispach' is no collective's label" --train.steps 1
# outputs that cannot be written, memory of the bench
row metrics-dev-full      "cannot write metrics file '/dev/full' at step 1: No space left on device" --log.metrics /dev/full
row bench-json-dev-full   "examoe bench: cannot write --json file '/dev/full': No space left on device" raw bench --tokens 16 --d-model 8 --d-hidden 8 --steps 1 --warmup 0 --json /dev/full
row bench-memory-auto     "examoe bench: these sizes need about"                     raw bench --tokens 1000000000
row bench-memory-explicit "(1048576 bytes) are available per rank (--memory-limit = 1MiB)" raw bench --memory-limit 1MiB

exec 3>&-

# A resume exactly at train.steps is a finished run: it says so, runs no step and succeeds.
if timeout 60 "$mpiexec" -n 2 "$examoe" train "${small[@]}" --resume "$good" --train.steps 1 > done.txt 2>&1 &&
   grep -qF "is at step 1 = train.steps: training is already complete" done.txt; then
  echo "ok   resume-at-train-steps          exit 0: training is already complete"
else
  fail=$((fail + 1)); echo "FAIL resume-at-train-steps"; sed 's/^/     | /' done.txt | head -n 20
fi
echo "bad inputs: $pass refused cleanly on every rank, $fail failed"
[ $fail -eq 0 ]
