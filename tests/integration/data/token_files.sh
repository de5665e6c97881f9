#!/usr/bin/env bash
# Training on token files as llm.c, nanoGPT and HDF5 users bring them (docs/data.md): Python
# (Debian's numpy and h5py) writes an llm.c .bin pair, nanoGPT's headerless uint16 pair and an
# HDF5 dataset of 512 ids; a short run on each must lower the validation loss; the llm.c
# run's checkpoint restores as a 512-token model (inspect, eval, resume refusals); a file with
# one id beyond the vocabulary gives the same message naming it on both of 2 ranks.
# usage: token_files.sh <examoe> [mpiexec]
set -uo pipefail
examoe=$(readlink -f "$1") mpiexec=${2:-mpiexec}
py=/usr/bin/python3  # Debian's interpreter, where Debian's numpy and h5py live
if ! "$py" -c "import numpy, h5py" 2> /dev/null; then
  echo "FAIL: $py cannot import numpy and h5py: install python3-numpy and python3-h5py-serial (./cmake/dev.sh deps)"
  exit 1
fi
tmp=$(mktemp -d /tmp/examoe-tokens.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fails=0
fail() { echo "FAIL $*"; fails=$((fails + 1)); }

"$py" - <<'PY'
import numpy as np, h5py
V = 512
rng = np.random.default_rng(15)
def stream(n):
    # A learnable stream over 512 ids: next = (5 * id + 3) mod 512 (one full cycle), with
    # every 8th id drawn at random (so the unigram entropy is near ln 512).
    t = np.empty(n, dtype=np.int64)
    t[0] = 1
    noise = rng.integers(0, V, size=n)
    for i in range(1, n):
        t[i] = noise[i] if i % 8 == 0 else (5 * t[i - 1] + 3) % V
    return t
def llmc(path, toks):  # llm.c's dev/data/data_common.py write_datafile, GPT-2 (version 1)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype(np.uint16).tobytes())
train, val = stream(60000), stream(6000)
llmc("train.bin", train)
llmc("val.bin", val)
train.astype(np.uint16).tofile("nano_train.bin")  # nanoGPT's prepare.py: np.uint16 tofile
val.astype(np.uint16).tofile("nano_val.bin")
with h5py.File("tokens.h5", "w") as f:
    f.create_dataset("ids", data=np.concatenate([train, val]).astype(np.int32), chunks=(4096,))
bad = train.copy()
bad[12345] = 700
llmc("bad.bin", bad)
# examoe eval input: 2 sequences of 32 ids of the stream, and one with id 512.
with h5py.File("eval_in.h5", "w") as f:
    f.create_dataset("tokens", data=val[:64].reshape(2, 32).astype(np.int32))
with h5py.File("eval_bad.h5", "w") as f:
    x = val[:64].reshape(2, 32).astype(np.int32)
    x[1, 5] = 512
    f.create_dataset("tokens", data=x)
PY
[ -f bad.bin ] || { echo "FAIL: the Python writer did not run"; exit 1; }

shape=(--model.vocab_size 512 --model.d_model 32 --model.n_heads 2 --model.seq_len 32 --model.d_hidden 48
       --train.batch 16 --train.steps 60 --train.lr 5e-3 --train.warmup 10 --log.interval 20 --log.eval_interval 60
       --parallel.watchdog_seconds 120)

train_run() {  # train_run NAME ARGS...: 2 ranks, the summary's val loss must fall
  local name=$1
  shift
  timeout 240 "$mpiexec" -n 2 "$examoe" train "${shape[@]}" --checkpoint.dir "ck_$name" "$@" > "$name.log" 2>&1
  local rc=$?
  local line
  line=$(grep '^summary' "$name.log")
  local first last
  first=$(sed -nE 's/.*val loss ([0-9.]+) -> ([0-9.]+) nats.*/\1/p' <<< "$line")
  last=$(sed -nE 's/.*val loss ([0-9.]+) -> ([0-9.]+) nats.*/\2/p' <<< "$line")
  if [ $rc -ne 0 ] || [ -z "$first" ] || ! awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 1.0) }'; then
    fail "$name: rc $rc, val loss '$first' -> '$last' (must fall by more than 1 nat)"
    tail -n 12 "$name.log"
  else
    echo "ok   $name: $(head -n 1 "$name.log" | grep -oE "tokens '.*")"
    echo "     $line"
  fi
}

