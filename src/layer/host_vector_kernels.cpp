// The float activation loops of the host backends (include/examoe/impl/host_vector_kernels.hpp).
//
// The library is built for the compiler's baseline instruction set (SSE2 on x86-64: 4 floats per
// instruction). On x86-64 these loops are also built for AVX-512 and for x86-64-v3 (AVX2 with
// FMA) (GCC/Clang target_clones), and the dynamic loader picks the widest the CPU has. Every
// element is computed by the same functions as the Kokkos functors (gelu_element,
// swiglu_element, swiglu_backward_element), as the same IEEE operations: their fused
// multiply-adds are explicit (kc::fma: vfmadd in the AVX builds, libm's fmaf in the baseline
// build, slow but exact), and nothing else is contracted (-ffp-contract=off,
// src/CMakeLists.txt), so the results are bitwise the same at every width and as the Kokkos
// functors' on the same host (test_kernels: HostVectorKernels.*).
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/host_vector_kernels.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// On x86-64 ELF builds with GCC or Clang (not nvcc): each loop is built for AVX-512, x86-64-v3
// and the baseline, and the dynamic loader picks the widest the CPU has, once. (An arch= clone
// is chosen by the CPU's features only for the x86-64-v levels; "arch=haswell" would be for
// Intel's Haswell cores and nothing else. What these clones inline must be force-inlined:
// GCC inlines nothing else into a function built for another arch.) The multiversioned
// loops stay inside this file, behind plain functions: across files, GCC's clones are local
// and Clang 14 ignores the attribute on a definition whose declaration lacks it.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__) && !defined(__NVCOMPILER)
#define EXAMOE_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#define EXAMOE_X86_INTRINSICS 1
#include <immintrin.h>
#else
#define EXAMOE_VECTOR_CLONES
#endif

namespace examoe::impl::host {
namespace {

EXAMOE_VECTOR_CLONES void gelu_loop(float* __restrict s, float* __restrict a, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) gelu_element(s[c], a[c], s[c]);
}

EXAMOE_VECTOR_CLONES void gelu_backward_loop(const float* __restrict grad, float* __restrict da, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) da[c] *= grad[c];
}

EXAMOE_VECTOR_CLONES void swiglu_loop(const float* __restrict g, const float* __restrict u, float* __restrict a,
                                      std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) a[c] = swiglu_element(g[c], u[c]);
}

EXAMOE_VECTOR_CLONES void swiglu_backward_loop(const float* __restrict g, const float* __restrict u,
                                               float* __restrict da, float* __restrict du, std::size_t n) {
  for (std::size_t c = 0; c < n; ++c) swiglu_backward_element(g[c], u[c], da[c], du[c]);
}

EXAMOE_VECTOR_CLONES void exp_shifted_loop(float* __restrict u, float m, int n) {
  for (int e = 0; e < n; ++e) u[e] = exp_nonpositive_or_nan(u[e] - m);  // m >= u[e]: exp_fast's value
}

// The router's loops for float and double: one body each, inlined into a multiversioned
// function per type (Clang does not multiversion templates).
#if defined(__GNUC__) || defined(__clang__)
#define EXAMOE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EXAMOE_ALWAYS_INLINE inline
#endif

template <class S>
EXAMOE_ALWAYS_INLINE S row_max_body(const S* __restrict row, int n) {
  constexpr int L = 64 / sizeof(S);  // lanes of one 64-byte vector; each keeps its own max
  S lane[L];
  for (int j = 0; j < L; ++j) lane[j] = std::numeric_limits<S>::lowest();
  int e = 0;
  for (; e + L <= n; e += L)
    for (int j = 0; j < L; ++j) lane[j] = row[e + j] > lane[j] ? row[e + j] : lane[j];
  S m = std::numeric_limits<S>::lowest();
  for (int j = 0; j < L; ++j) m = lane[j] > m ? lane[j] : m;
  for (; e < n; ++e) m = row[e] > m ? row[e] : m;
  return m;
}

