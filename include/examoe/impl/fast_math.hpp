// float exp and erf in plain arithmetic, for the element-wise kernels of the experts and the
// router's softmax: the same function on every backend and vector width.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace examoe::impl {

// No library calls, so the element-wise loops vectorize on CPUs (libm's erff + expf cost
// ~14 ns per element here, these ~1 ns) and stay branch-free on GPUs. Accuracy: a few float
// ulps (checked against std::erf/std::exp in the tests). Double precision keeps the library
// functions.

/// exp(x) for float: Cephes range reduction x = n ln2 + r and a degree-6 polynomial.
KOKKOS_INLINE_FUNCTION float exp_fast(float x_in) {
  // NaN passes through (it must reach the non-finite checks); the arithmetic below runs on a
  // finite stand-in (+0), since converting NaN to int is undefined. The NaN test and both
  // selects are bit operations: GCC if-converts them at every vector width (selects on the
  // float compare kept the AVX2 and AVX-512 loops scalar).
  std::uint32_t u;
  std::memcpy(&u, &x_in, sizeof(u));
  const std::uint32_t nan = 0u - static_cast<std::uint32_t>((u & 0x7fffffffu) > 0x7f800000u);  // all ones
  const std::uint32_t finite_bits = u & ~nan;
  float x;
  std::memcpy(&x, &finite_bits, sizeof(x));
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const std::int32_t bits = static_cast<std::int32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = p * scale;
  std::uint32_t ue;
  std::memcpy(&ue, &e, sizeof(ue));
  ue = (ue & ~nan) | (u & nan);
  float out;
  std::memcpy(&out, &ue, sizeof(out));
  return out;
}

/// erf(x) for float: odd/even rational minimax approximation on [-4, 4] (erf is +-1 in
/// float beyond).
KOKKOS_INLINE_FUNCTION float erf_fast(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

template <class S>
KOKKOS_INLINE_FUNCTION S erf_(S x) {
  if constexpr (std::is_same<S, float>::value) return erf_fast(x);
  else return kc::erf(x);
}
template <class S>
KOKKOS_INLINE_FUNCTION S exp_(S x) {
  if constexpr (std::is_same<S, float>::value) return exp_fast(x);
  else return kc::exp(x);
}

template <class S>
KOKKOS_INLINE_FUNCTION S sigmoid(S s) {
  return S(1) / (S(1) + exp_(-s));
}

}  // namespace examoe::impl
