// Element-wise parts of the expert MLPs (the GEMMs go through Kokkos Kernels).
#pragma once
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/row_policy.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace examoe::impl {

// ---- float erf and exp in plain arithmetic (no library calls), so the element-wise loops
// vectorize on CPUs (libm's erff + expf cost ~14 ns per element here, these ~1 ns) and stay
// branch-free on GPUs. Accuracy: a few float ulps (checked against std::erf/std::exp in the
// tests). Double precision keeps the library functions.

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

/// The element-wise kernels below run one team per row, its threads over the row's h
/// elements (TeamThreadRange): on GPUs consecutive threads touch consecutive elements
/// (coalesced); on host backends a team is one thread and the row is a unit-stride loop
/// (vectorized). Every element is computed alone, so the split does not change a bit.
template <class Space, class F>
void for_each_element(const char* label, const Space& space, int n, int h, const F& f) {
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      label, row_policy(space, n, h), KOKKOS_LAMBDA(const team& m) {
        const int i = m.league_rank();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, h), [&](const int c) { f(i, c); });
      });
}

// ---- the element-wise math of the activations, once: the Kokkos functors below and the host
// vector loops (host_vector_kernels.hpp) both call these.

/// gelu(s) and gelu'(s): erf is evaluated once per element for both.
template <class S>
KOKKOS_INLINE_FUNCTION void gelu_element(const S s, S& a, S& grad) {
  const S cdf = S(0.5) * (S(1) + erf_(s * S(0.70710678118654752440)));
  a = s * cdf;
  grad = cdf + s * exp_(S(-0.5) * s * s) * S(0.39894228040143267794);
}
/// silu(g) u.
template <class S>
KOKKOS_INLINE_FUNCTION S swiglu_element(const S g, const S u) {
  return g * sigmoid(g) * u;
}
/// From da: du = da silu(g), and da becomes dg = da u silu'(g).
template <class S>
KOKKOS_INLINE_FUNCTION void swiglu_backward_element(const S g, const S u, S& da, S& du) {
  const S sg = sigmoid(g), dav = da;
  du = dav * g * sg;
  da = dav * u * sg * (S(1) + g * (S(1) - sg));
}

/// Whether a kernel over V's rows runs as the host vector loops: float rows on a host backend.
template <class Space, class V>
inline constexpr bool host_vector_rows_v =
    !kc::device_memory_v<Space> && std::is_same<typename V::non_const_value_type, float>::value;

/// f(i) for every row i, on a host backend (the host vector loops take a row at a time).
template <class Space, class F>
void for_each_row_on_host(const char* label, const Space& space, int n, const F& f) {
  Kokkos::parallel_for(label, Kokkos::RangePolicy<Space>(space, 0, n), f);
}

/// a = gelu(hpre), and hpre is overwritten with gelu'(hpre): backward needs only the
/// derivative.
template <class Space, class V>
struct GeluForward {
  V hpre, a;
  KOKKOS_INLINE_FUNCTION void operator()(const int i, const int c) const {
    gelu_element(hpre(i, c), a(i, c), hpre(i, c));
  }
};
template <class Space, class V>
void gelu_forward(const Space& space, const V& hpre, const V& a) {
  const int n = static_cast<int>(hpre.extent(0)), h = static_cast<int>(hpre.extent(1));
  if constexpr (host_vector_rows_v<Space, V>) {
    for_each_row_on_host("examoe::experts::gelu", space, n,
                         [=](const int i) { host::gelu_forward(&hpre(i, 0), &a(i, 0), h); });
  } else {
    for_each_element("examoe::experts::gelu", space, n, h, GeluForward<Space, V>{hpre, a});
  }
}

/// da *= gelu'(s), with gelu'(s) as stored by gelu_forward (in place: da becomes ds).
template <class Space, class V>
struct GeluBackward {
  V gelu_grad, da;
  KOKKOS_INLINE_FUNCTION void operator()(const int i, const int c) const { da(i, c) *= gelu_grad(i, c); }
};
template <class Space, class V>
void gelu_backward(const Space& space, const V& gelu_grad, const V& da) {
  for_each_element("examoe::experts::gelu_bwd", space, static_cast<int>(da.extent(0)),
                   static_cast<int>(da.extent(1)), GeluBackward<Space, V>{gelu_grad, da});
}

/// a = silu(g) * u.
template <class Space, class V>
struct SwigluForward {
  V g, u, a;
  KOKKOS_INLINE_FUNCTION void operator()(const int i, const int c) const { a(i, c) = swiglu_element(g(i, c), u(i, c)); }
};
template <class Space, class V>
void swiglu_forward(const Space& space, const V& g, const V& u, const V& a) {
  const int n = static_cast<int>(g.extent(0)), h = static_cast<int>(g.extent(1));
  if constexpr (host_vector_rows_v<Space, V>) {
    for_each_row_on_host("examoe::experts::swiglu", space, n,
                         [=](const int i) { host::swiglu_forward(&g(i, 0), &u(i, 0), &a(i, 0), h); });
  } else {
    for_each_element("examoe::experts::swiglu", space, n, h, SwigluForward<Space, V>{g, u, a});
  }
}

/// From da: dg = da * u * silu'(g) (written into da), du = da * silu(g).
template <class Space, class V>
struct SwigluBackward {
  V g, u, da, du;
  KOKKOS_INLINE_FUNCTION void operator()(const int i, const int c) const {
    swiglu_backward_element(g(i, c), u(i, c), da(i, c), du(i, c));
  }
};
template <class Space, class V>
void swiglu_backward(const Space& space, const V& g, const V& u, const V& da, const V& du) {
  const int n = static_cast<int>(g.extent(0)), h = static_cast<int>(g.extent(1));
  if constexpr (host_vector_rows_v<Space, V>) {
    for_each_row_on_host("examoe::experts::swiglu_bwd", space, n, [=](const int i) {
      host::swiglu_backward(&g(i, 0), &u(i, 0), &da(i, 0), &du(i, 0), h);
    });
  } else {
    for_each_element("examoe::experts::swiglu_bwd", space, n, h, SwigluBackward<Space, V>{g, u, da, du});
  }
}

}  // namespace examoe::impl
