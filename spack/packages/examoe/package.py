# Spack recipe for ExaMoE: expert-parallel Mixture-of-Experts layers and training for MPI
# codes, on Kokkos + Kokkos Kernels (+ optional parallel HDF5, optional NCCL on CUDA).
#
#   spack repo add ./spack
#   spack install examoe                      # CPU (Kokkos Serial; ^kokkos+openmp for threads)
#   spack install examoe +cuda cuda_arch=90   # Hopper: Kokkos gets Kokkos_ARCH_HOPPER90
#
# Needs Spack >= 1.1 with its builtin packages of release v2025.11 or newer (Spack 1.1's
# default): the first builtin packages with Kokkos 4.7 (4.7.01) and CUDA 13. Spack 1.0's
# builtin packages (v2025.07) stop at Kokkos 4.6.01 and CUDA 12.9, so nothing concretizes
# there. This is a Package API v1 repository (spack/repo.yaml, packages/<name>/), which Spack
# 1.x still loads; `kokkos_cxx` is a property of the kokkos *package* (Spack >= 1.0).
#
# The source is a git repository, by default the one this recipe is part of: `spack repo add
# ./spack` in a clone builds that clone's `main` branch (Spack resolves the branch to its
# commit and records it as the spec's `commit=`). A site that keeps ExaMoE on its own git
# server or mirror points the recipe there in packages.yaml (no edit of this file):
#   packages:
#     examoe:
#       package_attributes:
#         git: https://git.example.org/hpc/examoe.git
# To build a working tree as it is, edits included: `spack develop --path <checkout>
# examoe@main` in a Spack environment, then `spack install`.
#
# tests/integration/spack/check_recipe.py (ctest -L spack, no Spack needed) checks this file
# against the project's CMakeLists.txt; run it after every change here.
import os

from spack.package import *

# The ExaMoE checkout that holds this file (spack/packages/examoe/package.py).
_CHECKOUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


