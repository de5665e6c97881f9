#!/usr/bin/env bash
# Prepares what tests/device/h200-check.sh needs on a bare GPU machine (CUDA 13 and CMake
# there; no MPI, no Kokkos): everything goes into .device/ in the repository root (ignored by
# git), which the device call carries.
#   KOKKOS_CUDA_PREFIX=/path/to/kokkos+kokkos-kernels install ./tests/device/prepare-carry.sh
# The Kokkos prefix is an install of upstream Kokkos >= 4.7.01 with Kokkos_ENABLE_CUDA=ON,
# Kokkos_ARCH_HOPPER90=ON and Kokkos Kernels (BLAS, cuBLAS), built with nvcc_wrapper.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${KOKKOS_CUDA_PREFIX:?set KOKKOS_CUDA_PREFIX to a CUDA-enabled Kokkos + Kokkos Kernels install}"
# .device/ is in .gitignore.
rm -rf .device && mkdir -p .device/debs
cp -a "$KOKKOS_CUDA_PREFIX" .device/kokkos
# MPICH (library, headers, mpicxx, hydra) and the libraries it needs, GoogleTest, OpenBLAS
# (Kokkos Kernels' host BLAS), CLI11 and nlohmann-json headers, as Debian 12 packages.
(cd .device/debs && apt-get download \
   mpich libmpich12 libmpich-dev libhwloc15 libhwloc-dev libucx0 libucx-dev libnuma1 libslurm38 \
   libgfortran5 libgtest-dev libopenblas0-pthread libopenblas0 libopenblas-dev libopenblas-pthread-dev \
   libcli11-dev nlohmann-json3-dev >/dev/null)
du -sh .device
