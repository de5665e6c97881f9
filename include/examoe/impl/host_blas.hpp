// Which kernels the host BLAS runs. Kokkos Kernels hands float and double GEMMs of host
// backends to the BLAS it was built with (OpenBLAS here); OpenBLAS picks its kernels for the CPU
// when it loads, and one older than the CPU does not know it and falls back to its SSE3
// ("Prescott") kernels: GEMMs 3-5x slower than the CPU's vectors allow, with nothing reported.
// The apps warn about that (examoe.cpp); docs/performance.md, "The host BLAS".
#pragma once
#include <string>

namespace examoe::impl::host {

/// OpenBLAS's name for the kernels it runs on this CPU ("SkylakeX", "Haswell", "Prescott", ...;
/// OPENBLAS_CORETYPE chooses them), or "" where the BLAS in this process is not OpenBLAS.
std::string blas_core();

/// OpenBLAS's build line ("OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY ..."), or "".
std::string blas_config();

/// The warning for kernels narrower than the CPU's vectors: `core` (blas_core()) is one of
/// OpenBLAS's kernels without AVX2 while `isa` (vector_isa(): "avx512f", "avx2", "baseline")
/// has AVX2 or AVX-512. Names the OPENBLAS_CORETYPE that fits (SkylakeX, Haswell) and `config`
/// (blas_config()) if given; "" when there is nothing to warn about (also for core "").
std::string blas_core_warning(const std::string& core, const std::string& isa, const std::string& config);

}  // namespace examoe::impl::host
