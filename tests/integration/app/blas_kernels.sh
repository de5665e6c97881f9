#!/usr/bin/env bash
# The host BLAS check of the apps (include/examoe/impl/host_blas.hpp): with OpenBLAS made to run
# its SSE3 kernels (OPENBLAS_CORETYPE=Prescott) on a CPU with AVX2 or AVX-512, `examoe bench`
# warns once, on stderr, naming the OPENBLAS_CORETYPE that fits, and still runs; with kernels
# that fit, no warning. The bench's backend line names the kernels either way.
# usage: blas_kernels.sh <examoe> [mpiexec]
set -euo pipefail
examoe=$1 mpiexec=${2:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-blas.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if grep -qw avx512f /proc/cpuinfo; then fit=SkylakeX
elif grep -qw avx2 /proc/cpuinfo; then fit=Haswell
else echo "SKIP: this CPU has neither AVX2 nor AVX-512"; exit 77; fi
bench=(bench --tokens 32 --d-model 16 --d-hidden 32 --experts 4 --steps 1 --warmup 0)

OPENBLAS_CORETYPE=Prescott "$mpiexec" -n 2 "$examoe" "${bench[@]}" >"$tmp/out" 2>"$tmp/err"
if ! grep -q "GEMMs with OpenBLAS's" "$tmp/out"; then
  echo "SKIP: the BLAS of this build is not OpenBLAS"; cat "$tmp/out"; exit 77
fi
cat "$tmp/err"
grep -q "GEMMs with OpenBLAS's Prescott kernels" "$tmp/out"
test "$(grep -c "examoe: warning: OpenBLAS runs its 'Prescott' kernels" "$tmp/err")" = 1  # rank 0 only
grep -q "set OPENBLAS_CORETYPE=$fit in the environment of every rank" "$tmp/err"

OPENBLAS_CORETYPE=$fit "$mpiexec" -n 2 "$examoe" "${bench[@]}" >"$tmp/out" 2>"$tmp/err"
grep "backend:" "$tmp/out"
grep -q "GEMMs with OpenBLAS's $fit kernels" "$tmp/out"
if grep -q "warning" "$tmp/err"; then cat "$tmp/err"; echo "FAIL: a warning with kernels that fit"; exit 1; fi
echo "blas_kernels: OK"
