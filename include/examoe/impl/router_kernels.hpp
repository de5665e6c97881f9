// Router kernels: softmax with temperature and jitter, top-k, gates, statistics and
// backward. Equations: docs/moe-layer.md. One team per token, its threads over the experts
// (consecutive threads read consecutive p[t][e]); no atomics.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/row_policy.hpp>

#include <type_traits>

namespace examoe::impl {

struct RouterParams {
  double inv_temperature = 1.0;
  double jitter = 0.0;  // 0 = no noise
  std::uint64_t seed = 0, step = 0;
  long long token_offset = 0;  // global index of local token 0
  bool renormalize = true;
};

/// topk[t][0..k) = the k largest p[t][e] in descending order, ties to the lower id, by one
/// pass over e that keeps the best k so far in order (a later equal value never passes an
/// earlier one). Every id is valid also when p holds NaN (the first ids fill the list).
template <class PView, class IView>
KOKKOS_INLINE_FUNCTION void topk_by_insertion(const PView& p, int t, int E, int k, const IView& topk) {
  using S = typename PView::non_const_value_type;
  int n = 0;
  S last = 0;  // p of the k-th entry once the list is full
  for (int e = 0; e < E; ++e) {
    const S v = p(t, e);
    if (n == k && !(v > last)) continue;
    int pos = n < k ? n++ : k - 1;
    while (pos > 0 && v > p(t, topk(t, pos - 1))) {
      topk(t, pos) = topk(t, pos - 1);
      --pos;
    }
    topk(t, pos) = e;
    if (n == k) last = p(t, topk(t, k - 1));
  }
}

/// The same by k team-wide passes: the largest value not yet taken, then the lowest id that
/// holds it (the lowest id not taken if every value left is NaN).
template <class Member, class PView, class IView>
KOKKOS_INLINE_FUNCTION void topk_by_team_argmax(const Member& m, const PView& p, int t, int E, int k,
                                                const IView& topk) {
  using S = typename PView::non_const_value_type;
  for (int j = 0; j < k; ++j) {
    auto taken = [&](const int e) {
      bool hit = false;
      for (int jj = 0; jj < j; ++jj) hit = hit || topk(t, jj) == e;
      return hit;
    };
    S best = 0;
    Kokkos::parallel_reduce(
        Kokkos::TeamThreadRange(m, E),
        [&](const int e, S& mx) {
          if (!taken(e) && p(t, e) > mx) mx = p(t, e);
        },
        Kokkos::Max<S>(best));
    int id = 0;
    Kokkos::parallel_reduce(
        Kokkos::TeamThreadRange(m, E),
        [&](const int e, int& lo) {
          if (!taken(e) && p(t, e) == best && e < lo) lo = e;
        },
        Kokkos::Min<int>(id));
    if (id >= E) {  // no value compared: NaN everywhere left
      id = 0;
      while (taken(id)) ++id;
    }
    Kokkos::single(Kokkos::PerTeam(m), [&]() { topk(t, j) = id; });
    m.team_barrier();
  }
}

// Not inlined on the host: inlined, the running max shares the stack slot of the softmax's
// max, which must live across the libm exp calls after it, and the loop then stores it on
// every element (half the softmax's time).
#if defined(__GNUC__) && !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
#define EXAMOE_HOST_NOINLINE __attribute__((noinline))
#else
#define EXAMOE_HOST_NOINLINE
#endif

/// max(identity of the Max reduction, row[0..n)), one thread, the running max in a register.
template <class S>
KOKKOS_FUNCTION EXAMOE_HOST_NOINLINE S row_max(const S* row, int n) {
  S v = Kokkos::reduction_identity<S>::max();
  for (int e = 0; e < n; ++e) {
    const S x = row[e];
    v = x > v ? x : v;
  }
  return v;
}

/// How the top-k of a token's E probabilities is found. insertion: one pass over e keeps the
/// k best in order (one thread per token: host backends, whose teams are one thread);
/// team_argmax: k passes, each a team-wide max and then the lowest id holding it (GPUs). Both
/// give the k largest in descending order, ties to the lower id; automatic picks by the space.
enum class TopkSearch { automatic, insertion, team_argmax };

/// In: logits z[T][E] in `p`. Out: p = softmax(u), lse[T], topk[T][k] (descending, ties to
/// the lower id), gates[T][k]. One team per token, its threads over the E experts; the sum
/// runs in expert order on host backends and as the team's fixed-order reduction on GPUs.
template <class Space, class PView, class LView, class IView, class GView>
void router_softmax_topk(const Space& space, const RouterParams& rp, const PView& p,
                         const LView& lse, const IView& topk, const GView& gates,
                         TopkSearch search = TopkSearch::automatic) {
  using S = typename PView::non_const_value_type;
  static_assert(std::is_same<typename PView::array_layout, Kokkos::LayoutRight>::value,
                "examoe::impl::router_softmax_topk: p's rows must be contiguous (row_max reads a row)");
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1));
  const RouterParams r = rp;
  // insertion: the team's one thread also finds the row's max alone (host backends)
  const bool one_thread = search == TopkSearch::insertion ||
                          (search == TopkSearch::automatic && !kc::device_memory_v<Space>);
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::router::softmax_topk", row_policy(space, T, E),
      KOKKOS_LAMBDA(const team& m) {
        const int t = m.league_rank();
        // u = z / temperature + jitter * n (u = z exactly at temperature 1 without jitter)
        S umax = 0;
        if (r.jitter > 0) {
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) {
            const std::uint64_t key = static_cast<std::uint64_t>(r.token_offset + t) *
                                          static_cast<std::uint64_t>(E) + e;
            p(t, e) = static_cast<S>(p(t, e) * r.inv_temperature) +
                      static_cast<S>(r.jitter * normal(hash_key(r.seed, r.step, key, 0x6a17)));
          });
        } else if (r.inv_temperature != 1.0) {
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E),
                               [&](const int e) { p(t, e) = static_cast<S>(p(t, e) * r.inv_temperature); });
        }
        // max over e from the Max reduction's identity (the same value whoever computes it)
        if (one_thread) {  // a plain loop keeps the running max in a register
          m.team_barrier();
          Kokkos::single(
              Kokkos::PerTeam(m),
              [&](S& mx) { mx = row_max(&p(t, 0), E); },
              umax);
        } else {
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, E), [&](const int e, S& mx) { mx = p(t, e) > mx ? p(t, e) : mx; },
              Kokkos::Max<S>(umax));
        }
        S sum = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(m, E),
            [&](const int e, S& acc) {
              const S v = kc::exp(p(t, e) - umax);
              p(t, e) = v;
              acc += v;
            },
            sum);
        const S inv = S(1) / sum;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) { p(t, e) *= inv; });
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() { lse(t) = umax + kc::log(sum); });
        if (one_thread)
          Kokkos::single(Kokkos::PerTeam(m), [&]() { topk_by_insertion(p, t, E, k, topk); });
        else
          topk_by_team_argmax(m, p, t, E, k, topk);
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          S chosen = 0;
          for (int j = 0; j < k; ++j) {
            gates(t, j) = p(t, topk(t, j));
            chosen += p(t, topk(t, j));
          }
          // Divide (not multiply by 1/chosen): with k = 1 the gate is then exactly 1.
          if (r.renormalize)
            for (int j = 0; j < k; ++j) gates(t, j) /= chosen;
        });
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

