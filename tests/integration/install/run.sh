#!/usr/bin/env bash
# Installs ExaMoE from a build tree into a temporary prefix, MOVES the prefix (the package
# must be relocatable), then builds and runs, against the moved prefix only:
#   1. examples/consumer        (CMake, find_package(ExaMoE))
#   2. examples/host-mpi-code   (CMake, find_package(ExaMoE), 4 ranks)
#   3. examples/makefile        (Makefile + pkg-config)
# and checks the installed `examoe` and `examoe-plot` commands.
# usage: run.sh <build dir> <source dir> [mpiexec]
set -euo pipefail
build=$1 src=$2 mpiexec=${3:-mpiexec}
tmp=$(mktemp -d /tmp/examoe-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
step() { echo "== $*"; }

# Kokkos location of the build, passed on to the consumers.
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt" | head -1; }
kokkos_dir=$(cache Kokkos_DIR)
kk_dir=$(cache KokkosKernels_DIR)
gen_args=(-DCMAKE_BUILD_TYPE=Release)
[ -n "$kokkos_dir" ] && gen_args+=(-DKokkos_DIR="$kokkos_dir")
[ -n "$kk_dir" ] && gen_args+=(-DKokkosKernels_DIR="$kk_dir")

step "install into $tmp/prefix, then move it to $tmp/moved"
cmake --install "$build" --prefix "$tmp/prefix" > "$tmp/install.log"
mv "$tmp/prefix" "$tmp/moved"
prefix=$tmp/moved
test -f "$prefix/lib/cmake/ExaMoE/ExaMoEConfig.cmake"
test -f "$prefix/include/examoe/examoe.hpp"
test -f "$prefix/include/examoe/config.hpp"
if grep -rq "$tmp/prefix" "$prefix/lib/cmake/ExaMoE" "$prefix/lib/pkgconfig" 2>/dev/null; then
  echo "the installed package hard-codes its install prefix"; exit 1
fi
"$prefix/bin/examoe" --version
"$prefix/bin/examoe-plot" --version   # the plotting script, installed beside it

step "find_package consumer"
cmake -S "$src/examples/consumer" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$prefix" "${gen_args[@]}" > "$tmp/c.log" || { cat "$tmp/c.log"; exit 1; }
cmake --build "$tmp/consumer" -j2 > "$tmp/cb.log" || { cat "$tmp/cb.log"; exit 1; }
"$mpiexec" -n 2 "$tmp/consumer/consumer"

step "host MPI code against the installed package"
cmake -S "$src/examples/host-mpi-code" -B "$tmp/host" -DCMAKE_PREFIX_PATH="$prefix" "${gen_args[@]}" > "$tmp/h.log" || { cat "$tmp/h.log"; exit 1; }
cmake --build "$tmp/host" -j2 > "$tmp/hb.log" || { cat "$tmp/hb.log"; exit 1; }
"$mpiexec" -n 4 "$tmp/host/host_mpi_code"

step "Makefile + pkg-config consumer"
cp -r "$src/examples/makefile" "$src/examples/minimal" "$tmp/"
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" make -C "$tmp/makefile" -s
"$mpiexec" -n 2 "$tmp/makefile/minimal"
echo "install.consumers: all consumers built and ran against the relocated install"
