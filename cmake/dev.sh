#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine:
#   ./cmake/dev.sh run    install what is missing, build, run the main job (examoe train, 2 ranks)
#   ./cmake/dev.sh test   install what is missing, build, run the whole test suite (ctest)
#   ./cmake/dev.sh sanitize   same set-up, then an ASan+UBSan build (build-asan/) running the MPI
#                             tests at 2 ranks and a LeakSanitizer check of a short training run
#   ./cmake/dev.sh fuzz   same set-up, then a clang build with libFuzzer, ASan and UBSan
#                         (build-fuzz/) that fuzzes the config parser and the checkpoint readers
#                         for EXAMOE_FUZZ_SECONDS (default 45) each, from freshly generated seeds
#   ./cmake/dev.sh deps   only install the Debian packages
# Safe to run again: packages already installed are skipped, the build is incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(cmake make g++ pkg-config
          libtrilinos-kokkos-dev libtrilinos-kokkos-kernels-dev
          mpich libmpich-dev libhdf5-mpich-dev hdf5-tools libopenblas-dev
          libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
          python3 python3-numpy python3-h5py-serial python3-matplotlib slurm-wlm munge
          clang libclang-rt-14-dev)

install_deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "examoe: all ${#PACKAGES[@]} Debian packages present"
    return
  fi
  echo "examoe: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build() {
  # Where the CUDA toolkit and NCCL are installed (as on the project's CI machines), also build
  # the NCCL backend, so every run compiles and links it, GPU or not. EXAMOE_NCCL=0 skips it.
  local extra=()
  if [ "${EXAMOE_NCCL:-1}" != 0 ] && [ -f /usr/local/cuda/include/nccl.h ]; then
    extra=(-DExaMoE_REQUIRE_NCCL=ON -DCUDAToolkit_ROOT=/usr/local/cuda)
  fi
  cmake --preset default "${extra[@]}"
  cmake --build --preset default
}

# One BLAS thread per rank: the ranks are the parallelism.
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1

# An OpenBLAS older than the CPU does not recognise it and runs its SSE3 kernels, several times
# slower (docs/performance.md, "The host BLAS"). Where OpenBLAS would, and OPENBLAS_CORETYPE is
# not set, this sets it to the kernels the CPU's vectors fit, and says so.
choose_blas_kernels() {
  [ -z "${OPENBLAS_CORETYPE:-}" ] || return 0
  local core fit=""
  core=$(python3 -c 'import ctypes; b = ctypes.CDLL("libopenblas.so.0"); b.openblas_get_corename.restype = ctypes.c_char_p; print(b.openblas_get_corename().decode())' 2>/dev/null) || return 0
  case "$core" in ""|Haswell|Zen|SkylakeX|Cooperlake|SapphireRapids|Excavator) return 0 ;; esac
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then fit=SkylakeX
  elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then fit=Haswell
  else return 0; fi
  export OPENBLAS_CORETYPE=$fit
  echo "examoe: OpenBLAS would run its $core kernels on this CPU; OPENBLAS_CORETYPE=$fit for this run"
}

case "${1:-}" in
  deps) install_deps ;;
  run)
    install_deps
    choose_blas_kernels
    build
    mpiexec -n "${EXAMOE_RANKS:-2}" ./build/apps/examoe train
    ;;
  test)
    install_deps
    choose_blas_kernels
    build
    ctest --preset default
    ;;
  sanitize)
    install_deps
    choose_blas_kernels
    cmake --preset asan
    cmake --build --preset asan
    ctest --preset asan
    ;;
  fuzz)
    install_deps
    choose_blas_kernels
    cmake --preset fuzz
    cmake --build --preset fuzz
    out=build-fuzz
    rm -rf "$out/seeds" "$out/findings"
    mkdir -p "$out/findings" "$out/corpus/config" "$out/corpus/checkpoint"
    export LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp"
    rm -rf "$out/tmp" && mkdir -p "$out/tmp"
    export TMPDIR="$PWD/$out/tmp"   # the targets' work files
    # (The seed generator starts and stops MPI; leaks of unloaded MPI plugins are not ours.)
    ASAN_OPTIONS=detect_leaks=0 "$out/fuzz/fuzz_make_seeds" "$out/seeds"
    status=0
    for target in config checkpoint; do
      extra=()
      [ "$target" = config ] && extra=(-dict="$out/seeds/config.dict")
      log="$out/fuzz_$target.log"
      echo "examoe: fuzzing $target for ${EXAMOE_FUZZ_SECONDS:-45} s"
      # New inputs go to corpus/<target> (kept between local runs); the generated seeds and the
      # committed inputs of past findings (fuzz/regressions/<target>) are read as well.
      if ! "$out/fuzz/fuzz_$target" -max_total_time="${EXAMOE_FUZZ_SECONDS:-45}" -timeout=30 \
           -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$out/findings/$target-" \
           "${extra[@]}" "$out/corpus/$target" "$out/seeds/$target" "fuzz/regressions/$target" > "$log" 2>&1; then
        status=1
        tail -n 60 "$log"
        echo "examoe: fuzz_$target found a problem: $(ls "$out"/findings/$target-* 2>/dev/null | tr '\n' ' ')"
        echo "        reproduce: $out/fuzz/fuzz_$target <file>"
      fi
      done_line=$(grep -E "DONE|^#[0-9]+" "$log" | tail -n 1 || true)
      echo "examoe: fuzz_$target: $(grep -m1 'number_of_executed_units' "$log" | awk '{print $2}') executions," \
           "$(echo "$done_line" | grep -oE 'cov: [0-9]+' || echo 'cov: ?') edges," \
           "$(echo "$done_line" | grep -oE 'corp: [0-9]+/[0-9a-zA-Z]+' || echo 'corp: ?') corpus," \
           "$(ls "$out"/findings/$target-* 2>/dev/null | wc -l) findings"
    done
    exit $status
    ;;
  *)
    echo "usage: $0 run|test|sanitize|fuzz|deps" >&2
    exit 2
    ;;
esac
