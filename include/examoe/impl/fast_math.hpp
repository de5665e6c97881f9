// float exp and erfcx in plain arithmetic, for the element-wise kernels of the experts and the
// router's softmax: the same function on every backend and vector width.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace examoe::impl {

// No library calls, so the element-wise loops vectorize on CPUs (libm's erff + expf cost
// ~14 ns per element here, these ~1 ns) and stay branch-free on GPUs. Their polynomials run as
// fused multiply-adds (kc::fma: one rounding each, the same bits on every CPU width and on a GPU;
// host_vector_kernels.cpp builds its loops for CPUs that have them). Accuracy: a few float ulps
// (checked against double precision in the tests). Double precision keeps the library
// functions. Force-inlined: the host loops are built for several instruction sets, and GCC
// inlines into them only what it must.

namespace detail {
/// 2^n p(r) with r = x - n ln2, for finite x in [-87, 88] and n = round(x / ln2): Cephes'
/// range reduction (ln2 in two parts) and its degree-6 polynomial.
KOKKOS_FORCEINLINE_FUNCTION float exp_reduced(float x, int n) {
  const float fn = static_cast<float>(n);
  float r = kc::fma(fn, -0.693359375f, x);
  r = kc::fma(fn, 2.12194440e-4f, r);
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = kc::fma(p, r, 1.3981999507e-3f);
  p = kc::fma(p, r, 8.3334519073e-3f);
  p = kc::fma(p, r, 4.1665795894e-2f);
  p = kc::fma(p, r, 1.6666665459e-1f);
  p = kc::fma(p, r, 5.0000001201e-1f);
  p = kc::fma(p, r2, r) + 1.0f;
  const std::int32_t bits = static_cast<std::int32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
}  // namespace detail

/// exp(x) for float (saturating at exp(-87) and exp(88); NaN gives NaN).
KOKKOS_FORCEINLINE_FUNCTION float exp_fast(float x_in) {
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
  const float e = detail::exp_reduced(x, static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f)));
  std::uint32_t ue;
  std::memcpy(&ue, &e, sizeof(ue));
  ue = (ue & ~nan) | (u & nan);
  float out;
  std::memcpy(&out, &ue, sizeof(out));
  return out;
}

/// exp(x) for float x <= 0, saturating at exp(-87); NaN gives exp(-87), so a caller whose
/// result depends on x's NaN must also depend on x otherwise (gelu_element does).
KOKKOS_FORCEINLINE_FUNCTION float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float t = x * 1.44269504088896341f;
  return detail::exp_reduced(x, static_cast<int>(t - 0.5f));  // round to nearest: t <= 0
}

/// exp(x) for float x <= 0 or NaN, bitwise exp_fast(x) there (NaN passes through), without
/// exp_fast's work for positive arguments: the softmax's exp(u - max u).
KOKKOS_FORCEINLINE_FUNCTION float exp_nonpositive_or_nan(float x_in) {
  std::uint32_t u;  // NaN as in exp_fast: bit operations around a finite stand-in
  std::memcpy(&u, &x_in, sizeof(u));
  const std::uint32_t nan = 0u - static_cast<std::uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
  const std::uint32_t finite_bits = u & ~nan;
  float x;
  std::memcpy(&x, &finite_bits, sizeof(x));
  std::uint32_t ue;
  const float e = exp_nonpositive(x);
  std::memcpy(&ue, &e, sizeof(ue));
  ue = (ue & ~nan) | (u & nan);
  float out;
  std::memcpy(&out, &ue, sizeof(out));
  return out;
}

/// erfcx(a) = exp(a^2) erfc(a) for float a >= 0 (also +inf: 0): a polynomial of degree 9 in
/// t = 1 / (1 + 0.365 a), a relative minimax fit on [0, 9.4] (3.9e-9 in exact arithmetic; a few
/// float ulps as evaluated). Beyond 9.4, exp(-a^2) is below float's normal range.
KOKKOS_FORCEINLINE_FUNCTION float erfcx_fast(float a) {
  const float t = 1.0f / kc::fma(0.365f, a, 1.0f);
  float r = 0.0699074864f;
  r = kc::fma(r, t, -0.360572845f);
  r = kc::fma(r, t, 0.640059292f);
  r = kc::fma(r, t, -0.472316533f);
  r = kc::fma(r, t, 0.454422593f);
  r = kc::fma(r, t, 0.0359665044f);
  r = kc::fma(r, t, 0.225719377f);
  r = kc::fma(r, t, 0.2003766f);
  r = kc::fma(r, t, 0.206459731f);
  return kc::fma(r, t, -2.22230792e-05f);
}

template <class S>
KOKKOS_FORCEINLINE_FUNCTION S exp_(S x) {
  if constexpr (std::is_same<S, float>::value) return exp_fast(x);
  else return kc::exp(x);
}

template <class S>
KOKKOS_FORCEINLINE_FUNCTION S sigmoid(S s) {
  return S(1) / (S(1) + exp_(-s));
}

}  // namespace examoe::impl
