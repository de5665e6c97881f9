#!/usr/bin/env bash
# usage: watchdog_after_finalize.sh <program> <mpiexec> <ranks> [split]
# The job must end with the watchdog's exit code 4 within the deadline (2 s), the grace of the
# question round (1 s) and the abort grace (docs/faults.md), well under the 60 s timeout.
set -uo pipefail
prog=$1 mpiexec=$2 np=$3 mode=${4:-world}
tmp=$(mktemp -d /tmp/examoe-wd.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
start=$(date +%s.%N)
timeout 60 "$mpiexec" -n "$np" "$prog" "$mode" > out.log 2>&1
rc=$?
took=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
cat out.log
echo "rc $rc after $took s"
grep -q "watchdog: collective 'test.one_more_collective'" out.log || { echo "FAIL: no watchdog report"; exit 1; }
[ "$rc" -eq 4 ] || { echo "FAIL: exit code $rc, expected 4"; exit 1; }
python3 -c "import sys; sys.exit(0 if $took < 30 else 1)" || { echo "FAIL: took $took s"; exit 1; }
echo "watchdog ($mode) after MPI_Finalize on $((np - 1)) ranks: job ended with code 4 in $took s"
