#!/usr/bin/env bash
# Checkpoint directories in real mpiexec jobs of the examoe command (docs/faults.md,
# docs/errors.md): nothing is ever lost, and every failure is a clean non-zero exit that is
# neither a timeout (a hang) nor a signal (a crash), with the message printed by every rank.
# usage: checkpoint_dirs.sh <examoe> <mpiexec> disk_full|read_only|lock|outputs
#   disk_full  a small tmpfs: a checkpoint that does not fit (found before HDF5 writes), and a
#              disk that runs full in the middle of a write (fault injection `fill`), at 2 and
#              3 ranks: "No space left on device" on every rank, the partial file removed,
#              every earlier checkpoint intact (examoe inspect), exit 1
#   read_only  a tmpfs remounted read-only: --resume latest says that the partial file it
#              ignores could not be removed; a run that must write there is refused at once
#   lock       two jobs on one directory: the second is refused naming the first's host and
#              pid; the lock goes with the first job
#   outputs    eval --output / log.metrics onto a checkpoint or an input, a new run in a
#              directory of another run's checkpoints: refused, no file changed
# disk_full and read_only need root (mount); they exit 77 (skipped) where mount is refused.
set -uo pipefail
examoe=$1 mpiexec=$2 mode=$3
tmp=$(mktemp -d /tmp/examoe-ckdir.XXXXXX)
mnt=$tmp/mnt
cleanup() {
  mountpoint -q "$mnt" 2> /dev/null && umount "$mnt"
  rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
unset EXAMOE_FAULT
small=(--model.d_model 16 --model.n_heads 2 --model.seq_len 16 --model.d_hidden 16 --train.batch 4
       --log.quiet true)
pass=0 fail=0

fail() { echo "FAIL: $*"; exit 1; }
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }

# check NAME NP 'expected text' LOG RC: a clean refusal printed by every rank
check() {
  local name=$1 np=$2 want=$3 log=$4 rc=$5 why=""
  if [ "$rc" -eq 0 ]; then why="accepted (exit 0)"
  elif [ "$rc" -eq 124 ]; then why="timed out: a rank hangs"
  elif [ "$rc" -ge 128 ] || grep -q "BAD TERMINATION" "$log"; then why="crashed (exit $rc)"
  else
    for r in $(seq 0 $((np - 1))); do
      grep -F "examoe: error on rank $r:" "$log" | grep -qF -- "$want" || why="${why}rank $r did not print the message; "
    done
  fi
  if [ -z "$why" ]; then ok "$name: exit $rc: $want"
  else bad "$name: $why"; echo "     expected: $want"; sed 's/^/     | /' "$log" | head -n 20; fi
}

# run LOG NP ARGS...: mpiexec -n NP examoe ARGS under a timeout; sets $rc
run() {
  local log=$1 np=$2
  shift 2
  timeout 120 "$mpiexec" -n "$np" "$examoe" "$@" < /dev/null > "$log" 2>&1
  rc=$?
}

intact() {  # intact FILE STEP: examoe inspect reads it back (checksums verified) at that step
  if "$examoe" inspect --json "$1" > inspect.json 2> inspect.err &&
     python3 -c "import json,sys; assert json.load(open('inspect.json'))['step'] == $2"; then
    ok "$1 intact (step $2)"
  else
    bad "$1 is not intact"; cat inspect.err
  fi
}

mount_tmpfs() {  # mount_tmpfs SIZE: a fresh tmpfs at $mnt, or exit 77
  mountpoint -q "$mnt" 2> /dev/null && umount "$mnt"
  mkdir -p "$mnt"
  if [ "$(id -u)" != 0 ] || ! mount -t tmpfs -o "size=$1" tmpfs "$mnt" 2> mount.err; then
    echo "SKIP: cannot mount a tmpfs here (needs root: $(cat mount.err 2> /dev/null))"
    exit 77
  fi
}

