// Element-wise parts of the expert MLPs (the GEMMs go through Kokkos Kernels).
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl {

template <class S>
KOKKOS_INLINE_FUNCTION S sigmoid(S s) {
  return S(1) / (S(1) + kc::exp(-s));
}

/// a = gelu(hpre), and hpre is overwritten with gelu'(hpre): backward needs only the
/// derivative, and erf is evaluated once per element for both.
template <class Space, class V>
void gelu_forward(const Space& space, const V& hpre, const V& a) {
  using S = typename V::non_const_value_type;
  const int n = static_cast<int>(hpre.extent(0)), h = static_cast<int>(hpre.extent(1));
  Kokkos::parallel_for(
      "examoe::experts::gelu", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < h; ++c) {
          const S s = hpre(i, c);
          const S cdf = S(0.5) * (S(1) + kc::erf(s * S(0.70710678118654752440)));
          a(i, c) = s * cdf;
          hpre(i, c) = cdf + s * kc::exp(S(-0.5) * s * s) * S(0.39894228040143267794);
        }
      });
}
/// da *= gelu'(s), with gelu'(s) as stored by gelu_forward (in place: da becomes ds).
template <class Space, class V>
void gelu_backward(const Space& space, const V& gelu_grad, const V& da) {
  const int n = static_cast<int>(da.extent(0)), h = static_cast<int>(da.extent(1));
  Kokkos::parallel_for(
      "examoe::experts::gelu_bwd", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < h; ++c) da(i, c) *= gelu_grad(i, c);
      });
}
/// a = silu(g) * u.
template <class Space, class V>
void swiglu_forward(const Space& space, const V& g, const V& u, const V& a) {
  const int n = static_cast<int>(g.extent(0)), h = static_cast<int>(g.extent(1));
  Kokkos::parallel_for(
      "examoe::experts::swiglu", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < h; ++c) a(i, c) = g(i, c) * sigmoid(g(i, c)) * u(i, c);
      });
}
/// From da: dg = da * u * silu'(g) (written into da), du = da * silu(g).
template <class Space, class V>
void swiglu_backward(const Space& space, const V& g, const V& u, const V& da, const V& du) {
  using S = typename V::non_const_value_type;
  const int n = static_cast<int>(g.extent(0)), h = static_cast<int>(g.extent(1));
  Kokkos::parallel_for(
      "examoe::experts::swiglu_bwd", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < h; ++c) {
          const S gv = g(i, c), sg = sigmoid(gv), dav = da(i, c);
          du(i, c) = dav * gv * sg;
          da(i, c) = dav * u(i, c) * sg * (S(1) + gv * (S(1) - sg));
        }
      });
}

}  // namespace examoe::impl
