#!/usr/bin/env bash
# examples/python/read_checkpoint.py (h5py + numpy, written from docs/model.md and
# docs/checkpoint-format.md alone) against `examoe eval`: the logits of a numpy forward pass over
# a checkpoint equal those of ExaMoE, for a GELU model in float, a SwiGLU model in double and a
# sigmoid-scored model with a selection bias and group-limited routing in float,
# each trained at 2 ranks with expert parallelism and migrations (experts not where the
# balanced placement puts them), and a GELU model with shared experts in float. A checkpoint with
# two experts swapped (or the shared experts doubled) must fail the comparison;
# bad inputs get one-line errors. usage: read_checkpoint.sh <examoe> <mpiexec>
set -euo pipefail
examoe=$(readlink -f "$1") mpiexec=${2:-mpiexec}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reader=$(readlink -f "$here/../../../examples/python/read_checkpoint.py")
py=/usr/bin/python3  # Debian's interpreter, where Debian's h5py and numpy live
if ! "$py" -c "import h5py, numpy" 2> /dev/null; then
  echo "FAIL: $py cannot import h5py and numpy (Debian packages python3-h5py-serial and python3-numpy: ./cmake/dev.sh deps installs them)"
  exit 1
fi
tmp=$(mktemp -d /tmp/examoe-pyreader.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export PYTHONPATH="$(dirname "$reader")" PYTHONDONTWRITEBYTECODE=1
shape=(--model.d_model 16 --model.n_heads 2 --model.seq_len 16 --model.d_hidden 24 --train.batch 8)

# Token sequences for eval: addition problems as the built-in corpus writes them, and random bytes.
"$py" - <<'PY'
import h5py, numpy as np
rng = np.random.default_rng(15)
text = [b"12+34=46\n57+8=65", b"3+4=7\n10+20=30\n9", b"99+1=100\n42+42=8"]
tokens = np.array([list(s) for s in text] + [list(rng.integers(0, 256, 16)) for _ in range(3)], dtype=np.int32)
with h5py.File("in.h5", "w") as f:
    f["tokens"] = tokens
PY

# train NAME KEYS...: 2 ranks, ep 2, rebalancing every 3 steps, a checkpoint at step 12; then
# eval at 2 ranks, and the reader's summary.
train() {
  local name=$1; shift
  "$mpiexec" -n 2 "$examoe" train "${shape[@]}" --train.steps 12 --checkpoint.interval 12 \
    --placement.rebalance_interval 3 --checkpoint.dir "$name" "$@" > "$name.log" 2>&1 || { cat "$name.log"; exit 1; }
  grep -q "rebalanced layer" "$name.log" || { cat "$name.log"; echo "FAIL: $name: no migration"; exit 1; }
  "$mpiexec" -n 2 "$examoe" eval "$name/step-00000012.h5" --input in.h5 --output "$name-logits.h5"
  "$py" "$reader" "$name/step-00000012.h5" > "$name.txt"
}

# placement NAME: the reader's placement equals the last migration's table of each layer, and
# at least one layer's differs from the balanced blocks (so experts were read by global id
# from a checkpoint whose owners are mixed).
placement() {
  "$py" - "$1/step-00000012.h5" <<'PY'
import sys, numpy as np, read_checkpoint as rc
ck = rc.load(sys.argv[1])
L, E = ck.placement.shape
last = {}
for m in ck.placement_history:
    last[m["layer"]] = m["placement"]
assert ck.placement_history, "no migration in the checkpoint's history"
for l, table in last.items():
    assert list(ck.placement[l]) == table, (l, list(ck.placement[l]), table)
balanced = np.repeat(np.arange(2), [(E + 1) // 2, E // 2])
mixed = [l for l in range(L) if not np.array_equal(ck.placement[l], balanced)]
assert mixed, f"placement {ck.placement.tolist()} is the balanced one"
slots = [[ck.slot(l, e) for e in range(E)] for l in range(L)]
for l in range(L):
    for r in range(2):
        assert sorted(s for e, s in enumerate(slots[l]) if ck.placement[l][e] == r) == \
            list(range(int(np.sum(ck.placement[l] == r))))
assert ck.tokens_per_expert.sum() == 12 * 8 * 16 * ck.model.k * L, ck.tokens_per_expert.sum()
print(f"{sys.argv[1]}: {len(ck.placement_history)} migrations, layers {mixed} not balanced; "
      f"placement {ck.placement.tolist()}, slots {slots}")
PY
}

echo "== GELU, float, 6 experts, top-2"
train gelu --model.num_experts 6 --model.top_k 2
placement gelu
cat gelu.txt
"$py" "$reader" gelu/step-00000012.h5 --input in.h5 --compare gelu-logits.h5 | tee gelu.cmp
grep -q ": ok$" gelu.cmp

echo "== SwiGLU, double, 5 experts, top-3, temperature 0.7, no renormalisation"
train swiglu --model.activation swiglu --train.precision double --model.num_experts 5 --model.top_k 3 \
  --model.router.temperature 0.7 --model.router.renormalize false
placement swiglu
grep -q "swiglu; router temperature 0.7, renormalize false" swiglu.txt
grep -q "layer1.w3  *\[5, 16, 24\]" swiglu.txt
# eval writes float32 logits of a double model: they agree to float32 rounding.
"$py" "$reader" swiglu/step-00000012.h5 --input in.h5 --compare swiglu-logits.h5 --tolerance 1e-6 | tee swiglu.cmp
grep -q ": ok$" swiglu.cmp

echo "== sigmoid scores, selection bias, 3 groups of 2 with 2 per token, float"
train sigmoid --model.num_experts 6 --model.top_k 2 --model.router.score sigmoid --model.router.bias_rate 0.05 \
  --model.router.aux_loss_coef 0 --model.router.groups 3 --model.router.topk_groups 2
"$py" - sigmoid/step-00000012.h5 <<'PY'
import sys, numpy as np, read_checkpoint as rc
ck = rc.load(sys.argv[1])
assert ck.model.score == "sigmoid" and (ck.model.groups, ck.model.topk_groups) == (3, 2), ck.model
assert ck.router_bias is not None and np.abs(ck.router_bias).max() > 0, ck.router_bias
print(f"router_bias {ck.router_bias.tolist()}")
PY
"$py" "$reader" sigmoid/step-00000012.h5 --input in.h5 --compare sigmoid-logits.h5 | tee sigmoid.cmp
grep -q ": ok$" sigmoid.cmp

echo "== GELU, float, 2 shared experts of width 12 beside 4 routed experts"
train shared --model.num_experts 4 --model.num_shared_experts 2 --model.shared_hidden 12
placement shared
grep -q "gelu, 2 shared experts of h 12; router" shared.txt
grep -q "block1.moe.shared.w2  *\[24, 16\]" shared.txt
"$py" "$reader" shared/step-00000012.h5 --input in.h5 --compare shared-logits.h5 | tee shared.cmp
grep -q ": ok$" shared.cmp

# Edits through h5py may change the file's size: reseal.py FILE... sets the header's `bytes` to
# it (the reader checks the size, not the checksum; examoe::seal_checkpoint_file does both).
cat > reseal.py <<'PY'
import os, sys
for path in sys.argv[1:]:
    with open(path, "r+b") as f:
        lines = f.read(512).split(b"\0", 1)[0].split(b"\n")
        lines = [b"bytes %d" % os.path.getsize(path) if l.startswith(b"bytes ") else l for l in lines]
        f.seek(0)
        f.write(b"\n".join(lines).ljust(512, b"\0"))
PY

echo "== the comparison fails when the experts are read in the wrong order"
cp gelu/step-00000012.h5 swapped.h5
"$py" - swapped.h5 <<'PY'
import sys, h5py
with h5py.File(sys.argv[1], "r+") as f:
    for name in ("layer0.w1", "layer0.w2"):
        w = f["params"][name][()]
        w[[0, 1]] = w[[1, 0]]
        f["params"][name][...] = w
PY
"$py" reseal.py swapped.h5
if "$py" "$reader" swapped.h5 --input in.h5 --compare gelu-logits.h5 > swapped.cmp; then
  cat swapped.cmp; echo "FAIL: experts 0 and 1 swapped, yet the logits agree"; exit 1
fi
cat swapped.cmp
grep -q "EXCEEDED" swapped.cmp

echo "== the comparison fails when the shared experts' output is doubled"
cp shared/step-00000012.h5 doubled.h5
"$py" - doubled.h5 <<'PY'
import sys, h5py
with h5py.File(sys.argv[1], "r+") as f:
    f["params"]["block0.moe.shared.w2"][...] = 2 * f["params"]["block0.moe.shared.w2"][()]
PY
"$py" reseal.py doubled.h5
if "$py" "$reader" doubled.h5 --input in.h5 --compare shared-logits.h5 > doubled.cmp; then
  cat doubled.cmp; echo "FAIL: the shared experts doubled, yet the logits agree"; exit 1
fi
grep -q "EXCEEDED" doubled.cmp

echo "== bad inputs: one line naming the problem, exit status 1, no traceback"
expect_error() {  # expect_error PATTERN ARGS...
  local pattern=$1; shift
  if "$py" "$reader" "$@" > out.txt 2> err.txt; then
    echo "FAIL: read_checkpoint.py $* succeeded"; exit 1
  fi
  if ! grep -q -- "$pattern" err.txt || grep -q Traceback err.txt; then
    echo "FAIL: read_checkpoint.py $*: expected '$pattern'"; cat err.txt; exit 1
  fi
  echo "  $*: $(cat err.txt)"
}
echo "some text" > notes.txt
head -c 4000 gelu/step-00000012.h5 > cut.h5
cp gelu/step-00000012.h5 missing.h5
cp gelu/step-00000012.h5 zeroed.h5  # the header intact, HDF5's superblock zeroed
dd if=/dev/zero of=zeroed.h5 bs=512 seek=1 count=8 conv=notrunc status=none
cp gelu/step-00000012.h5 misshapen.h5
cp gelu/step-00000012.h5 badconfig.h5
"$py" - <<'PY'
import h5py, numpy as np
with h5py.File("missing.h5", "r+") as f:
    del f["params/layer1.w2"]
with h5py.File("misshapen.h5", "r+") as f:
    del f["params/block0.attn.wq"]
    f["params/block0.attn.wq"] = np.zeros((16, 8), np.float32)
with h5py.File("badconfig.h5", "r+") as f:
    f["config"].attrs["model.d_model"] = "sixteen"
with h5py.File("bad-tokens.h5", "w") as f:
    f["tokens"] = np.array([[1, 2, 300] + [0] * 13], np.int32)
with h5py.File("long.h5", "w") as f:
    f["tokens"] = np.zeros((1, 17), np.int32)
PY
"$py" reseal.py missing.h5 misshapen.h5 badconfig.h5
expect_error "does not exist" nowhere.h5
expect_error "is not an ExaMoE checkpoint (no 'EXAMOE CHECKPOINT' header)" notes.txt
expect_error "is an HDF5 file without ExaMoE's header" gelu-logits.h5
expect_error "truncated or appended to" cut.h5
expect_error "'zeroed.h5': HDF5 cannot open it" zeroed.h5
expect_error "has no parameter 'params/layer1.w2'" missing.h5
expect_error "/config holds a model key that is not a number: invalid literal for int() with base 10: 'sixteen'" badconfig.h5
expect_error "'misshapen.h5': parameter 'params/block0.attn.wq' has shape \[16, 8\]; the model's is \[16, 16\]" misshapen.h5
expect_error "token 300 outside \[0, 256) at \[0\]\[2\] (the first of 1 bad value)" gelu/step-00000012.h5 --input bad-tokens.h5 --compare gelu-logits.h5
expect_error "sequences of 17 tokens; the model takes 1 to seq_len = 16" gelu/step-00000012.h5 --input long.h5 --compare gelu-logits.h5
expect_error "sequences of 17 tokens" gelu/step-00000012.h5 --text "0123456789abcdefg"
echo "read_checkpoint: all checks passed"
