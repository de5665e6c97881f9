// Element-wise parts of the expert MLPs (the GEMMs go through Kokkos Kernels).
#pragma once
#include <examoe/impl/fast_math.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/row_policy.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace examoe::impl {

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

/// gelu(s) = s Phi(s) and gelu'(s) = Phi(s) + s phi(s), Phi the normal distribution.
/// Float: both from one exponential E = exp(-s^2/2) = sqrt(2 pi) phi(s), with
/// Phi(-|s|) = erfc(|s|/sqrt2)/2 = E erfcx(|s|/sqrt2)/2: a few ulps in relative terms for every
/// s, the tails included (1 + erf(x) cancelled there). E is exp(-s^2/4) squared, so that it
/// underflows gracefully, and corrected for the rounding of s^2 (exact as s^2 + err with an
/// fma), which exp would otherwise scale by s^2/2. Double: the library's erf and exp.
template <class S>
KOKKOS_FORCEINLINE_FUNCTION void gelu_element(const S s, S& a, S& grad) {
  if constexpr (std::is_same<S, float>::value) {
    const float sq = s * s, sq_err = kc::fma(s, s, -sq);
    const float e = exp_nonpositive(-0.25f * sq);
    const float E = kc::fma(e * e, -0.5f * sq_err, e * e);
    const float h = 0.5f * E * erfcx_fast(kc::fabs(s) * 0.70710678118654752440f);  // Phi(-|s|)
    const float cdf = s >= 0.0f ? 1.0f - h : h;
    a = s * cdf;
    grad = kc::fma(s * E, 0.39894228040143267794f, cdf);
  } else {
    const S cdf = S(0.5) * (S(1) + kc::erf(s * S(0.70710678118654752440)));
    a = s * cdf;
    grad = cdf + s * kc::exp(S(-0.5) * s * s) * S(0.39894228040143267794);
  }
}
/// silu(g) u.
template <class S>
KOKKOS_FORCEINLINE_FUNCTION S swiglu_element(const S g, const S u) {
  return g * sigmoid(g) * u;
}
/// From da: du = da silu(g), and da becomes dg = da u silu'(g).
template <class S>
KOKKOS_FORCEINLINE_FUNCTION void swiglu_backward_element(const S g, const S u, S& da, S& du) {
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
  const int n = static_cast<int>(da.extent(0)), h = static_cast<int>(da.extent(1));
  if constexpr (host_vector_rows_v<Space, V>) {
    for_each_row_on_host("examoe::experts::gelu_bwd", space, n,
                         [=](const int i) { host::gelu_backward(&gelu_grad(i, 0), &da(i, 0), h); });
  } else {
    for_each_element("examoe::experts::gelu_bwd", space, n, h, GeluBackward<Space, V>{gelu_grad, da});
  }
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
