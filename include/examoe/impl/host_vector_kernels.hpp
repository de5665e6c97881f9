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
/// u[e] = exp_fast(u[e] - m) (float; the softmax's exponentials);
void exp_shifted(float* u, float m, int n);
/// the lowest e in [begin, end) with row[e] > x, or end (NaN is never greater).
int first_greater(const float* row, int begin, int end, float x);
int first_greater(const double* row, int begin, int end, double x);

/// The index of the first element of v[0..n) that is NaN or infinite (exponent bits all ones),
/// or n (the layer's finite check of its inputs: a vectorized scan, block by block, that looks
/// for the element only in a block that has one).
std::size_t first_nonfinite(const float* v, std::size_t n);
std::size_t first_nonfinite(const double* v, std::size_t n);

/// Reads `bytes` bytes from p front to back, one load per 64-byte line, and discards them: the
/// memory then comes into the cache as one stream (the experts' weights, before GEMMs that
/// would otherwise fetch them line by line while packing them).
void stream_into_cache(const void* p, std::size_t bytes);

/// The instruction set these loops run with on this CPU: "avx512f", "avx2" (with FMA: x86-64-v3)
/// or "baseline".
const char* vector_isa();

}  // namespace examoe::impl::host
