// The float activation loops of the host backends (include/examoe/impl/host_vector_kernels.hpp).
//
// The library is built for the compiler's baseline instruction set (SSE2 on x86-64: 4 floats per
// instruction). On x86-64 these loops are also built for AVX2 and AVX-512 (GCC/Clang
// target_clones), and the dynamic loader picks the widest the CPU has, once. Every element is
// computed by the same functions as the Kokkos functors (gelu_element, swiglu_element,
// swiglu_backward_element), as the same IEEE operations: this file is compiled without FMA
// contraction (-ffp-contract=off, src/CMakeLists.txt), so the results are bitwise the same at
// every width and as the device kernels' (test_kernels: HostVectorKernels.*).
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/host_vector_kernels.hpp>

#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__) && !defined(__NVCOMPILER)
#define EXAMOE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EXAMOE_VECTOR_CLONES
#endif

namespace examoe::impl::host {

EXAMOE_VECTOR_CLONES void gelu_forward(float* __restrict s, float* __restrict a, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) gelu_element(s[c], a[c], s[c]);
}

EXAMOE_VECTOR_CLONES void swiglu_forward(const float* __restrict g, const float* __restrict u,
                                         float* __restrict a, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) a[c] = swiglu_element(g[c], u[c]);
}

EXAMOE_VECTOR_CLONES void swiglu_backward(const float* __restrict g, const float* __restrict u,
                                          float* __restrict da, float* __restrict du, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) swiglu_backward_element(g[c], u[c], da[c], du[c]);
}

const char* vector_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(__NVCOMPILER)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "baseline";
}

}  // namespace examoe::impl::host
