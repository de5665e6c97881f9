#!/usr/bin/env bash
# The examoe command end to end: train with checkpoints, resume latest, stop on SIGUSR1,
# inspect (text and JSON). usage: train_resume_inspect.sh <examoe> [mpiexec]
set -euo pipefail
examoe=$1 mpiexec=${2:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-app.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
shape=(--model.d_model 32 --model.seq_len 16 --model.d_hidden 32 --train.batch 8)
small=("${shape[@]}" --log.interval 2)

echo "== train 4 steps, checkpoint every 2"
"$mpiexec" -n 2 "$examoe" train "${small[@]}" --train.steps 4 --checkpoint.interval 2 | tee a.log
test -f checkpoints/step-00000002.h5 && test -f checkpoints/step-00000004.h5

echo "== resume latest up to step 6"
"$mpiexec" -n 2 "$examoe" train "${small[@]}" --train.steps 6 --resume latest | tee b.log
grep -q "resumed from checkpoints/step-00000004.h5 at step 4" b.log
grep -q "step 6/6" b.log

echo "== SIGUSR1 stops a long run with a checkpoint"
"$mpiexec" -n 2 "$examoe" train "${shape[@]}" --train.steps 100000 --log.interval 1000 \
  --checkpoint.dir sig < /dev/null > c.log 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q "before training" c.log 2>/dev/null && break; sleep 0.2; done
sleep 1
# Signal the ranks themselves (command lines that start with the examoe binary).
pkill -USR1 -f -- "^$examoe train .*--checkpoint.dir sig" || true
wait $pid || { echo "training exited with $?"; cat c.log; exit 1; }
cat c.log
grep -q "stopping at step" c.log
ls sig/step-*.h5

echo "== inspect"
"$examoe" inspect checkpoints/step-00000004.h5 | tee i.txt
grep -q "step 4" i.txt
"$examoe" inspect --json checkpoints/step-00000004.h5 > i.json
python3 - i.json <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["step"] == 4 and j["format_version"] == 2, j
routed = sum(sum(layer) for layer in j["tokens_per_expert"])
assert routed == 4 * 8 * 16 * 2 * 2, routed   # steps x batch x seq x top_k x layers
assert len(j["placement"]) == 2 and len(j["placement"][0]) == 4
print("inspect --json ok:", routed, "assignments, imbalance", j["imbalance"])
PY
if "$examoe" inspect does-not-exist.h5 2> e.txt; then echo "inspect accepted a missing file"; exit 1; fi
grep -q "does-not-exist.h5" e.txt
echo "app: train / resume / signal / inspect OK"
