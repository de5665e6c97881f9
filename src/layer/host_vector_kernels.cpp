// The float activation loops of the host backends (include/examoe/impl/host_vector_kernels.hpp).
//
// The library is built for the compiler's baseline instruction set (SSE2 on x86-64: 4 floats per
// instruction). On x86-64 these loops are also built for AVX2 and AVX-512 (GCC/Clang
// target_clones), and the dynamic loader picks the widest the CPU has. Every element is
// computed by the same functions as the Kokkos functors (gelu_element, swiglu_element,
// swiglu_backward_element), as the same IEEE operations: this file is compiled without FMA
// contraction (-ffp-contract=off, src/CMakeLists.txt), so the results are bitwise the same at
// every width and as the Kokkos functors' on the same host (test_kernels: HostVectorKernels.*).
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/host_vector_kernels.hpp>

// On x86-64 ELF builds with GCC or Clang (not nvcc): each loop is built for AVX-512, AVX2 and
// the baseline, and the dynamic loader picks the widest the CPU has, once. The multiversioned
// loops stay inside this file, behind plain functions: across files, GCC's clones are local
// and Clang 14 ignores the attribute on a definition whose declaration lacks it.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__) && !defined(__NVCOMPILER)
#define EXAMOE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EXAMOE_VECTOR_CLONES
#endif

namespace examoe::impl::host {
namespace {

EXAMOE_VECTOR_CLONES void gelu_loop(float* __restrict s, float* __restrict a, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) gelu_element(s[c], a[c], s[c]);
}

EXAMOE_VECTOR_CLONES void swiglu_loop(const float* __restrict g, const float* __restrict u, float* __restrict a,
                                      std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) a[c] = swiglu_element(g[c], u[c]);
}

EXAMOE_VECTOR_CLONES void swiglu_backward_loop(const float* __restrict g, const float* __restrict u,
                                               float* __restrict da, float* __restrict du, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) swiglu_backward_element(g[c], u[c], da[c], du[c]);
}

}  // namespace

void gelu_forward(float* s, float* a, std::size_t n) { gelu_loop(s, a, n); }
void swiglu_forward(const float* g, const float* u, float* a, std::size_t n) { swiglu_loop(g, u, a, n); }
void swiglu_backward(const float* g, const float* u, float* da, float* du, std::size_t n) {
  swiglu_backward_loop(g, u, da, du, n);
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