/// Router backward, one team per token, its threads over the E experts. dz[T][E] = dL/dz for
/// the gate gradients dg[T][k], the aux-loss gradient coefficient aux[e] = alpha E f_e / T_g
/// and z-loss coefficient zc = 2 beta / T_g. Every expert first gets the aux part of dp; the
/// k chosen ones are then rewritten with their gate part added (the same expression).
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
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::router::backward", row_policy(space, T, E),
      KOKKOS_LAMBDA(const team& m) {
        const int t = m.league_rank();
        // dp[e_j] from the gates (k terms: every thread computes them alike)
        S chosen = 0, dgg = 0;
        for (int j = 0; j < k; ++j) {
          chosen += p(t, topk(t, j));
          dgg += dg(t, j) * gates(t, j);
        }
        auto gate_part = [&](const int j) { return renorm ? (dg(t, j) - dgg) / chosen : dg(t, j); };
        // sum_e p_e dp_e
        S dot = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(m, E), [&](const int e, S& acc) { acc += p(t, e) * static_cast<S>(aux(e)); },
            dot);
        for (int j = 0; j < k; ++j) dot += p(t, topk(t, j)) * gate_part(j);
        const S zt = static_cast<S>(zc) * lse(t);
        auto dz_of = [&](const int e, const S dpe) {
          const S du = p(t, e) * (dpe - dot) + zt * p(t, e);
          return static_cast<S>(du * invtemp);
        };
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E),
                             [&](const int e) { dz(t, e) = dz_of(e, static_cast<S>(aux(e))); });
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          for (int j = 0; j < k; ++j) {
            const int e = topk(t, j);
            dz(t, e) = dz_of(e, static_cast<S>(aux(e)) + gate_part(j));
          }
        });
      });
}

}  // namespace examoe::impl
