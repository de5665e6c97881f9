#!/usr/bin/env bash
# The GPU check of ExaMoE, for one lent H200 (the `device` tool), about 10 minutes:
#   1. unpack the carried Debian packages (MPICH, GoogleTest, OpenBLAS, CLI11, nlohmann-json);
#   2. build ExaMoE with the carried CUDA Kokkos (+ Kokkos Kernels/cuBLAS) and the machine's
#      NCCL (/usr/local/cuda, or the nvidia-nccl wheel of its Python);
#   3. run the layer's correctness tests on the GPU, the counted waits per step (host_syncs),
#      the NCCL backend check, the cuBLAS grouped-GEMM check, and a short training run, at 1 rank;
#   4. `examoe bench` with --comm nccl and --comm mpi: expert GEMM rate against the bare GEMM
#      bound, data movement against the device copy rate, host syncs / launches / GEMM calls;
#      then bf16 rows, TF32, overlap off and fine-grained experts (E = 256) on NCCL.
# Prepare here with tests/device/prepare-carry.sh, then run it with carry [".device"] and
#   bash tests/device/h200-check.sh
# Results: $OUT/{gpu.txt,ctest.txt,bench.jsonl,bench.txt,train.txt} (or ./device-out/ without $OUT).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.txt"; }

log "unpack"
for f in .device/debs/*.deb; do dpkg -x "$f" /; done
ldconfig
export PATH=/usr/local/cuda/bin:$PATH OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
K=$PWD/.device/kokkos
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

NCCL_HINT=/usr/local/cuda
if [ ! -f /usr/local/cuda/include/nccl.h ]; then
  NCCL_HINT=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
fi
log "configure (NCCL from ${NCCL_HINT:-nowhere})"
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$K/bin/nvcc_wrapper" -DKokkos_ROOT="$K" -DKokkosKernels_ROOT="$K" \
  -DExaMoE_ENABLE_HDF5=OFF -DExaMoE_ENABLE_EXAMPLES=OFF -DExaMoE_REQUIRE_NCCL=ON \
  -DNCCL_ROOT="$NCCL_HINT" -DCUDAToolkit_ROOT=/usr/local/cuda > "$OUT/configure.txt" 2>&1 \
  || { tail -40 "$OUT/configure.txt"; exit 1; }
log "build"
cmake --build build-cuda -j 16 > "$OUT/build.txt" 2>&1 || { grep -B2 -A8 error "$OUT/build.txt" | head -80; exit 1; }

log "tests"
timeout 300 ctest --test-dir build-cuda --output-on-failure \
  -R '^((placement|kernels|dense|attention|layer|gradcheck|errors|comm|train|ragged|host_syncs|nccl\.device)\.np1|grouped_gemm\.device)$' \
  2>&1 | tee "$OUT/ctest.txt"

log "bench"
B=build-cuda/apps/examoe
for comm in nccl mpi; do
  timeout 120 mpiexec -n 1 "$B" bench --comm $comm --d-model 2048 --d-hidden 8192 --experts 8 \
    --top-k 2 --tokens 16384 --steps 10 --warmup 3 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.txt"
  timeout 120 mpiexec -n 1 "$B" bench --comm $comm --d-model 1024 --d-hidden 4096 --experts 16 \
    --top-k 2 --tokens 32768 --activation swiglu --steps 10 --warmup 3 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.txt"
done
# What each GPU option buys on the default bench shape (one rank: the exchanges are the layer's
# own copies; the overlap shows with more ranks): bf16 rows, TF32 tensor cores, overlap off;
# and the fine-grained experts of docs/performance.md.
for opts in "--dispatch-dtype bf16" "--tf32 on" "--overlap off" "--d-model 128 --d-hidden 256 --experts 256 --tokens 4096"; do
  timeout 120 mpiexec -n 1 "$B" bench --comm nccl $opts --steps 10 --warmup 3 --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.txt"
done
log "train"
timeout 120 mpiexec -n 1 "$B" train --train.steps 500 --log.interval 100 2>&1 | tee "$OUT/train.txt"
log "done"
