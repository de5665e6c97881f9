#!/usr/bin/env bash
# `examoe generate` end to end: a short addition run writes a checkpoint; greedy decoding of
# its held-out problems (--held-out) gives the exact-match accuracy `train` reported for it
# (compared as numbers, at 1 and 2 ranks); --prompt prints the same text at 1 and 2 ranks,
# greedy and sampled; a token model (vocabulary 512) takes and prints ids; bad inputs fail on
# every rank with the problem named.
# usage: generate.sh <examoe> [mpiexec]
set -euo pipefail
examoe=$1 mpiexec=${2:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-generate.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

echo "== train 600 steps of the addition corpus, checkpoint at the end"
"$mpiexec" -n 2 "$examoe" train --model.seq_len 16 --model.d_model 32 --model.d_hidden 64 \
  --train.steps 600 --train.warmup 20 --checkpoint.interval 600 --log.interval 200 \
  --log.eval_interval 600 --log.metrics run.jsonl | tee train.log
ckpt=checkpoints/step-00000600.h5
test -f "$ckpt"

echo "== --held-out at 1 and 2 ranks against train's figure"
"$examoe" generate "$ckpt" --held-out | tee h1.txt
"$mpiexec" -n 2 "$examoe" generate "$ckpt" --held-out | tee h2.txt
python3 - run.jsonl h1.txt h2.txt <<'PY'
import json, re, sys
summary = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summary = [j for j in summary if j.get("summary")]
assert len(summary) == 1, summary
reported = summary[0]["val_accuracy"]
for path in sys.argv[2:]:
    m = re.fullmatch(r"held-out problems (\d+) exact (\d+) accuracy ([0-9.]+) \(([0-9.]+) %\)\n", open(path).read())
    assert m, open(path).read()
    problems, exact, acc = int(m[1]), int(m[2]), float(m[3])
    assert problems == 256, problems
    assert abs(acc - exact / problems) < 1e-6, (acc, exact, problems)
    assert exact == round(reported * problems), f"{path}: generated {exact}/{problems}, train reported {reported}"
print(f"held-out accuracy: generated {exact}/{problems} = {exact / problems}, train reported {reported}")
assert reported > 0, "the run learned nothing: the comparison would be empty"
PY

echo "== --prompt at 1 and 2 ranks: the same text"
"$examoe" generate "$ckpt" --prompt "12+34=" > p1.txt 2> p1.err
"$mpiexec" -n 2 "$examoe" generate "$ckpt" --prompt "12+34=" > p2.txt 2> p2.err
cat p1.txt p1.err
cmp p1.txt p2.txt
grep -Eq '^12\+34=[0-9]+$' p1.txt           # the answer, digits reversed, then '\n'
grep -q "stopped at '\\\\n'" p1.err
grep -Eq '12 \+ 34 = [0-9]+ \(the corpus writes a sum least significant digit first\)' p1.err
rev=$(sed 's/^12+34=//' p1.txt)
grep -q "12 + 34 = $(echo "$rev" | rev) " p1.err   # stderr un-reverses stdout's answer
for opts in "--temperature 0.8 --top-k 5 --seed 3" "--temperature 1.5 --seed 9 --max-new 4"; do
  # shellcheck disable=SC2086
  "$examoe" generate "$ckpt" --prompt "57+68=" $opts > s1.txt 2>/dev/null
  # shellcheck disable=SC2086
  "$mpiexec" -n 2 "$examoe" generate "$ckpt" --prompt "57+68=" $opts > s2.txt 2>/dev/null
  cmp s1.txt s2.txt
  od -c s1.txt | head -2
done
"$examoe" generate "$ckpt" --prompt-tokens 49,50,43,51,52,61 > t1.txt 2>/dev/null
cmp p1.txt t1.txt                                 # the same prompt as byte ids
"$examoe" generate "$ckpt" --prompt "12+34=" --max-new 1 > m.txt 2> m.err
test "$(wc -c < m.txt)" -eq 7 && cmp -n 7 m.txt p1.txt
grep -q "1 token generated after a prompt of 6; stopped at --max-new" m.err
"$examoe" generate "$ckpt" --prompt "1+1=1+1=1+1=1+1=" > l.txt 2> l.err   # 16 bytes: a full context
test "$(wc -c < l.txt)" -eq 17
grep -q "1 token generated after a prompt of 16; stopped at the model's seq_len 16" l.err

echo "== bad inputs fail on every rank, naming the problem"
fails() {  # fails NEEDLE ARGS...: exit status 1, NEEDLE in the message of both ranks
  local needle=$1; shift
  if "$mpiexec" -n 2 "$examoe" generate "$@" > out.txt 2> err.txt; then
    echo "accepted: $*"; exit 1
  fi
  for r in 0 1; do
    grep -F "examoe: error on rank $r:" err.txt | grep -qF -- "$needle" || { echo "rank $r: expected '$needle'"; cat err.txt; exit 1; }
  done
  test ! -s out.txt
}
fails "missing.h5" missing.h5 --prompt "1+1="
fails "prompt token 300 (position 1) is outside the model's vocabulary [0, 256)" "$ckpt" --prompt-tokens 49,300
fails "--prompt-tokens entry 1 'x' is not a token id" "$ckpt" --prompt-tokens 49,x
fails "no prompt: give --prompt TEXT or --prompt-tokens" "$ckpt"
fails "the prompt is empty" "$ckpt" --prompt ""
fails "the prompt holds 17 tokens; the model was trained with seq_len 16" "$ckpt" --prompt 12345678901234567
# More ranks than the 4 experts of a layer: refused before any work.
if "$mpiexec" -n 5 "$examoe" generate "$ckpt" --prompt "1+1=" > out.txt 2> err.txt; then echo "5 ranks accepted"; exit 1; fi
test "$(grep -c "the checkpoint's model has 4 experts per layer; every rank holds at least one" err.txt)" -eq 5
# --held-out needs the addition corpus: a checkpoint trained on a text file is refused.
for _ in $(seq 1 200); do echo "the quick brown fox jumps over the lazy dog"; done > text.txt
"$examoe" train --data text.txt --model.seq_len 16 --model.d_model 32 --model.d_hidden 64 --train.steps 1 \
  --checkpoint.dir textckpt --checkpoint.interval 1 --log.quiet true > /dev/null
fails "--held-out needs a checkpoint trained on the built-in addition corpus" textckpt/step-00000001.h5 --held-out
"$examoe" generate textckpt/step-00000001.h5 --prompt "the " --max-new 3 > x.txt 2> x.err
test "$(wc -c < x.txt)" -eq 7 && grep -q "3 tokens generated after a prompt of 4; stopped at --max-new" x.err
if "$examoe" generate "$ckpt" --prompt "1+1=" --temperature -1 2> e.txt; then echo "negative temperature accepted"; exit 1; fi
grep -q "examoe generate: --temperature must be >= 0" e.txt
if "$examoe" generate "$ckpt" --prompt "1" --prompt-tokens 1 2> e.txt; then echo "two prompts accepted"; exit 1; fi
grep -q "excludes" e.txt
"$examoe" generate --help | grep -q -- "--held-out"

echo "== a token model (vocabulary 512): ids in, ids out, the same at 1 and 2 ranks"
# The sequence t_i = 7 i mod 500 (uint16, nanoGPT's headerless form): the next ids after 7,14,21
# are 28,35,... once the model has learned it.
/usr/bin/python3 -c "import numpy as np; (np.arange(200000) * 7 % 500).astype(np.uint16).tofile('tok.bin')"
"$mpiexec" -n 2 "$examoe" train --data tok.bin --data.format uint16 --model.vocab_size 512 --train.steps 200 \
  --checkpoint.dir tokckpt --checkpoint.interval 200 --log.quiet true > /dev/null
"$examoe" generate tokckpt/step-00000200.h5 --prompt-tokens 7,14,21 --max-new 6 > t1.txt 2> t1.err
"$mpiexec" -n 2 "$examoe" generate tokckpt/step-00000200.h5 --prompt-tokens 7,14,21 --max-new 6 > t2.txt
test "$(cat t1.txt)" = "28,35,42,49,56,63" && cmp t1.txt t2.txt
grep -q "6 tokens generated after a prompt of 3; stopped at --max-new" t1.err
fails "prompt token 600 (position 1) is outside the model's vocabulary [0, 512)" tokckpt/step-00000200.h5 --prompt-tokens 7,600
echo "app: generate OK"
