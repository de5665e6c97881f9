// The float element-wise kernels of the expert activations on host backends: plain loops over
// one row, run with the widest vector unit the CPU has (src/layer/host_vector_kernels.cpp).
#pragma once
#include <cstddef>

namespace examoe::impl::host {

/// Over n elements: a = gelu(s), and s becomes gelu'(s) (as GeluForward).
void gelu_forward(float* s, float* a, std::size_t n);
/// a = silu(g) u (as SwigluForward).
void swiglu_forward(const float* g, const float* u, float* a, std::size_t n);
/// du = da silu(g), and da becomes da u silu'(g) (as SwigluBackward).
void swiglu_backward(const float* g, const float* u, float* da, float* du, std::size_t n);

/// The instruction set these loops run with on this CPU: "avx512f", "avx2" or "baseline".
const char* vector_isa();

}  // namespace examoe::impl::host