case $mode in
disk_full)
  for np in 2 3; do
    # 1. Room for two checkpoints (about 210 KiB each), not for a third.
    mount_tmpfs 600k
    run full$np.log "$np" train "${small[@]}" --train.steps 6 --checkpoint.interval 1 --checkpoint.keep 10 \
      --checkpoint.dir "$mnt/ck"
    check "full-np$np" "$np" "No space left on device" full$np.log $rc
    grep -qF "nothing was written, the existing checkpoints are untouched" full$np.log || bad "full-np$np: no word on the existing checkpoints"
    n=$(ls "$mnt/ck" | grep -c '^step-[0-9]*\.h5$')
    [ "$n" -ge 1 ] || bad "full-np$np: no checkpoint fitted at all (the test needs one): $(ls "$mnt/ck")"
    for s in $(seq 1 "$n"); do intact "$(printf '%s/ck/step-%08d.h5' "$mnt" "$s")" "$s"; done
    ls "$mnt/ck" | grep -q '\.tmp$' && bad "full-np$np: a partial file is left: $(ls "$mnt/ck")"
    [ -e "$mnt/ck/examoe.lock" ] && bad "full-np$np: the lock is left"
    # 2. The disk runs full in the middle of the write of step 2 (another job fills it).
    mount_tmpfs 4m
    EXAMOE_FAULT=fill:rank=$((np - 1)):checkpoint_write:step=2 run mid$np.log "$np" train "${small[@]}" \
      --train.steps 4 --checkpoint.interval 1 --checkpoint.dir "$mnt/ck"
    check "mid-write-np$np" "$np" "No space left on device" mid$np.log $rc
    grep -q "filled the file system of the checkpoint" mid$np.log || bad "mid-write-np$np: the fault did not fire"
    grep -qF "that partial file was removed, the existing checkpoints are untouched" mid$np.log ||
      bad "mid-write-np$np: no word on the partial file"
    intact "$mnt/ck/step-00000001.h5" 1
    [ -e "$mnt/ck/step-00000002.h5.tmp" ] && bad "mid-write-np$np: the partial file is left"
    [ -e "$mnt/ck/step-00000002.h5" ] && bad "mid-write-np$np: a checkpoint of step 2 appeared"
    [ -e "$mnt/ck/examoe.lock" ] && bad "mid-write-np$np: the lock is left"
  done
  ;;

read_only)
  mount_tmpfs 4m
  run w.log 2 train "${small[@]}" --train.steps 2 --checkpoint.interval 2 --checkpoint.dir "$mnt/ck"
  [ $rc -eq 0 ] || { cat w.log; fail "could not write the checkpoint the test needs"; }
  printf 'partial' > "$mnt/ck/step-00000004.h5.tmp"
  mount -o remount,ro "$mnt" || fail "cannot remount read-only"
  # --resume latest (no checkpoint at an interval): runs, and says the partial file stays.
  run ro.log 2 train "${small[@]}" --train.steps 3 --checkpoint.dir "$mnt/ck" --resume latest
  if [ $rc -eq 0 ] &&
     grep -qF "note: ignored $mnt/ck/step-00000004.h5.tmp, left by an interrupted checkpoint write; it could not be removed (the directory is not writable: Read-only file system)" ro.log &&
     ! grep -q "ignored and removed" ro.log &&
     grep -qF "note: checkpoint.dir '$mnt/ck' is not writable (Read-only file system)" ro.log; then
    ok "resume-latest-read-only: exit 0, the note says the partial file could not be removed"
  else
    bad "resume-latest-read-only (exit $rc)"; sed 's/^/     | /' ro.log | head -20
  fi
  [ -e "$mnt/ck/step-00000004.h5.tmp" ] || bad "the partial file vanished from a read-only directory"
  # A run that writes checkpoints there is refused before it trains.
  run ro2.log 2 train "${small[@]}" --train.steps 4 --checkpoint.dir "$mnt/ck" --resume latest --checkpoint.interval 1
  check "interval-read-only" 2 "cannot create the lock file '$mnt/ck/examoe.lock': Read-only file system" ro2.log $rc
  intact "$mnt/ck/step-00000002.h5" 2
  ;;

