#!/usr/bin/env bash
# A real, throw-away, single-node Slurm cluster on this machine, and ExaMoE run on it:
#   1. munged, slurmctld and slurmd started from a fresh temp dir (config, key, state, logs);
#   2. srun -n 2 --mpi=pmi2 examoe train: one job of 2 ranks (not two singletons);
#   3. sbatch --wait examples/slurm/train-cpu.sbatch: the job completes, exit code 0;
#   4. SIGUSR1 to the batch shell (what --signal=B:USR1@120 does): the script forwards it to
#      every task of the training step (a stand-in binary) and the job ends cleanly.
# Only the daemons this script started are stopped, by PID, whatever happens; the temp dir
# is removed. Every Slurm client call is bounded by `timeout`.
#
# Usage: run-local-slurm.sh EXAMOE_BINARY SOURCE_DIR
# Exit: 0 pass, 1 fail, 77 skipped (Slurm or munge not installed, or not root).
# EXAMOE_SLURM_TEST_KEEP=1 keeps the temp dir (daemons are still stopped).

# shellcheck disable=SC2317  # functions run from traps
set -uo pipefail

say() { printf 'slurm.local: %s\n' "$*"; }
skip() { say "SKIP: $*"; exit 77; }

examoe=${1:-}
src=${2:-}
if [[ -z $examoe || -z $src ]]; then
  echo "usage: $0 EXAMOE_BINARY SOURCE_DIR" >&2
  exit 2
fi

# ---- prerequisites ---------------------------------------------------------------------------
PATH=$PATH:/usr/sbin:/sbin
missing=()
for tool in munged slurmctld slurmd srun sbatch sinfo squeue scontrol scancel; do
  command -v "$tool" > /dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  skip "not installed: ${missing[*]} (Debian: apt-get install slurmctld slurmd slurm-client munge)"
fi
if [[ $(id -u) != 0 ]]; then
  skip "needs root: slurmd launches the job's tasks as their user"
fi

