#!/usr/bin/env bash
# LeakSanitizer over one short training run (2 ranks): fails if any leak report has a frame in
# ExaMoE (our namespace or sources). Leaks inside MPI/UCX/HDF5 plugins loaded at run time are
# listed but not ExaMoE's. Skips (77) unless the binary was built with AddressSanitizer.
# usage: check.sh <examoe binary> [mpiexec] [require]
# With "require" (registered so in sanitizer builds) a binary without ASan is a failure.
set -uo pipefail
examoe=$1 mpiexec=${2:-mpiexec} require=${3:-}
# No `grep -q` here: it exits at the first match, ldd gets SIGPIPE, and pipefail turns the
# match into a failure.
if ! ldd "$examoe" | grep libasan > /dev/null; then
  if [ "$require" = require ]; then echo "FAIL: $examoe is not linked with AddressSanitizer"; exit 1; fi
  echo "not an AddressSanitizer build: skipped"; exit 77
fi
tmp=$(mktemp -d /tmp/examoe-lsan.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
ASAN_OPTIONS=detect_leaks=1 OPENBLAS_NUM_THREADS=1 "$mpiexec" -n 2 "$examoe" train \
  --train.steps 10 --log.interval 5 --checkpoint.interval 10 > run.log 2>&1
rc=$?
grep -q "summary:" run.log || { cat run.log; echo "the training run did not finish (rc=$rc)"; exit 1; }
# Leak blocks: from "Direct/Indirect leak" to the next blank line.
awk '/(Direct|Indirect) leak of/{blk=$0; inb=1; next} inb && NF==0 {print blk; print "----"; inb=0; next} inb {blk=blk "\n" $0}' run.log > leaks.txt
total=$(grep -c "leak of" leaks.txt || true)
ours=$(awk 'BEGIN{RS="----\n"} /examoe::|\/src\/[a-z_]+\.cpp|include\/examoe\// {n++} END{print n+0}' leaks.txt)
echo "LeakSanitizer: $total leak reports in the run, $ours with an ExaMoE frame"
if [ "$ours" -gt 0 ]; then
  awk 'BEGIN{RS="----\n"} /examoe::|\/src\/[a-z_]+\.cpp|include\/examoe\//' leaks.txt
  exit 1
fi
exit 0