class Examoe(CMakePackage, CudaPackage):
    """Expert-parallel Mixture-of-Experts layers and training for MPI codes, on Kokkos."""

    # FIXME: a placeholder until ExaMoE has a public home (.invalid never resolves, RFC 2606);
    # Spack only shows it (`spack info`).
    homepage = "https://examoe.invalid/"
    # The checkout this recipe came with; sites override it (packages.yaml, see above).
    git = "file://" + _CHECKOUT
    # FIXME: add maintainers("<github-handle>", ...) and license("<SPDX id>") once the project
    # has chosen them (there is no LICENSE file in the repository yet).

    version("main", branch="main")

    # ---- variants ---------------------------------------------------------------------------
    # `cuda` comes from CudaPackage. Kokkos builds for exactly one GPU architecture, so
    # `cuda_arch` is single-valued here (as in the kokkos recipe itself) instead of
    # CudaPackage's multi-valued one; it is passed on to kokkos, kokkos-kernels and nccl.
    variant(
        "cuda_arch",
        description="CUDA architecture (exactly one; passed on to Kokkos)",
        values=("none",) + CudaPackage.cuda_arch_values,
        default="none",
        multi=False,
        sticky=True,
        when="+cuda",
    )
    variant("hdf5", default=True, description="Checkpoints in parallel HDF5 (ExaMoE_ENABLE_HDF5)")
    variant("nccl", default=False, description="NCCL GPU collectives (ExaMoE_ENABLE_NCCL), +cuda")

    # ---- dependencies -----------------------------------------------------------------------
    depends_on("c", type="build")  # project(ExaMoE LANGUAGES C CXX)
    depends_on("cxx", type="build")
    depends_on("cmake@3.22:", type="build")  # cmake_minimum_required(VERSION 3.22)

    depends_on("mpi")

    # Kokkos versions. Kokkos Kernels always gets the same ranges as Kokkos (the kokkos-kernels
    # recipe pins kokkos@=its own version).
    # * ExaMoE supports Debian's Kokkos 3.4 (plain CMake build only) and upstream Kokkos >= 4.7
    #   (README, include/examoe/impl/kokkos_compat.hpp); no 4.0-4.6 release was ever built, so
    #   CPU builds take any 4.7.x (older site externals fail at concretization, not mid-build).
    # * GPU builds need Kokkos >= 4.7.01, the first release that supports CUDA 13 (the kokkos
    #   recipe conflicts with ^cuda@13: for @:4.7.00); one range for every CUDA version.
    # * Kokkos 5 (C++20, drops the deprecated 4.x API) has not been tried with ExaMoE yet:
    #   lift the @:4 caps once it has.
    depends_on("kokkos@4.7:4")
    depends_on("kokkos-kernels@4.7:4")
    with when("+cuda"):
        depends_on("kokkos@4.7.01:")
        depends_on("kokkos-kernels@4.7.01:")
        # nvcc_wrapper is Kokkos' CUDA compiler for GCC-hosted builds; cmake_args() passes it
        # on as CMAKE_CXX_COMPILER (kokkos_cxx). ExaMoE does not enable CMake's CUDA language,
        # so kokkos+cmake_lang cannot be used.
        depends_on("kokkos+cuda+wrapper")
        depends_on("kokkos-kernels+cuda+cublas")
        # ExaMoE's kernels are KOKKOS_LAMBDAs (device lambdas). Kokkos 5 always enables them and
        # has no cuda_lambda variant, hence the condition.
        requires("^kokkos+cuda_lambda", when="^kokkos@:4", msg="ExaMoE needs CUDA device lambdas")
    for _arch in CudaPackage.cuda_arch_values:
        depends_on(f"kokkos+cuda cuda_arch={_arch}", when=f"+cuda cuda_arch={_arch}")
        depends_on(f"kokkos-kernels+cuda cuda_arch={_arch}", when=f"+cuda cuda_arch={_arch}")
        depends_on(f"nccl+cuda cuda_arch={_arch}", when=f"+nccl +cuda cuda_arch={_arch}")

    # Only with +cuda: +nccl ~cuda is refused by the conflict below, with the recipe's message
    # (declared for +nccl alone, nccl's own "Must specify CUDA compute capabilities" came first).
    depends_on("nccl+cuda", when="+nccl +cuda")
    depends_on("hdf5+mpi", when="+hdf5")

    # Header-only. CLI11 is used by the examoe command only (apps/CMakeLists.txt). nlohmann_json
    # is used by the library and the installed ExaMoEConfig.cmake calls
    # find_dependency(nlohmann_json 3), so it must stay visible to ExaMoE's dependents: "link".
    depends_on("cli11@2:", type="build")
    depends_on("nlohmann-json@3:", type=("build", "link"))

    depends_on("googletest", type="test")

    # ---- impossible combinations ------------------------------------------------------------
    conflicts("+nccl", when="~cuda", msg="NCCL collectives need the CUDA backend: use +cuda +nccl")
    conflicts(
        "cuda_arch=none",
        when="+cuda",
        msg="Kokkos needs the GPU architecture: give one, e.g. cuda_arch=90 for Hopper",
    )
    # (+cuda with kokkos~cuda cannot happen: +cuda depends on kokkos+cuda above.)
    conflicts(
        "^kokkos+cuda",
        when="~cuda",
        msg="this Kokkos has the CUDA backend: build examoe +cuda cuda_arch=<arch> against it",
    )
    conflicts("^kokkos+rocm", msg="ExaMoE has no HIP/ROCm build path yet")
    conflicts("^kokkos+sycl", msg="ExaMoE has no SYCL build path yet")

    # What `spack install` must have produced (see cmake/ExaMoEInstall.cmake).
    sanity_check_is_file = [
        join_path("bin", "examoe"),
        join_path("include", "examoe", "examoe.hpp"),
        join_path("include", "examoe", "config.hpp"),
    ]

    def cmake_args(self):
        spec = self.spec
        args = [
            # The examoe command is installed (and smoke-tested by test_version).
            self.define("ExaMoE_ENABLE_APPS", True),
            # The examples are not installed; do not spend build time on them.
            self.define("ExaMoE_ENABLE_EXAMPLES", False),
            # GoogleTest suite + ctest, run by CMakePackage's `check` phase under
            # `spack install --test=root`.
            self.define("ExaMoE_ENABLE_TESTS", self.run_tests),
            self.define_from_variant("ExaMoE_ENABLE_HDF5", "hdf5"),
            self.define_from_variant("ExaMoE_ENABLE_NCCL", "nccl"),
            # +nccl must give the NCCL backend: fail the build rather than drop it silently.
            self.define_from_variant("ExaMoE_REQUIRE_NCCL", "nccl"),
            # libFuzzer targets: a developer build (clang, sanitizers), never installed.
            self.define("ExaMoE_ENABLE_FUZZ", False),
            # Never pick up another Kokkos / MPI (e.g. Debian's Kokkos 3.4 in /usr).
            self.define("Kokkos_ROOT", spec["kokkos"].prefix),
            self.define("KokkosKernels_ROOT", spec["kokkos-kernels"].prefix),
            self.define("MPI_CXX_COMPILER", spec["mpi"].mpicxx),
        ]
        if spec.satisfies("+cuda"):
            # The compiler Kokkos was built with (nvcc_wrapper): kokkos_cxx, defined on the
            # kokkos package.
            args.append(self.define("CMAKE_CXX_COMPILER", self["kokkos"].kokkos_cxx))
        return args

    def test_version(self):
        """examoe --version runs and names itself"""
        exe = which(self.prefix.bin.examoe, required=True)
        out = exe("--version", output=str.split, error=str.split)
        # stdout then stderr: look for the version line among anything MPI/Kokkos print
        assert any(line.startswith("examoe ") for line in out.splitlines()), (
            f"unexpected `examoe --version` output: {out!r}"
        )
