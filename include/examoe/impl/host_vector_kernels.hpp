// The float element-wise kernels of the expert activations on host backends: plain loops over
// one row, run with the widest vector unit the CPU has (src/layer/host_vector_kernels.cpp);
// and a cache warm-up for the experts' weights.
#pragma once
#include <cstddef>

namespace examoe::impl::host {

/// Over n elements: a = gelu(s), and s becomes gelu'(s) (as GeluForward).
void gelu_forward(float* s, float* a, std::size_t n);
/// da *= grad (as GeluBackward: grad is gelu'(s) as gelu_forward stored it).
void gelu_backward(const float* grad, float* da, std::size_t n);
/// a = silu(g) u (as SwigluForward).
void swiglu_forward(const float* g, const float* u, float* a, std::size_t n);
/// du = da silu(g), and da becomes da u silu'(g) (as SwigluBackward).
void swiglu_backward(const float* g, const float* u, float* da, float* du, std::size_t n);

/// The router's row loops (float and double; row_max reads the row in vector lanes, so it
/// keeps no order: max is the same value in any order, up to the sign of a zero maximum,
/// which no result depends on):
/// max(lowest, row[0..n)), NaN ignored (as the Max reduction joins: x > m ? x : m);
float row_max(const float* row, int n);
double row_max(const double* row, int n);
/// u[e] = exp_fast(u[e] - m) for m >= every u[e] but NaN, the row's max (float; the softmax's
/// exponentials: exp_nonpositive_or_nan);
void exp_shifted(float* u, float m, int n);
/// the lowest e in [begin, end) with row[e] > x, or end (NaN is never greater).
int first_greater(const float* row, int begin, int end, float x);
int first_greater(const double* row, int begin, int end, double x);

/// The router backward's row of dL/dz (softmax scores; softmax_dz in router_kernels.hpp):
/// dz[e] = S(du_e * invtemp) with du_e = p[e] (S(aux[e]) - dot) + zt p[e] in S, the product by
/// invtemp in double (none at temperature 1, where it is exact).
void softmax_dz_row(const float* p, const double* aux, float dot, float zt, double invtemp, float* dz, int E);
void softmax_dz_row(const double* p, const double* aux, double dot, double zt, double invtemp, double* dz, int E);

/// The index of the first element of v[0..n) that is NaN or infinite (exponent bits all ones),
/// or n (the layer's finite check of its inputs: a vectorized scan, block by block, that looks
/// for the element only in a block that has one).
std::size_t first_nonfinite(const float* v, std::size_t n);
std::size_t first_nonfinite(const double* v, std::size_t n);

/// Reads `bytes` bytes from p front to back, one load per 64-byte line, and discards them: the
/// memory then comes into the cache as one stream (the experts' weights, before GEMMs that
/// would otherwise fetch them line by line while packing them).
void stream_into_cache(const void* p, std::size_t bytes);

/// Eight sums in order at once (sums_in_order.hpp), bit for bit: out[j] = term(j, 0) + ... +
/// term(j, n - 1), added in that order from 0, with term(j, c) = a[j][c] (b and w null),
/// a[j][c] * b[j][c] (b given) or a[j][c] * float(w[c]) (w given). With AVX2, blocks of 8 x 8
/// terms are transposed so that one vector add carries the eight sums a step further.
void sums_in_order_8(const float* const* a, const float* const* b, const double* w, int n, float* out);

/// dst[c] = g src[c] for c in [0, n) (a row of the dispatch, scaled by its gate in backward).
void scale_row(float* dst, const float* src, float g, int n);
void scale_row(double* dst, const double* src, double g, int n);

/// One token's combine (as combine_rows): out[c] = (accumulate ? out[c] : 0) + w[0] rows[0][c] +
/// ... + w[k-1] rows[k-1][c], added in that order j = 0..k-1, each a rounded product and sum;
/// rows[j] null adds nothing (a dropped assignment), w null weighs every row 1 (no product).
void combine_row(float* out, const float* const* rows, const float* w, int k, int d, bool accumulate);
void combine_row(double* out, const double* const* rows, const double* w, int k, int d, bool accumulate);

/// Asks for the `bytes` bytes at p to come into the cache, one prefetch instruction per 64-byte
/// line, without waiting for them: a host loop over scattered rows asks for the rows it will
/// read a few iterations ahead.
inline void prefetch(const void* p, std::size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const auto* c = static_cast<const char*>(p);
  for (std::size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}
/// How many iterations ahead the host row loops prefetch their rows.
inline constexpr int kRowsAhead = 4;

/// The instruction set these loops run with on this CPU: "avx512f", "avx2" (with FMA: x86-64-v3)
/// or "baseline".
const char* vector_isa();

}  // namespace examoe::impl::host