train_run llmc --data train.bin --data.val_path val.bin --checkpoint.interval 60
train_run nanogpt --data nano_train.bin --data.val_path nano_val.bin --data.format uint16
train_run hdf5 --data tokens.h5 --data.dataset ids --data.val_fraction 0.1

# The checkpoint of a 512-token model restores as one.
ck=ck_llmc/step-00000060.h5
"$examoe" inspect "$ck" > inspect.log 2>&1  # to a file: grep -q in a pipe would cut inspect short (pipefail)
if grep -qE '^  model.vocab_size +512$' inspect.log; then echo "ok   inspect: model.vocab_size 512"
else fail "inspect does not show model.vocab_size 512"; head -n 8 inspect.log; fi
"$mpiexec" -n 2 "$examoe" eval "$ck" --input eval_in.h5 --output logits.h5 > eval.log 2>&1 || { fail "eval"; cat eval.log; }
shape_out=$("$py" -c "import h5py; print(h5py.File('logits.h5')['logits'].shape)" 2>&1)
if [ "$shape_out" = "(2, 32, 512)" ]; then echo "ok   eval: logits $shape_out"; else fail "eval logits shape $shape_out"; fi
"$mpiexec" -n 2 "$examoe" eval "$ck" --input eval_bad.h5 --output logits2.h5 > eval_bad.log 2>&1
grep -q "examoe eval: token 512 outside \[0, 512) at tokens\[1\]\[5\]" eval_bad.log && echo "ok   eval: id 512 refused" \
  || { fail "eval of id 512"; cat eval_bad.log; }
# Resuming with another vocabulary is refused, also against a checkpoint of the default 256,
# which does not store the key (it had the default).
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --model.vocab_size 1024 --data train.bin --data.val_path val.bin \
  --train.steps 61 --checkpoint.dir ck_llmc --resume latest > resume.log 2>&1
grep -q "was written for model.vocab_size = 512, this run has model.vocab_size = 1024" resume.log \
  && echo "ok   resume with vocab 1024 refused" || { fail "resume with another vocab"; tail -n 5 resume.log; }
"$mpiexec" -n 1 "$examoe" train --model.d_model 32 --model.n_heads 2 --model.seq_len 32 --model.d_hidden 48 \
  --train.steps 0 --checkpoint.interval 1 --checkpoint.dir ck_bytes > bytes.log 2>&1 || { fail "bytes run"; cat bytes.log; }
"$mpiexec" -n 1 "$examoe" train "${shape[@]}" --data train.bin --train.steps 1 --checkpoint.dir ck_bytes \
  --resume latest > resume256.log 2>&1
grep -q "was written for model.vocab_size = 256, this run has model.vocab_size = 512" resume256.log \
  && echo "ok   resume of a 256 checkpoint with vocab 512 refused" || { fail "resume of a 256 checkpoint"; tail -n 5 resume256.log; }

# One id beyond the vocabulary: the same message, naming it and its offset, on both ranks.
timeout 120 "$mpiexec" -n 2 "$examoe" train "${shape[@]}" --data bad.bin --data.val_path val.bin > bad.log 2>&1
rc=$?
want="examoe::TokenCorpus::check_vocab: token id 700 at token 12345 (byte offset 25714) of the training file 'bad.bin' is outside the vocabulary [0, 512)"
n=$(grep -cF "$want" bad.log)
if [ $rc -eq 0 ] || [ $rc -eq 124 ] || [ "$n" -ne 2 ] || ! grep -q "error on rank 0" bad.log || ! grep -q "error on rank 1" bad.log; then
  fail "bad id: rc $rc, $n of 2 ranks gave the message"; cat bad.log
else
  echo "ok   bad id at 2 ranks: rc $rc, $(grep -m1 -oF "$want" bad.log)"
fi
# nanoGPT's headerless file without --data.format: auto does not guess bytes for 512 ids.
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --data nano_train.bin > guess.log 2>&1
grep -q "set --data.format uint16" guess.log && [ "$(grep -c 'data.format auto reads data.path' guess.log)" -eq 2 ] \
  && echo "ok   auto refuses to read headerless uint16 as bytes" || { fail "auto on headerless uint16"; cat guess.log; }

echo "token files: $fails failed"
[ $fails -eq 0 ]
