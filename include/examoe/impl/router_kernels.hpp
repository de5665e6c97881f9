// Router kernels: softmax with temperature and jitter, top-k, gates, statistics and
// backward. Equations: docs/moe-layer.md. One thread per token; no atomics.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>

namespace examoe::impl {

struct RouterParams {
  double inv_temperature = 1.0;
  double jitter = 0.0;  // 0 = no noise
  std::uint64_t seed = 0, step = 0;
  long long token_offset = 0;  // global index of local token 0
  bool renormalize = true;
};

/// In: logits z[T][E] in `p`. Out: p = softmax(u), lse[T], topk[T][k] (descending, ties to
/// the lower id), gates[T][k].
template <class Space, class PView, class LView, class IView, class GView>
void router_softmax_topk(const Space& space, const RouterParams& rp, const PView& p,
                         const LView& lse, const IView& topk, const GView& gates) {
  using S = typename PView::non_const_value_type;
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1));
  const RouterParams r = rp;
  Kokkos::parallel_for(
      "examoe::router::softmax_topk", Kokkos::RangePolicy<Space>(space, 0, T),
      KOKKOS_LAMBDA(const int t) {
        // u = z / temperature + jitter * n
        S umax = 0;
        for (int e = 0; e < E; ++e) {
          S u = static_cast<S>(p(t, e) * r.inv_temperature);
          if (r.jitter > 0) {
            const std::uint64_t key = static_cast<std::uint64_t>(r.token_offset + t) *
                                          static_cast<std::uint64_t>(E) + e;
            u += static_cast<S>(r.jitter * normal(hash_key(r.seed, r.step, key, 0x6a17)));
          }
          p(t, e) = u;
          umax = (e == 0 || u > umax) ? u : umax;
        }
        S sum = 0;
        for (int e = 0; e < E; ++e) {
          const S v = kc::exp(p(t, e) - umax);
          p(t, e) = v;
          sum += v;
        }
        const S inv = S(1) / sum;
        for (int e = 0; e < E; ++e) p(t, e) *= inv;
        lse(t) = umax + kc::log(sum);
        // top-k by repeated selection; strict '>' keeps the lower id on ties.
        S chosen = 0;
        for (int j = 0; j < k; ++j) {
          int best = -1;
          for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int jj = 0; jj < j; ++jj) taken = taken || (topk(t, jj) == e);
            if (!taken && (best < 0 || p(t, e) > p(t, best))) best = e;
          }
          topk(t, j) = best;
          gates(t, j) = p(t, best);
          chosen += p(t, best);
        }
        // Divide (not multiply by 1/chosen): with k = 1 the gate is then exactly 1.
        if (r.renormalize)
          for (int j = 0; j < k; ++j) gates(t, j) /= chosen;
      });
}

/// Sums over local tokens: out[e] = sum_t p[t][e] (e < E), out[E] = sum_t lse[t]^2.
template <class Space, class PView, class LView>
struct RouterStatsFunctor {
  using value_type = double[];
  using size_type = int;
  int value_count;
  PView p;
  LView lse;
  RouterStatsFunctor(const PView& p_, const LView& l_)
      : value_count(static_cast<int>(p_.extent(1)) + 1), p(p_), lse(l_) {}
  KOKKOS_INLINE_FUNCTION void operator()(const int t, value_type sum) const {
    const int E = value_count - 1;
    for (int e = 0; e < E; ++e) sum[e] += static_cast<double>(p(t, e));
    sum[E] += static_cast<double>(lse(t)) * static_cast<double>(lse(t));
  }
  KOKKOS_INLINE_FUNCTION void join(value_type dst, const value_type src) const {
    for (int i = 0; i < value_count; ++i) dst[i] += src[i];
  }
#if !EXAMOE_KOKKOS4
  KOKKOS_INLINE_FUNCTION void join(volatile value_type dst, const volatile value_type src) const {
    for (int i = 0; i < value_count; ++i) dst[i] += src[i];
  }
#endif
  KOKKOS_INLINE_FUNCTION void init(value_type v) const {
    for (int i = 0; i < value_count; ++i) v[i] = 0;
  }
};

/// Router backward, one thread per token. dz[T][E] = dL/dz for the gate gradients dg[T][k],
/// the aux-loss gradient coefficient aux[e] = alpha E f_e / T_g and z-loss coefficient
/// zc = 2 beta / T_g.
template <class Space, class PView, class LView, class IView, class GView, class AView,
          class DView>
void router_backward(const Space& space, const RouterParams& rp, const PView& p,
                     const LView& lse, const IView& topk, const GView& gates, const GView& dg,
                     const AView& aux, double zc, const DView& dz) {
  using S = typename PView::non_const_value_type;
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1));
  const bool renorm = rp.renormalize;
  const double invtemp = rp.inv_temperature;
  Kokkos::parallel_for(
      "examoe::router::backward", Kokkos::RangePolicy<Space>(space, 0, T),
      KOKKOS_LAMBDA(const int t) {
        // dp[e_j] from the gates
        S chosen = 0, dgg = 0;
        for (int j = 0; j < k; ++j) {
          chosen += p(t, topk(t, j));
          dgg += dg(t, j) * gates(t, j);
        }
        // sum_e p_e dp_e
        S dot = 0;
        for (int e = 0; e < E; ++e) dot += p(t, e) * static_cast<S>(aux(e));
        for (int j = 0; j < k; ++j) {
          const S gp = renorm ? (dg(t, j) - dgg) / chosen : dg(t, j);
          dot += p(t, topk(t, j)) * gp;
        }
        const S zt = static_cast<S>(zc) * lse(t);
        for (int e = 0; e < E; ++e) {
          S dpe = static_cast<S>(aux(e));
          for (int j = 0; j < k; ++j)
            if (topk(t, j) == e) dpe += renorm ? (dg(t, j) - dgg) / chosen : dg(t, j);
          const S du = p(t, e) * (dpe - dot) + zt * p(t, e);
          dz(t, e) = static_cast<S>(du * invtemp);
        }
      });
}

}  // namespace examoe::impl
