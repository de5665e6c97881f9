#!/usr/bin/env bash
# examoe train on ranks that get no sequences (docs/faults.md, "Ragged work"): batches smaller
# than the world or not a multiple of it, validation sets smaller than the world, a data file
# just above the accepted minimum. Each run must finish (rc 0, the summary line) within its
# timeout; before the dispatch plan was rebuilt each step, every one of them crashed on the
# rank that went from some tokens to none, while the others hung in moe.dispatch.
# usage: ragged.sh <examoe> [mpiexec]
set -uo pipefail
examoe=$(readlink -f "$1") mpiexec=${2:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-ragged.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
shape=(--model.d_model 16 --model.n_heads 2 --model.seq_len 16 --model.d_hidden 16
       --train.steps 12 --log.interval 4 --parallel.watchdog_seconds 60)
fails=0 runs=0

run() {  # run NAME RANKS ARGS...
  local name=$1 np=$2
  shift 2
  runs=$((runs + 1))
  timeout 240 "$mpiexec" -n "$np" "$examoe" train "${shape[@]}" "$@" > "$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] || ! grep -q "^summary: 12 steps" "$name.log"; then
    echo "FAIL $name (-n $np $*): rc $rc"
    tail -n 15 "$name.log"
    fails=$((fails + 1))
  else
    echo "ok   $name (-n $np $*): $(grep '^summary' "$name.log" | cut -c1-90)"
  fi
}

run batch-1-of-2        2 --train.batch 1
run batch-2-of-3        3 --train.batch 2
run batch-3-dp2-ep2     4 --parallel.ep 2 --train.batch 3
run batch-4-of-6-e6     6 --model.num_experts 6 --train.batch 4
run val-1-problem       3 --train.batch 5 --data.val_problems 1

# A data file of exactly the smallest accepted size (the error for one byte less names it),
# and one byte more: one validation sequence for 3 ranks.
python3 -c "import sys; sys.stdout.write(('The quick brown fox jumps over the lazy dog. ' * 40)[:60])" > small.txt
"$mpiexec" -n 1 "$examoe" train "${shape[@]}" --data small.txt > short.log 2>&1
need=$(grep -oE 'the file needs at least [0-9]+ bytes' short.log | grep -oE '[0-9]+' | head -n 1)
if [ -z "$need" ]; then
  echo "FAIL: no minimum size in the error for a 60-byte file"; cat short.log; fails=$((fails + 1))
else
  python3 - "$need" <<'PY'
import sys
n = int(sys.argv[1])
text = ("The quick brown fox jumps over the lazy dog. " * (n // 40 + 2))
open("min.txt", "w").write(text[:n])
open("min1.txt", "w").write(text[:n + 1])
PY
  run data-at-minimum   3 --train.batch 2 --data min.txt
  run data-minimum+1    3 --train.batch 2 --data min1.txt
fi

echo "ragged: $runs runs, $fails failed"
[ $fails -eq 0 ]
