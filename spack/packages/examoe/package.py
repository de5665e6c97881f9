# Spack recipe for ExaMoE (expert-parallel Mixture-of-Experts on Kokkos + MPI).
# Usage: spack repo add ./spack && spack install examoe
from spack.package import *


class Examoe(CMakePackage, CudaPackage):
    """Expert-parallel Mixture-of-Experts layers and training for MPI codes, on Kokkos."""

    homepage = "https://example.invalid/examoe"
    git = "https://example.invalid/examoe.git"

    maintainers("examoe-team")
    license("BSD-3-Clause")

    version("main", branch="main")

    variant("hdf5", default=True, description="Parallel HDF5 checkpoints")
    variant("nccl", default=False, description="NCCL collectives on GPUs (needs +cuda)")

    depends_on("cmake@3.22:", type="build")
    depends_on("mpi")
    depends_on("kokkos@4.7.01:")
    depends_on("kokkos-kernels@4.7.01:")
    depends_on("hdf5+mpi", when="+hdf5")
    depends_on("googletest", type="test")
    depends_on("cli11", type="build")

    depends_on("kokkos+cuda+wrapper", when="+cuda")
    depends_on("kokkos-kernels+cuda+cublas", when="+cuda")
    for arch in CudaPackage.cuda_arch_values:
        depends_on(f"kokkos cuda_arch={arch}", when=f"+cuda cuda_arch={arch}")
        depends_on(f"kokkos-kernels cuda_arch={arch}", when=f"+cuda cuda_arch={arch}")
        depends_on(f"nccl cuda_arch={arch}", when=f"+nccl +cuda cuda_arch={arch}")
    depends_on("nccl", when="+nccl")
    conflicts("+nccl", when="~cuda", msg="NCCL needs the CUDA backend")

    def cmake_args(self):
        args = [
            self.define_from_variant("ExaMoE_ENABLE_HDF5", "hdf5"),
            self.define_from_variant("ExaMoE_ENABLE_NCCL", "nccl"),
            self.define("ExaMoE_ENABLE_TESTS", self.run_tests),
        ]
        if self.spec.satisfies("+cuda"):
            args.append(self.define("CMAKE_CXX_COMPILER", self.spec["kokkos"].kokkos_cxx))
        return args
