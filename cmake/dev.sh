#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine:
#   ./cmake/dev.sh run    install what is missing, build, run the main job (examoe train, 2 ranks)
#   ./cmake/dev.sh test   install what is missing, build, run the whole test suite (ctest)
#   ./cmake/dev.sh sanitize   same set-up, then an ASan+UBSan build (build-asan/) running the MPI
#                             tests at 2 ranks and a LeakSanitizer check of a short training run
#   ./cmake/dev.sh deps   only install the Debian packages
# Safe to run again: packages already installed are skipped, the build is incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(cmake make g++ pkg-config
          libtrilinos-kokkos-dev libtrilinos-kokkos-kernels-dev
          mpich libmpich-dev libhdf5-mpich-dev hdf5-tools libopenblas-dev
          libgtest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev
          python3 slurm-wlm munge)

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

case "${1:-}" in
  deps) install_deps ;;
  run)
    install_deps
    build
    mpiexec -n "${EXAMOE_RANKS:-2}" ./build/apps/examoe train
    ;;
  test)
    install_deps
    build
    ctest --preset default
    ;;
  sanitize)
    install_deps
    cmake --preset asan
    cmake --build --preset asan
    ctest --preset asan
    ;;
  *)
    echo "usage: $0 run|test|sanitize|deps" >&2
    exit 2
    ;;
esac
