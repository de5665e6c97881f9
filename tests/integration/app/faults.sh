#!/usr/bin/env bash
# Real faults in real mpiexec jobs of the examoe command (docs/faults.md).
# usage: faults.sh <examoe> <mpiexec> kill|hang|nonfinite|signals
#   kill       a rank SIGKILLed in the middle of a step and in the middle of a checkpoint write:
#              the job ends at once (hydra kills the other ranks), the last complete checkpoint
#              is intact, --resume latest ignores and removes the partial file and continues
#              with bitwise the losses of an uninterrupted run
#   hang       a rank that stops before a collective: the watchdog names the collective and the
#              rank, and the job ends long before the outer timeout
#   nonfinite  NaN/Inf steps are skipped and reported, or stop the run (exit 3) with a
#              checkpoint that resumes
#   signals    SIGTERM and SIGUSR1 to mpiexec: a checkpoint at the end of the step, exit 0,
#              and the resumed run continues with the losses of an uninterrupted one
set -euo pipefail
examoe=$1 mpiexec=$2 mode=$3
tmp=$(mktemp -d /tmp/examoe-faults.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
export OPENBLAS_NUM_THREADS=1
unset EXAMOE_FAULT
# Constant learning rate after warmup (min_lr = lr): the schedule does not depend on
# train.steps, so runs of different lengths have the same losses step by step.
S=(--model.d_model 32 --model.seq_len 16 --model.d_hidden 32 --train.batch 8 --train.warmup 2
   --train.lr 3e-3 --train.min_lr 3e-3 --log.interval 1)

fail() { echo "FAIL: $*"; exit 1; }
# fail_log LOG MESSAGE: the message first (a CI excerpt shows the first lines), then the log.
fail_log() { echo "FAIL: $2; the output was:"; cat "$1"; exit 1; }

# run_fault NAME NP SPEC ARGS...: runs under `timeout 120` with EXAMOE_FAULT=SPEC; sets $rc
# and $secs; output in NAME.log (stdout, then stderr).
run_fault() {
  local name=$1 np=$2 spec=$3
  shift 3
  local t0=$SECONDS
  set +e
  # stdout (rank 0's report) and stderr (every rank's messages) apart, then one after the other:
  # written to one file, mpiexec's forwarding of one rank's stderr can land inside a line of rank
  # 0's stdout and break the line-anchored checks below.
  EXAMOE_FAULT=$spec timeout 120 "$mpiexec" -n "$np" "$examoe" train "$@" < /dev/null > "$name.out" 2> "$name.err"
  rc=$?
  set -e
  cat "$name.out" "$name.err" > "$name.log"
  secs=$((SECONDS - t0))
  echo "-- $name: EXAMOE_FAULT=$spec on $np ranks: exit code $rc after ${secs} s"
  [[ $rc != 124 ]] || fail_log "$name.log" "$name: the job was still running after 120 s"
  # No rank may be left behind (the runs name their own checkpoint directories). mpiexec can
  # return while the ranks it killed are still exiting: a loaded machine gets 10 s for that.
  local waited=0
  while pgrep -f -- "--checkpoint.dir $tmp/$name( |\$)" > /dev/null; do
    if ((waited == 100)); then
      echo "FAIL: $name: ranks still running 10 s after mpiexec returned:"
      pgrep -af -- "--checkpoint.dir $tmp/$name"
      exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# same_losses A.jsonl B.jsonl FIRST LAST: per-step losses (full precision, from the metrics
# JSON) equal bit for bit over steps FIRST..LAST.
same_losses() {
  python3 - "$@" << 'PY'
import json, sys
a, b, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def losses(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        if "loss" in j and "step" in j:
            out[j["step"]] = j["loss"]
    return out
la, lb = losses(a), losses(b)
for s in range(first, last + 1):
    assert s in la and s in lb, f"step {s} missing in {a} or {b}"
    assert la[s] == lb[s], f"step {s}: loss {la[s]!r} in {a} but {lb[s]!r} in {b}"
print(f"   losses of steps {first}..{last} equal bit for bit ({a} vs {b}), e.g. step {last}: {la[last]!r}")
PY
}

inspect_step() {  # inspect_step FILE STEP: the checkpoint reads back and says its step
  "$examoe" inspect --json "$1" > inspect.json || fail "examoe inspect $1 failed"
  python3 -c "import json,sys; j=json.load(open('inspect.json')); assert j['step']==$2, j['step']" ||
    fail "$1 does not hold step $2"
  echo "   examoe inspect $1: step $2, intact"
}

case $mode in
kill)
  "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps 12 --checkpoint.dir "$tmp/ref" \
    --log.metrics ref.jsonl > ref.log 2>&1 || fail_log ref.log "reference run failed"

  # 1. SIGKILL to rank 1 in the middle of step 10; checkpoints at 4 and 8.
  run_fault a 2 kill:rank=1:step=10 "${S[@]}" --train.steps 12 --checkpoint.interval 4 \
    --checkpoint.dir "$tmp/a" --log.metrics a.jsonl
  [[ $rc != 0 ]] || fail "a: the job exited 0 although a rank was killed"
  ((secs < 60)) || fail "a: the job took $secs s to end"
  grep -q "rank 1, step 10: SIGKILL in the middle of the step" a.log || fail_log a.log "a: no kill"
  grep -q "KILLED BY SIGNAL: 9\|signal 9\|EXIT CODE: 9" a.log || fail_log a.log "a: mpiexec did not report the kill"
  test -f a/step-00000008.h5 && ! test -e a/step-00000012.h5 || fail "a: unexpected checkpoints: $(ls a)"
  inspect_step a/step-00000008.h5 8
  same_losses a.jsonl ref.jsonl 1 9
  "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps 12 --checkpoint.interval 4 \
    --checkpoint.dir "$tmp/a" --resume latest --log.metrics a2.jsonl > a2.log 2>&1 || fail_log a2.log "a: resume failed"
  grep -q "resumed from $tmp/a/step-00000008.h5 at step 8" a2.log || fail_log a2.log "a: did not resume from step 8"
  same_losses a2.jsonl ref.jsonl 9 12

  # 2. SIGKILL to rank 1 while it writes the checkpoint of step 8 (parameters written, AdamW
  #    moments not yet): step-8 stays a partial .tmp file, step 4 is the last complete one.
  run_fault b 2 kill:rank=1:checkpoint_write:step=8 "${S[@]}" --train.steps 12 \
    --checkpoint.interval 4 --checkpoint.dir "$tmp/b" --log.metrics b.jsonl
  [[ $rc != 0 ]] || fail "b: the job exited 0 although a rank was killed"
  ((secs < 60)) || fail "b: the job took $secs s to end"
  grep -q "rank 1, step 8: SIGKILL while writing a checkpoint" b.log || fail_log b.log "b: no kill"
  test -f b/step-00000008.h5.tmp || fail "b: no partial file: $(ls b)"
  ! test -e b/step-00000008.h5 || fail "b: a checkpoint of step 8 was completed"
  echo "   partial file left by the kill: b/step-00000008.h5.tmp ($(stat -c %s b/step-00000008.h5.tmp) bytes)"
  if "$examoe" inspect b/step-00000008.h5.tmp > /dev/null 2>&1; then
    echo "   (the partial file happens to be readable HDF5 metadata)"
  fi
  inspect_step b/step-00000004.h5 4
  "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps 12 --checkpoint.interval 4 \
    --checkpoint.dir "$tmp/b" --resume latest --log.metrics b2.jsonl > b2.log 2>&1 || fail_log b2.log "b: resume failed"
  grep -q "note: ignored and removed $tmp/b/step-00000008.h5.tmp" b2.log || fail_log b2.log "b: no note on the partial file"
  grep -q "resumed from $tmp/b/step-00000004.h5 at step 4" b2.log || fail_log b2.log "b: did not resume from step 4"
  ! test -e b/step-00000008.h5.tmp || fail "b: the partial file is still there"
  inspect_step b/step-00000012.h5 12
  same_losses b2.jsonl ref.jsonl 5 12

  # 3. Three ranks: hydra ends the two survivors; the checkpoint resumes at 3 ranks.
  "$mpiexec" -n 3 "$examoe" train "${S[@]}" --train.steps 4 --checkpoint.dir "$tmp/ref3" \
    --log.metrics ref3.jsonl > ref3.log 2>&1 || fail_log ref3.log "3-rank reference run failed"
  run_fault c 3 kill:rank=2:step=3 "${S[@]}" --train.steps 4 --checkpoint.interval 2 \
    --checkpoint.dir "$tmp/c"
  [[ $rc != 0 ]] || fail "c: the job exited 0 although a rank was killed"
  ((secs < 60)) || fail "c: the job took $secs s to end"
  inspect_step c/step-00000002.h5 2
  "$mpiexec" -n 3 "$examoe" train "${S[@]}" --train.steps 4 --checkpoint.dir "$tmp/c" \
    --resume latest --log.metrics c2.jsonl > c2.log 2>&1 || fail_log c2.log "c: resume failed"
  same_losses c2.jsonl ref3.jsonl 3 4
  echo "kill: 3 SIGKILLs injected; every job ended, checkpoints intact, resumed runs exact"
  ;;

hang)
  # Rank 1 of 2 stops before the dispatch all-to-all of step 3; rank 2 of 3 before the
  # gradient reduce-scatter of step 2. Watchdog deadline 5 s.
  for np in 2 3; do
    if [[ $np == 2 ]]; then spec=hang:rank=1:step=3:phase=moe.dispatch label=moe.dispatch who=1
    else spec=hang:rank=2:step=2:phase=fsdp.reduce_scatter label=fsdp.reduce_scatter who=2; fi
    run_fault "h$np" "$np" "$spec" "${S[@]}" --train.steps 20 --parallel.watchdog_seconds 5 \
      --checkpoint.dir "$tmp/h$np"
    [[ $rc != 0 ]] || fail "h$np: exit code 0"
    ((secs < 60)) || fail "h$np: the job took $secs s to end (deadline 5 s)"
    grep "examoe: watchdog:" "h$np.log" || fail_log "h$np.log" "h$np: no watchdog report"
    [[ $(grep -c "examoe: watchdog:" "h$np.log") == 1 ]] || fail "h$np: more than one report"
    grep -q "examoe: watchdog: collective '$label' (.*) did not finish within 5 s; ranks that did not arrive: $who;" "h$np.log" ||
      fail "h$np: the report does not name '$label' and rank $who"
  done
  # A rank that is late by less than the deadline is no fault.
  run_fault slow 2 hang:rank=1:step=2:phase=moe.dispatch:seconds=2 "${S[@]}" --train.steps 4 \
    --parallel.watchdog_seconds 5 --checkpoint.dir "$tmp/slow"
  [[ $rc == 0 ]] || fail_log slow.log "slow: a rank 2 s late failed the run (deadline 5 s)"
  grep -q "^summary:" slow.log || fail "slow: no summary"
  echo "hang: 3 hangs injected; 2 reported by the watchdog with the right collective and rank, 1 shorter than the deadline tolerated"
  ;;

nonfinite)
  run_fault skip 2 nan:step=3:rank=1 "${S[@]}" --train.steps 6 --checkpoint.dir "$tmp/skip" \
    --log.metrics skip.jsonl
  [[ $rc == 0 ]] || fail_log skip.log "skip: exit code $rc"
  grep "non-finite" skip.log
  grep -q "step 3: non-finite gradient (seen on 1 of 2 ranks); update skipped (1 skipped, 1 in a row)" skip.log ||
    fail "skip: no report of the skipped step"
  grep -q "^step 6/6 .*| skipped 1" skip.log || fail "skip: the progress line does not count the skipped step"
  grep -q "^summary: .*1 step skipped (non-finite loss or gradient)" skip.log || fail "skip: summary"
  python3 - skip.jsonl << 'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ev = [j for j in lines if j.get("nonfinite")]
assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["action"] == "skip" and ev[0]["ranks"] == 1, ev
assert [j for j in lines if j.get("summary")][0]["skipped_steps"] == 1
assert [j for j in lines if j.get("step") == 6 and "loss" in j][0]["skipped"] == 1
print("   metrics: skipped step 3 recorded, summary skipped_steps = 1")
PY
  run_fault stop 2 inf:step=3:where=loss "${S[@]}" --train.steps 6 --train.nonfinite stop \
    --checkpoint.dir "$tmp/stop" --log.metrics stop.jsonl
  [[ $rc == 3 ]] || fail_log stop.log "stop: exit code $rc, expected 3"
  grep "^examoe: training stopped" stop.log
  grep -q "^examoe: training stopped at step 3: non-finite loss (train.nonfinite = stop); the last good weights and optimizer state are in $tmp/stop/step-00000003.h5" stop.log ||
    fail "stop: no clear message"
  inspect_step stop/step-00000003.h5 3
  "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps 6 --checkpoint.dir "$tmp/stop" \
    --resume latest --log.metrics stop2.jsonl > stop2.log 2>&1 || fail_log stop2.log "stop: resume failed"
  same_losses stop2.jsonl skip.jsonl 4 6
  echo "nonfinite: 2 faults injected; one step skipped, one run stopped with exit code 3 and resumed exactly"
  ;;