template <class S>
EXAMOE_ALWAYS_INLINE int first_greater_body(const S* __restrict row, int begin, int end, S x) {
  constexpr int L = 64 / sizeof(S);
  int e = begin;
  for (; e + L <= end; e += L) {  // a block of L compared at once; scanned only on a hit
    int hit = 0;
    for (int j = 0; j < L; ++j) hit |= row[e + j] > x;
    if (hit) break;
  }
  for (; e < end; ++e)
    if (row[e] > x) return e;
  return end;
}

template <class S>
EXAMOE_ALWAYS_INLINE std::size_t first_nonfinite_body(const S* __restrict v, std::size_t n) {
  using U = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
  constexpr U exponent = sizeof(S) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  constexpr std::size_t block = 256;
  const auto nonfinite = [&](std::size_t i) {
    U u;
    std::memcpy(&u, v + i, sizeof(u));
    return (u & exponent) == exponent;
  };
  for (std::size_t b = 0; b < n; b += block) {
    const std::size_t e = n - b > block ? b + block : n;
    int any = 0;
    for (std::size_t i = b; i < e; ++i) any |= nonfinite(i);
    if (any)
      for (std::size_t i = b; i < e; ++i)
        if (nonfinite(i)) return i;
  }
  return n;
}

/// combine_row's body. The first row (without accumulate) is added to a zero, as the team
/// kernel does (0 + w v, which turns a product of -0 into +0); two rows, the common top-2,
/// in one pass over out.
template <class S>
EXAMOE_ALWAYS_INLINE void combine_row_body(S* __restrict out, const S* const* rows, const S* w, int k, int d,
                                           bool accumulate) {
  int j = 0;
  if (!accumulate && k >= 2 && rows[0] != nullptr && rows[1] != nullptr) {
    const S* __restrict r0 = rows[0];
    const S* __restrict r1 = rows[1];
    if (w != nullptr) {
      const S w0 = w[0], w1 = w[1];
      for (int c = 0; c < d; ++c) out[c] = (S(0) + w0 * r0[c]) + w1 * r1[c];
    } else {
      for (int c = 0; c < d; ++c) out[c] = (S(0) + r0[c]) + r1[c];
    }
    j = 2;
    accumulate = true;
  }
  for (; j < k; ++j) {
    const S* __restrict r = rows[j];
    const bool fresh = j == 0 && !accumulate;
    if (r == nullptr) {
      if (fresh)
        for (int c = 0; c < d; ++c) out[c] = S(0);
    } else if (w != nullptr) {
      const S wj = w[j];
      if (fresh)
        for (int c = 0; c < d; ++c) out[c] = S(0) + wj * r[c];
      else
        for (int c = 0; c < d; ++c) out[c] = out[c] + wj * r[c];
    } else {
      if (fresh)
        for (int c = 0; c < d; ++c) out[c] = S(0) + r[c];
      else
        for (int c = 0; c < d; ++c) out[c] = out[c] + r[c];
    }
  }
}

template <class S>
EXAMOE_ALWAYS_INLINE void softmax_dz_row_body(const S* __restrict p, const double* __restrict aux, S dot, S zt,
                                              double invtemp, S* __restrict dz, int E) {
  if (invtemp == 1.0) {
    for (int e = 0; e < E; ++e) dz[e] = p[e] * (static_cast<S>(aux[e]) - dot) + zt * p[e];
  } else {
    for (int e = 0; e < E; ++e) {
      const S du = p[e] * (static_cast<S>(aux[e]) - dot) + zt * p[e];
      dz[e] = static_cast<S>(du * invtemp);
    }
  }
}
EXAMOE_VECTOR_CLONES void softmax_dz_row_f(const float* p, const double* aux, float dot, float zt, double invtemp,
                                           float* dz, int E) {
  softmax_dz_row_body(p, aux, dot, zt, invtemp, dz, E);
}
EXAMOE_VECTOR_CLONES void softmax_dz_row_d(const double* p, const double* aux, double dot, double zt, double invtemp,
                                           double* dz, int E) {
  softmax_dz_row_body(p, aux, dot, zt, invtemp, dz, E);
}