[[ $examoe == /* ]] || examoe=$PWD/$examoe
[[ $src == /* ]] || src=$PWD/$src
[[ -x $examoe ]] || { say "FAIL: examoe binary '$examoe' is not executable"; exit 1; }
sbatch_script=$src/examples/slurm/train-cpu.sbatch
config=$src/examples/configs/small.json
[[ -r $sbatch_script && -r $config ]] || { say "FAIL: $sbatch_script or $config missing"; exit 1; }

# A Slurm or MPI environment around us (a CI job inside an allocation) must not leak into the
# clients: they would look for that job on our cluster.
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^(SLURM_|SBATCH_|SRUN_|SALLOC_|SQUEUE_|SINFO_|SCONTROL_|PMI_|PMIX_|HYDRA_|MPIR_)')

start_time=$SECONDS
node=$(hostname -s)
tmp=$(mktemp -d /tmp/examoe-slurm.XXXXXX) || { say "FAIL: mktemp"; exit 1; }
# munged wants every directory above its socket searchable by all: 711, nothing listable.
chmod 711 "$tmp"
mkdir -p "$tmp"/{etc,munge,state,spool,log,run,work}
chmod 711 "$tmp/munge"
pids_file=$tmp/run/daemons.pids          # "name pid" of every daemon started, in start order
: > "$pids_file"
# Every process started from here on (daemons, job steps, tasks) carries this marker in its
# environment, so that cleanup finds exactly ours and nothing else.
export EXAMOE_SLURM_TEST_ID=$tmp
failed=0
watchdog_pid=

# ---- cleanup: stop what we started, by PID ---------------------------------------------------
alive() {  # PID: running (a zombie waiting for its parent to reap it counts as gone)
  local stat
  stat=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}
stop_pid() {  # NAME PID
  local name=$1 pid=$2 i
  alive "$pid" || { wait "$pid" 2> /dev/null; return 0; }
  kill -TERM "$pid" 2> /dev/null
  for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then
    say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2> /dev/null
  fi
  wait "$pid" 2> /dev/null   # reap when it is our child
  return 0
}
marked_pids() {  # processes other than us whose environment has our marker
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $p == "$$" || $p == "$BASHPID" || $p == "$watchdog_pid" ]] && continue
    grep -qszxF "EXAMOE_SLURM_TEST_ID=$tmp" "/proc/$p/environ" && echo "$p"
  done
}
stop_all() {
  local name pid lines=() i
  # Jobs first, while slurmctld is up, so slurmd ends their steps.
  if [[ -n ${ctld_up:-} ]] && alive "$ctld_pid"; then
    timeout 10 scancel --quiet --user="$(id -un)" 2> /dev/null
    for ((i = 0; i < 30; i++)); do
      [[ -z $(timeout 5 squeue -h -o %i 2> /dev/null) ]] && break
      sleep 0.5
    done
  fi
  # Let the job steps' slurmstepd end first: each removes its socket NODE_JOB.STEP from the
  # spool dir.
  for ((i = 0; i < 50; i++)); do
    compgen -G "$tmp/spool/slurmd-$node/${node}_[0-9]*" > /dev/null || break
    sleep 0.2
  done
  # Daemons in reverse start order: slurmd, slurmctld, munged.
  [[ -r $pids_file ]] && mapfile -t lines < "$pids_file"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid <<< "${lines[i]}"
    stop_pid "$name" "$pid"
  done
  # Anything left of ours: slurmstepd or a task of a step that did not end.
  for pid in $(marked_pids); do
    say "stray process $pid ($(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | cut -c1-80)): stopping it"
    stop_pid stray "$pid"
  done
  # slurmstepd daemonizes (its parent is init); give init a moment to reap the ended ones, so
  # that `pgrep slurm` right after the test shows nothing. Only waits, at most 5 s.
  for ((i = 0; i < 25; i++)); do
    zombie_stepds || break
    sleep 0.2
  done
}
zombie_stepds() {  # true while an ended slurmstepd waits for init to reap it
  local f stat
  for f in /proc/[0-9]*/stat; do
    stat=$(cat "$f" 2> /dev/null) || continue
    [[ $stat == *"(slurmstepd) Z 1 "* ]] && return 0
  done
  return 1
}
show_logs() {
  local d f
  for d in munged slurmctld slurmd; do   # the log file, else what it wrote to stderr
    f=$tmp/log/$d.log
    [[ -s $f ]] || f=$tmp/log/$d.out
    [[ -s $f ]] || continue
    say "----- last 60 lines of $f -----"
    tail -n 60 "$f"
  done
  for f in "$tmp"/work/*.out; do
    [[ -s $f ]] || continue
    say "----- $f -----"
    tail -n 40 "$f"
  done
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n $watchdog_pid ]]; then kill "$watchdog_pid" 2> /dev/null; wait "$watchdog_pid" 2> /dev/null; fi
  ((failed || (rc != 0 && rc != 77))) && show_logs
  say "stopping the daemons this test started"
  stop_all
  if [[ ${EXAMOE_SLURM_TEST_KEEP:-0} == 1 ]]; then say "kept $tmp"; else rm -rf "$tmp"; fi
  if ((rc == 0)); then say "PASS ($((SECONDS - start_time)) s)"; else say "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# Should this script be killed with SIGKILL, a watchdog still stops the daemons.
(
  exec > /dev/null 2>&1 < /dev/null
  trap '' INT HUP
  trap 'exit 0' TERM
  while alive $$; do sleep 1; done
  stop_all
  rm -rf "$tmp"
) &
watchdog_pid=$!

fail() {
  say "FAIL: $*"
  failed=1
  exit 1
}
daemon_alive() {  # NAME PID: fail if it died
  alive "$2" || fail "$1 (pid $2) exited; see its log below"
}

# ---- configuration ---------------------------------------------------------------------------
port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
pick_port() {  # a free TCP port in 20000-32767 (below Linux's ephemeral ports), not $1
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12768))
    [[ $p != "${1:-}" ]] && port_free "$p" && { echo "$p"; return 0; }
  done
  return 1
}
ctld_port=$(pick_port) || fail "no free TCP port"
slurmd_port=$(pick_port "$ctld_port") || fail "no free TCP port"
user=$(id -un)
conf=$tmp/etc/slurm.conf
sock=$tmp/munge/munge.socket
: > "$tmp/etc/plugstack.conf"   # no SPANK plugins from /etc/slurm/plugstack.conf.d
cat > "$conf" << EOF
# Written by $0 for one test run.
ClusterName=examoe-test
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool/slurmd-%n
SlurmctldPidFile=$tmp/run/slurmctld.pid
SlurmdPidFile=$tmp/run/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$tmp/etc/plugstack.conf
TmpFS=$tmp/work
MailProg=/bin/true
InactiveLimit=0
KillWait=5
NodeName=$node NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=30 State=UP
EOF
export SLURM_CONF=$conf
say "temp dir $tmp; node $node; slurmctld port $ctld_port, slurmd port $slurmd_port"

# ---- munged ----------------------------------------------------------------------------------
key=$tmp/munge/munge.key
if command -v mungekey > /dev/null; then
  mungekey --create --keyfile="$key" > /dev/null 2>&1 || fail "mungekey --create failed"
else
  (umask 077 && head -c 1024 /dev/urandom > "$key") || fail "cannot write a munge key"
fi
chmod 600 "$key"
munged --foreground --socket="$sock" --key-file="$key" --pid-file="$tmp/run/munged.pid" \
       --log-file="$tmp/log/munged.log" --seed-file="$tmp/munge/munged.seed" \
       > "$tmp/log/munged.out" 2>&1 < /dev/null &
munged_pid=$!
echo "munged $munged_pid" >> "$pids_file"
say "started munged (pid $munged_pid)"
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; daemon_alive munged "$munged_pid"; sleep 0.1; done
[[ -S $sock ]] || fail "munged did not create $sock in 10 s"
if command -v munge > /dev/null && command -v unmunge > /dev/null; then
  timeout 10 munge -n -S "$sock" | timeout 10 unmunge -S "$sock" > /dev/null \
    || fail "munge credential round trip through $sock failed"
fi

# ---- slurmctld, slurmd -----------------------------------------------------------------------
slurmctld -D -c -f "$conf" > "$tmp/log/slurmctld.out" 2>&1 < /dev/null &
ctld_pid=$!
echo "slurmctld $ctld_pid" >> "$pids_file"
say "started slurmctld (pid $ctld_pid)"
for ((i = 0; i < 60; i++)); do
  timeout 5 scontrol ping 2> /dev/null | grep -q 'is UP' && { ctld_up=1; break; }
  daemon_alive slurmctld "$ctld_pid"
  sleep 0.5
done
[[ -n ${ctld_up:-} ]] || fail "slurmctld did not answer scontrol ping in 30 s"

slurmd -D -f "$conf" -N "$node" > "$tmp/log/slurmd.out" 2>&1 < /dev/null &
slurmd_pid=$!
echo "slurmd $slurmd_pid" >> "$pids_file"
say "started slurmd (pid $slurmd_pid)"
state=
for ((i = 0; i < 120; i++)); do
  state=$(timeout 5 sinfo -h -n "$node" -o %t 2> /dev/null)
  [[ $state == idle ]] && break
  daemon_alive slurmctld "$ctld_pid"
  daemon_alive slurmd "$slurmd_pid"
  sleep 0.5
done
[[ $state == idle ]] || fail "node $node is not idle after 60 s (state '$state')"
say "cluster up: $(timeout 5 sinfo -h -o '%P %D %t %c %N') ($((SECONDS - start_time)) s)"

work=$tmp/work
cd "$work" || fail "cd $work"

# ---- 1. srun: one job of 2 ranks -------------------------------------------------------------
say "srun: 2 tasks, --mpi=pmi2 (PMI wiring)"
# shellcheck disable=SC2016  # expanded by each task's shell
timeout 60 srun -N1 -n2 --mpi=pmi2 --time=2 \
  bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS: PMI_RANK=${PMI_RANK:-unset} PMI_SIZE=${PMI_SIZE:-unset}"' \
  > "$work/hello.out" 2>&1
rc=$?
sed 's/^/  | /' "$work/hello.out"
((rc == 0)) || fail "srun of 2 shell tasks exited with $rc"
[[ $(grep -c '^task [01] of 2:' "$work/hello.out") == 2 ]] || fail "srun did not run 2 tasks"

say "srun: examoe train on 2 ranks"
OPENBLAS_NUM_THREADS=1 timeout 300 srun -N1 -n2 --mpi=pmi2 --kill-on-bad-exit=1 --time=5 \
  "$examoe" train --train.steps 20 --log.interval 10 --log.metrics "$work/srun.metrics.jsonl" \
  > "$work/srun.out" 2>&1
rc=$?
sed 's/^/  | /' "$work/srun.out"
((rc == 0)) || fail "srun examoe train exited with $rc"
headers=$(grep -c '^examoe train:' "$work/srun.out")
((headers > 0)) || fail "examoe printed no 'examoe train:' header"
# Without working PMI every rank is a singleton of size 1 and prints its own header, exit 0.
((headers == 1)) || fail "$headers 'examoe train:' headers: the ranks did not form one MPI job (PMI)"
grep -q '^examoe train: 2 ranks ' "$work/srun.out" || fail "examoe did not see 2 ranks"
grep -q '^summary:' "$work/srun.out" || fail "no 'summary:' line"
[[ -s $work/srun.metrics.jsonl ]] || fail "no metrics written to --log.metrics"
say "ok: one job of 2 ranks, trained 20 steps"

# ---- 2. sbatch --wait examples/slurm/train-cpu.sbatch ----------------------------------------
say "sbatch --wait examples/slurm/train-cpu.sbatch (1 node x 2 tasks, 20 steps)"
EXAMOE_BIN=$examoe EXAMOE_CONFIG=$config EXAMOE_STEPS=20 \
EXAMOE_ARGS="--log.interval 10 --log.eval_interval 20" EXAMOE_METRICS=$work/sbatch.metrics.jsonl \
  timeout 300 sbatch --wait --parsable --export=ALL --job-name=examoe-test-cpu \
  --nodes=1 --ntasks-per-node=2 --time=5 --chdir="$work" --output="$work/train-cpu-%j.out" \
  "$sbatch_script" > "$work/sbatch.id" 2> "$work/sbatch.err"
rc=$?
job=$(head -n 1 "$work/sbatch.id" | cut -d';' -f1)
out=$work/train-cpu-$job.out
[[ -n $job ]] || { cat "$work/sbatch.err"; fail "sbatch did not submit (exit $rc)"; }
[[ -s $out ]] && sed 's/^/  | /' "$out"
((rc == 0)) || { cat "$work/sbatch.err"; fail "job $job: sbatch --wait exited with $rc"; }
jobstate=$(timeout 10 scontrol show job "$job" 2> /dev/null | grep -o 'JobState=[A-Z_]*\|ExitCode=[0-9:]*' | tr '\n' ' ')
say "job $job: $jobstate"
[[ $jobstate == *JobState=COMPLETED* && $jobstate == *ExitCode=0:0* ]] || fail "job $job did not complete with exit code 0"
[[ $(grep -c '^examoe train:' "$out") == 1 ]] || fail "job $job: expected one 'examoe train:' header"
grep -q '^examoe train: 2 ranks ' "$out" || fail "job $job: examoe did not see 2 ranks"
grep -q '^summary:' "$out" || fail "job $job: no 'summary:' line"
[[ -s $work/sbatch.metrics.jsonl ]] || fail "job $job: no metrics written"
say "ok: batch job $job completed, 2 ranks, summary written"

# ---- 3. SIGUSR1 to the batch shell is forwarded to every task of the step -------------------
# A stand-in for examoe: examoe itself does not act on SIGUSR1 yet (MPICH's MPI_Init installs a
# SIGUSR1 handler that swallows it), so this checks the batch script's trap -> srun -> tasks.
# RESUME-PLACEHOLDER: with checkpoint-on-signal, run the real examoe here and assert that it
# wrote a checkpoint, then that a second job with --resume continues from its step.
fake=$work/fake-examoe
cat > "$fake" << 'EOF2'
#!/bin/bash
trap 'echo "fake examoe rank $SLURM_PROCID: got SIGUSR1"; exit 0' USR1
echo "fake examoe rank $SLURM_PROCID of $SLURM_NTASKS (local $SLURM_LOCALID): $*"
for ((i = 0; i < 600; i++)); do sleep 0.1; done
echo "fake examoe rank $SLURM_PROCID: no SIGUSR1 in 60 s"
exit 1
EOF2
chmod +x "$fake"
say "sbatch train-cpu.sbatch (stand-in binary), then SIGUSR1 to its batch shell (as --signal=B:USR1@120 does)"
EXAMOE_BIN=$fake EXAMOE_CONFIG=$config EXAMOE_METRICS='' \
  timeout 30 sbatch --parsable --export=ALL --job-name=examoe-test-signal \
  --nodes=1 --ntasks-per-node=2 --time=5 --chdir="$work" --output="$work/signal-%j.out" \
  "$sbatch_script" > "$work/signal.id" 2> "$work/signal.err"
rc=$?
job=$(head -n 1 "$work/signal.id" | cut -d';' -f1)
if ((rc != 0)) || [[ -z $job ]]; then cat "$work/signal.err"; fail "sbatch did not submit (exit $rc)"; fi
out=$work/signal-$job.out
for ((i = 0; i < 120; i++)); do   # until both tasks run (and have their trap)
  [[ $(grep -c '^fake examoe rank [01] of 2' "$out" 2> /dev/null) == 2 ]] && break
  sleep 0.5
done
[[ $(grep -c '^fake examoe rank [01] of 2' "$out" 2> /dev/null) == 2 ]] || fail "job $job: the 2 tasks did not start in 60 s"
timeout 10 scancel --batch --signal=USR1 "$job" || fail "scancel --batch --signal=USR1 $job failed"
jobstate=
for ((i = 0; i < 120; i++)); do
  jobstate=$(timeout 5 scontrol show job "$job" 2> /dev/null | grep -o 'JobState=[A-Z_]*\|ExitCode=[0-9:]*' | tr '\n' ' ')
  [[ -n $jobstate && $jobstate != *JobState=RUNNING* && $jobstate != *JobState=PENDING* && $jobstate != *JobState=COMPLETING* ]] && break
  sleep 0.5
done
sed 's/^/  | /' "$out"
say "job $job: $jobstate"
[[ $jobstate == *JobState=COMPLETED* && $jobstate == *ExitCode=0:0* ]] || fail "job $job did not end with exit code 0 after SIGUSR1"
grep -q 'SIGUSR1: the time limit is near; forwarding' "$out" || fail "job $job: the batch script's trap did not run"
[[ $(grep -c '^fake examoe rank [01]: got SIGUSR1' "$out") == 2 ]] || fail "job $job: SIGUSR1 did not reach both tasks"
grep -q 'training step ended with exit code 0 (after SIGUSR1)' "$out" || fail "job $job: the batch script did not wait for the step"
say "ok: SIGUSR1 reached the batch shell, was forwarded to both tasks, job $job ended cleanly"

exit 0