lock)
  # Job A trains for long; job B on the same directory is refused while A runs.
  "$mpiexec" -n 2 "$examoe" train "${small[@]}" --train.steps 100000 --log.interval 1000 --log.quiet false \
    --checkpoint.interval 1000 --checkpoint.dir ck < /dev/null > a.log 2>&1 &
  apid=$!
  for _ in $(seq 1 300); do grep -q "before training" a.log 2> /dev/null && break; sleep 0.1; done
  [ -f ck/examoe.lock ] || { cat a.log; fail "job A holds no lock: $(ls ck)"; }
  owner=$(sed -n 's/^pid //p' ck/examoe.lock) host=$(sed -n 's/^host //p' ck/examoe.lock)
  [ "$host" = "$(hostname)" ] || bad "the lock names host '$host', not $(hostname)"
  pgrep -f -- "$examoe train" | grep -qx "$owner" || bad "the lock names pid $owner, which is no rank of job A"
  for np in 2 3; do
    run b$np.log "$np" train "${small[@]}" --train.steps 4 --checkpoint.interval 1 --checkpoint.dir ck \
      --checkpoint.allow_existing true
    check "second-job-np$np" "$np" "checkpoint.dir 'ck' is locked by pid $owner on host $host" b$np.log $rc
  done
  run c.log 2 train "${small[@]}" --train.steps 4 --checkpoint.dir ck --resume latest
  check "second-job-resume-latest" 2 "is locked by pid $owner on host $host" c.log $rc
  kill -TERM $apid
  wait $apid
  arc=$?
  [ $arc -eq 0 ] && grep -q "stopping at step" a.log || { bad "job A did not stop cleanly on SIGTERM (exit $arc)"; tail a.log; }
  [ -e ck/examoe.lock ] && bad "job A left its lock"
  ls ck/step-*.h5 > /dev/null 2>&1 || bad "job A wrote no checkpoint on SIGTERM"
  # A job killed outright leaves its lock; the next one takes it over and says so.
  EXAMOE_FAULT=kill:rank=0:step=2 run k.log 2 train "${small[@]}" --train.steps 4 --checkpoint.interval 1 \
    --checkpoint.dir kill
  [ -e kill/examoe.lock ] || bad "the killed job left no lock (the test needs one)"
  dead=$(sed -n 's/^pid //p' kill/examoe.lock)
  run k2.log 2 train "${small[@]}" --train.steps 4 --checkpoint.interval 1 --checkpoint.dir kill --resume latest
  if [ $rc -eq 0 ] && grep -qF "note: took over the stale lock 'kill/examoe.lock' of pid $dead on host $(hostname)" k2.log; then
    ok "stale-lock: taken over with a note naming pid $dead"
  else
    bad "stale-lock (exit $rc)"; sed 's/^/     | /' k2.log | head -20
  fi
  [ -e kill/examoe.lock ] && bad "the job that took over left its lock"
  ;;

outputs)
  run good.log 2 train "${small[@]}" --train.steps 1 --checkpoint.interval 1 --checkpoint.dir ck
  [ $rc -eq 0 ] || { cat good.log; fail "could not write the checkpoint the test needs"; }
  ck=ck/step-00000001.h5
  cp "$ck" copy.h5
  ln -s "$ck" link.h5
  python3 -c "print(('the quick brown fox ' * 400))" > data.txt
  cat > tokens.cfg << 'EOF'