signals)
  # SIGTERM and SIGUSR1 to mpiexec itself (as a batch system or a user sends them): hydra
  # forwards them, every rank writes its part of a checkpoint at the end of the step, exit 0.
  for sig in TERM USR1; do
    d=$tmp/sig$sig
    "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps 100000 --checkpoint.dir "$d" \
      --log.metrics "sig$sig.jsonl" < /dev/null > "sig$sig.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
      [[ -f sig$sig.jsonl && $(wc -l < "sig$sig.jsonl") -ge 5 ]] && break
      sleep 0.1
    done
    kill -s "$sig" "$pid"
    t0=$SECONDS
    set +e
    wait "$pid"
    rc=$?
    set -e
    echo "-- SIG$sig to mpiexec: exit code $rc after $((SECONDS - t0)) s"
    [[ $rc == 0 ]] || fail_log "sig$sig.log" "SIG$sig: exit code $rc"
    grep "stopping at step" "sig$sig.log" || fail_log "sig$sig.log" "SIG$sig: no clean stop"
    n=$(sed -n 's/^stopping at step \([0-9]*\) on a signal.*/\1/p' "sig$sig.log")
    ckpt=$(printf "%s/step-%08d.h5" "$d" "$n")
    inspect_step "$ckpt" "$n"
    # Resume 3 more steps and compare with an uninterrupted run of n+3 steps.
    "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps $((n + 3)) --checkpoint.dir "$d" \
      --resume latest --log.metrics "sig${sig}2.jsonl" > "sig${sig}2.log" 2>&1 || fail_log "sig${sig}2.log" "SIG$sig: resume failed"
    "$mpiexec" -n 2 "$examoe" train "${S[@]}" --train.steps $((n + 3)) --checkpoint.dir "$d-ref" \
      --log.metrics "sig${sig}ref.jsonl" > "sig${sig}ref.log" 2>&1 || fail "SIG$sig: reference run failed"
    same_losses "sig${sig}.jsonl" "sig${sig}ref.jsonl" 1 "$n"
    same_losses "sig${sig}2.jsonl" "sig${sig}ref.jsonl" $((n + 1)) $((n + 3))
  done
  echo "signals: SIGTERM and SIGUSR1 to mpiexec stopped cleanly with checkpoints that resume exactly"
  ;;
*)
  fail "unknown mode '$mode'"
  ;;
esac