template <class S>
EXAMOE_ALWAYS_INLINE void scale_row_body(S* __restrict dst, const S* __restrict src, S g, int n) {
  for (int c = 0; c < n; ++c) dst[c] = g * src[c];
}
EXAMOE_VECTOR_CLONES void scale_row_f(float* dst, const float* src, float g, int n) { scale_row_body(dst, src, g, n); }
EXAMOE_VECTOR_CLONES void scale_row_d(double* dst, const double* src, double g, int n) {
  scale_row_body(dst, src, g, n);
}

EXAMOE_VECTOR_CLONES void combine_row_f(float* out, const float* const* rows, const float* w, int k, int d,
                                        bool accumulate) {
  combine_row_body(out, rows, w, k, d, accumulate);
}
EXAMOE_VECTOR_CLONES void combine_row_d(double* out, const double* const* rows, const double* w, int k, int d,
                                        bool accumulate) {
  combine_row_body(out, rows, w, k, d, accumulate);
}

EXAMOE_VECTOR_CLONES std::size_t first_nonfinite_f(const float* v, std::size_t n) { return first_nonfinite_body(v, n); }
EXAMOE_VECTOR_CLONES std::size_t first_nonfinite_d(const double* v, std::size_t n) { return first_nonfinite_body(v, n); }

EXAMOE_VECTOR_CLONES float row_max_f(const float* row, int n) { return row_max_body(row, n); }
EXAMOE_VECTOR_CLONES double row_max_d(const double* row, int n) { return row_max_body(row, n); }
EXAMOE_VECTOR_CLONES int first_greater_f(const float* row, int begin, int end, float x) {
  return first_greater_body(row, begin, end, x);
}
EXAMOE_VECTOR_CLONES int first_greater_d(const double* row, int begin, int end, double x) {
  return first_greater_body(row, begin, end, x);
}

#ifdef EXAMOE_X86_INTRINSICS
// The search with AVX-512 compares written out: GCC 12 keeps first_greater_body's blocks scalar
// even in its AVX-512 clone (a loop with an early exit), and the router's top-k scans every row
// with it (about 2.3x faster at E = 256). A compare into a mask, ordered and quiet (NaN is never
// greater), and the mask's lowest set bit: the same index as the scalar loop.
__attribute__((target("avx512f"))) int first_greater_avx512(const float* row, int begin, int end, float x) {
  const __m512 xs = _mm512_set1_ps(x);
  int e = begin;
  for (; e + 16 <= end; e += 16) {
    const unsigned m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + e), xs, _CMP_GT_OQ);
    if (m) return e + __builtin_ctz(m);
  }
  if (e < end) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (end - e)) - 1);
    const unsigned m = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, row + e), xs, _CMP_GT_OQ);
    if (m) return e + __builtin_ctz(m);
  }
  return end;
}
__attribute__((target("avx512f"))) int first_greater_avx512(const double* row, int begin, int end, double x) {
  const __m512d xs = _mm512_set1_pd(x);
  int e = begin;
  for (; e + 8 <= end; e += 8) {
    const unsigned m = _mm512_cmp_pd_mask(_mm512_loadu_pd(row + e), xs, _CMP_GT_OQ);
    if (m) return e + __builtin_ctz(m);
  }
  if (e < end) {
    const __mmask8 tail = static_cast<__mmask8>((1u << (end - e)) - 1);
    const unsigned m = _mm512_mask_cmp_pd_mask(tail, _mm512_maskz_loadu_pd(tail, row + e), xs, _CMP_GT_OQ);
    if (m) return e + __builtin_ctz(m);
  }
  return end;
}
// sums_in_order_8 with AVX2: rows j = 0..7 are loaded 8 terms at a time, transposed, and the
// columns added in order into one vector of the eight sums (lane j = sum j).
__attribute__((target("avx2"))) inline __m256 term_row_avx2(const float* a, const float* b, const double* w,
                                                            int c) {
  const __m256 x = _mm256_loadu_ps(a + c);
  if (b != nullptr) return _mm256_mul_ps(x, _mm256_loadu_ps(b + c));
  if (w != nullptr)
    return _mm256_mul_ps(x, _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(w + c + 4)),
                                            _mm256_cvtpd_ps(_mm256_loadu_pd(w + c))));
  return x;
}
__attribute__((target("avx2"))) int sums_in_order_8_avx2(const float* const* a, const float* const* b,
                                                          const double* w, int n, float* acc) {
  __m256 sum = _mm256_setzero_ps();
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = term_row_avx2(a[j], b != nullptr ? b[j] : nullptr, w, c);
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    // column k: lane j = term(j, c + k); added k = 0..7, in order
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s0, s4, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s1, s5, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s2, s6, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s3, s7, 0x20));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s0, s4, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s1, s5, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s2, s6, 0x31));
    sum = _mm256_add_ps(sum, _mm256_permute2f128_ps(s3, s7, 0x31));
  }
  _mm256_storeu_ps(acc, sum);
  return c;  // the terms from c on are left to the caller's scalar loop
}
bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}
#endif

}  // namespace