PATH tokens
INPUT-CLASS TEXTIN
RANK 2
DIMENSION-SIZES 2 16
OUTPUT-CLASS IN
OUTPUT-SIZE 32
OUTPUT-ARCHITECTURE NATIVE
EOF
  python3 -c "print(' '.join(['65'] * 32))" > tokens.txt
  h5import tokens.txt -c tokens.cfg -o in.h5 || fail "h5import"
  mkdir ck3
  sums=$(sha256sum "$ck" copy.h5 in.h5 data.txt)
  ev="refused, writing the logits would destroy it"
  lm="refused, appending metrics to it would destroy it"
  run e1.log 2 eval "$ck" --input in.h5 --output "$ck"
  check "eval-output-is-the-checkpoint" 2 "--output '$ck' is the checkpoint being evaluated" e1.log $rc
  run e2.log 2 eval "$ck" --input in.h5 --output link.h5
  check "eval-output-links-to-the-checkpoint" 2 "--output 'link.h5' is the checkpoint being evaluated ('$ck'): $ev" e2.log $rc
  run e3.log 2 eval "$ck" --input in.h5 --output ./in.h5
  check "eval-output-is-the-input" 2 "--output './in.h5' is the input (--input) ('in.h5')" e3.log $rc
  run e4.log 2 eval "$ck" --input in.h5 --output copy.h5
  check "eval-output-is-a-checkpoint" 2 "--output 'copy.h5' is an ExaMoE checkpoint" e4.log $rc
  run m1.log 2 train "${small[@]}" --train.steps 2 --checkpoint.dir ck --resume "$ck" --log.metrics link.h5
  check "metrics-is-the-resumed-checkpoint" 2 "log.metrics 'link.h5' is the checkpoint to resume from (checkpoint.resume) ('$ck'): $lm" m1.log $rc
  run m2.log 2 train "${small[@]}" --checkpoint.dir ck2 --log.metrics copy.h5
  check "metrics-is-a-checkpoint" 2 "log.metrics 'copy.h5' is an ExaMoE checkpoint" m2.log $rc
  run m3.log 2 train "${small[@]}" --checkpoint.dir ck2 --data data.txt --log.metrics ./data.txt
  check "metrics-is-the-data" 2 "log.metrics './data.txt' is the training data (data.path) ('data.txt')" m3.log $rc
  run m4.log 2 train "${small[@]}" --checkpoint.dir ck3 --checkpoint.interval 1 --log.metrics ck3/step-00000001.h5
  check "metrics-is-a-checkpoint-name" 2 "log.metrics 'ck3/step-00000001.h5' is a name the run's checkpoints use in checkpoint.dir 'ck3'" m4.log $rc
  run n1.log 2 train "${small[@]}" --checkpoint.dir ck --checkpoint.interval 1
  check "new-run-beside-checkpoints" 2 "checkpoint.dir 'ck' already holds checkpoints (step-00000001.h5); a new run there is refused" n1.log $rc
  grep -qF -- "--resume latest" n1.log && grep -qF -- "--checkpoint.allow_existing true" n1.log ||
    bad "new-run-beside-checkpoints: the message does not name --resume latest and --checkpoint.allow_existing"
  [ "$(sha256sum "$ck" copy.h5 in.h5 data.txt)" = "$sums" ] && ok "no file changed" || bad "a refused output changed a file"
  [ -e ck3/step-00000001.h5 ] && bad "a checkpoint was written after the refusal"
  # The flag that allows it: a new run beside the other's checkpoint, which stays.
  run n2.log 2 train "${small[@]}" --train.steps 2 --checkpoint.dir ck --checkpoint.interval 2 \
    --checkpoint.keep 1 --checkpoint.allow_existing true
  [ $rc -eq 0 ] && [ -e ck/step-00000002.h5 ] && ok "allow_existing: the new run writes beside it" || bad "allow_existing (exit $rc)"
  [ "$(sha256sum "$ck" | cut -d' ' -f1)" = "$(echo "$sums" | head -1 | cut -d' ' -f1)" ] && ok "keep 1 did not prune the other run's checkpoint" ||
    bad "the other run's checkpoint changed or went"
  ;;
*)
  fail "unknown mode '$mode'"
  ;;
esac
echo "checkpoint_dirs $mode: $pass passed, $fail failed"
[ $fail -eq 0 ]