float row_max(const float* row, int n) { return row_max_f(row, n); }
double row_max(const double* row, int n) { return row_max_d(row, n); }
void exp_shifted(float* u, float m, int n) { exp_shifted_loop(u, m, n); }
int first_greater(const float* row, int begin, int end, float x) {
#ifdef EXAMOE_X86_INTRINSICS
  if (cpu_has_avx512f()) return first_greater_avx512(row, begin, end, x);
#endif
  return first_greater_f(row, begin, end, x);
}
int first_greater(const double* row, int begin, int end, double x) {
#ifdef EXAMOE_X86_INTRINSICS
  if (cpu_has_avx512f()) return first_greater_avx512(row, begin, end, x);
#endif
  return first_greater_d(row, begin, end, x);
}

void sums_in_order_8(const float* const* a, const float* const* b, const double* w, int n, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int c = 0;
#ifdef EXAMOE_X86_INTRINSICS
  if (cpu_has_avx2()) c = sums_in_order_8_avx2(a, b, w, n, acc);
#endif
  for (; c < n; ++c)
    for (int j = 0; j < 8; ++j)
      acc[j] += b != nullptr ? a[j][c] * b[j][c] : w != nullptr ? a[j][c] * static_cast<float>(w[c]) : a[j][c];
  for (int j = 0; j < 8; ++j) out[j] = acc[j];
}

void scale_row(float* dst, const float* src, float g, int n) { scale_row_f(dst, src, g, n); }
void scale_row(double* dst, const double* src, double g, int n) { scale_row_d(dst, src, g, n); }

void combine_row(float* out, const float* const* rows, const float* w, int k, int d, bool accumulate) {
  combine_row_f(out, rows, w, k, d, accumulate);
}
void combine_row(double* out, const double* const* rows, const double* w, int k, int d, bool accumulate) {
  combine_row_d(out, rows, w, k, d, accumulate);
}

void softmax_dz_row(const float* p, const double* aux, float dot, float zt, double invtemp, float* dz, int E) {
  softmax_dz_row_f(p, aux, dot, zt, invtemp, dz, E);
}
void softmax_dz_row(const double* p, const double* aux, double dot, double zt, double invtemp, double* dz, int E) {
  softmax_dz_row_d(p, aux, dot, zt, invtemp, dz, E);
}

std::size_t first_nonfinite(const float* v, std::size_t n) { return first_nonfinite_f(v, n); }
std::size_t first_nonfinite(const double* v, std::size_t n) { return first_nonfinite_d(v, n); }

void gelu_forward(float* s, float* a, std::size_t n) { gelu_loop(s, a, n); }
void gelu_backward(const float* grad, float* da, std::size_t n) { gelu_backward_loop(grad, da, n); }
void swiglu_forward(const float* g, const float* u, float* a, std::size_t n) { swiglu_loop(g, u, a, n); }
void swiglu_backward(const float* g, const float* u, float* da, float* du, std::size_t n) {
  swiglu_backward_loop(g, u, da, du, n);
}

void stream_into_cache(const void* p, std::size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  unsigned char acc = 0;
  for (std::size_t i = 0; i < bytes; i += 64) acc |= c[i];
#if defined(__GNUC__) || defined(__clang__)
  __asm__ volatile("" : : "r"(acc));  // the loads happen; their value is not needed
#else
  static volatile unsigned char sink;
  sink = acc;
#endif
}

const char* vector_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(__NVCOMPILER)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";  // x86-64-v3
#endif
  return "baseline";
}

}  // namespace examoe::impl::host
