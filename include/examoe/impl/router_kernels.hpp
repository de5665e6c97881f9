// Router kernels: scores (softmax or sigmoid) with temperature and jitter, top-k with an
// optional selection bias and group limit, gates, statistics and backward. Equations:
// docs/moe-layer.md. One team per token, its threads over the experts (consecutive threads
// read consecutive p[t][e]); no atomics.
#pragma once
#include <examoe/impl/fast_math.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/row_policy.hpp>
#include <examoe/impl/sums_in_order.hpp>

#include <type_traits>

namespace examoe::impl {

struct RouterParams {
  double inv_temperature = 1.0;
  double jitter = 0.0;  // 0 = no noise
  std::uint64_t seed = 0, step = 0;
  long long token_offset = 0;  // global index of local token 0
  bool renormalize = true;
  bool sigmoid = false;   // s = sigmoid(u) instead of softmax(u)
  int groups = 1;         // G: contiguous balanced blocks of expert ids
  int topk_groups = 0;    // M: groups each token may choose from (0 = no group limit)
};

/// The group of expert e when E experts form G contiguous balanced blocks (the first E % G
/// blocks one expert larger, as Placement::balanced lays experts on ranks).
KOKKOS_INLINE_FUNCTION int expert_group(int e, int E, int G) {
  const int base = E / G, extra = E % G, big = extra * (base + 1);
  return e < big ? e / (base + 1) : extra + (e - big) / base;
}
KOKKOS_INLINE_FUNCTION int group_begin(int g, int E, int G) {
  return g * (E / G) + (g < E % G ? g : E % G);
}

/// The views of the router's non-default modes (extent 0 where a mode is off).
template <class S, class Mem>
struct RouterModeViews {
  Kokkos::View<const S*, Mem> bias;                        ///< [E] selection bias b
  Kokkos::View<S**, Kokkos::LayoutRight, Mem> q;           ///< [T][E] softmax(u) (sigmoid: for the z-loss)
  Kokkos::View<S*, Mem> inv_sum;                           ///< [T] 1 / sum_e s_e (sigmoid)
  Kokkos::View<int**, Kokkos::LayoutRight, Mem> chosen;    ///< [T][M] the groups each token chose
};

/// The key experts are selected by: s[t][e] + b[e], and the lowest value for experts outside
/// the token's chosen groups. With neither a bias nor a group limit it is s itself.
template <class PView, class BView, class CView>
struct SelectionKey {
  using non_const_value_type = typename PView::non_const_value_type;
  using S = non_const_value_type;
  PView s;
  BView bias;
  CView chosen;
  int E = 0, G = 1, M = 0;
  KOKKOS_INLINE_FUNCTION S operator()(const int t, const int e) const {
    S v = s(t, e);
    if (bias.extent(0) > 0) v += bias(e);
    if (M > 0) {
      const int g = expert_group(e, E, G);
      bool in = false;
      for (int j = 0; j < M; ++j) in = in || chosen(t, j) == g;
      if (!in) v = Kokkos::reduction_identity<S>::max();  // the lowest value
    }
    return v;
  }
  /// Key of e without the group mask (what groups are ranked by).
  KOKKOS_INLINE_FUNCTION S unmasked(const int t, const int e) const {
    return bias.extent(0) > 0 ? s(t, e) + bias(e) : s(t, e);
  }
};

/// chosen[t][0..M) = the M groups with the largest sum of their top min(2, size) unmasked
/// keys, in descending order, ties to the lower group (the first group not taken if every
/// sum left is NaN). One thread.
template <class Key>
KOKKOS_INLINE_FUNCTION void choose_groups(const Key& key, int t) {
  using S = typename Key::S;
  for (int j = 0; j < key.M; ++j) {
    int bg = -1;
    S best = 0;
    for (int g = 0; g < key.G; ++g) {
      bool taken = false;
      for (int jj = 0; jj < j; ++jj) taken = taken || key.chosen(t, jj) == g;
      if (taken) continue;
      const int b = group_begin(g, key.E, key.G), n = group_begin(g + 1, key.E, key.G) - b;
      S top1 = key.unmasked(t, b), top2 = 0;
      for (int e = b + 1; e < b + n; ++e) {
        const S v = key.unmasked(t, e);
        if (e == b + 1) {
          top2 = v > top1 ? top1 : v;
          top1 = v > top1 ? v : top1;
        } else if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
      const S score = n > 1 ? top1 + top2 : top1;
      if (bg < 0 || score > best) {
        bg = g;
        best = score;
      }
    }
    key.chosen(t, j) = bg;
  }
}

/// Where the scan of topk_by_insertion goes on once its list is full: at e itself.
struct EveryExpert {
  template <class S>
  KOKKOS_INLINE_FUNCTION int operator()(int e, S /*last*/) const { return e; }
};

/// topk[t][0..k) = the k largest p[t][e] in descending order, ties to the lower id, by one
/// pass over e that keeps the best k so far in order (a later equal value never passes an
/// earlier one). Every id is valid also when p holds NaN (the first ids fill the list).
/// Once the list is full, next(e, last) may skip to the first e' >= e whose value exceeds the
/// k-th's (E if none): the ids it skips could not enter.
template <class PView, class IView, class Next = EveryExpert>
KOKKOS_INLINE_FUNCTION void topk_by_insertion(const PView& p, int t, int E, int k, const IView& topk,
                                              const Next& next = Next{}) {
  using S = typename PView::non_const_value_type;
  int n = 0;
  S last = 0;  // p of the k-th entry once the list is full
  for (int e = 0; e < E; ++e) {
    if (n == k && (e = next(e, last)) >= E) break;
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

/// u = z / temperature + jitter * n(seed, step, token, e) of token t's logit z for expert e
/// (called only with a temperature or jitter; u = z exactly without them).
template <class S>
KOKKOS_INLINE_FUNCTION S router_logit(const RouterParams& r, const S z, const int t, const int e, const int E) {
  if (!(r.jitter > 0)) return static_cast<S>(z * r.inv_temperature);
  const std::uint64_t key_e = static_cast<std::uint64_t>(r.token_offset + t) * static_cast<std::uint64_t>(E) + e;
  return static_cast<S>(z * r.inv_temperature) + static_cast<S>(r.jitter * normal(hash_key(r.seed, r.step, key_e, 0x6a17)));
}

/// How the top-k of a token's E probabilities is found. insertion: one pass over e keeps the
/// k best in order (one thread per token: host backends, whose teams are one thread);
/// team_argmax: k passes, each a team-wide max and then the lowest id holding it (GPUs). Both
/// give the k largest in descending order, ties to the lower id; automatic picks by the space.
enum class TopkSearch { automatic, insertion, team_argmax };

/// router_softmax_topk on a host backend with softmax scores and neither a bias nor a group
/// limit (the default router): tokens in blocks of kSumsInOrder, each token's row by plain
/// loops, so that the max, the exponentials, the scaling and the top-k scan run in vector lanes
/// (host_vector_kernels.hpp) and the block's sums interleave (sums_in_order). Bitwise the team
/// kernel's results: every element by the same operations, each sum in expert order.
template <class Space, class PView, class LView, class IView, class GView>
void router_softmax_topk_on_host(const Space& space, const RouterParams& r, const PView& p, const LView& lse,
                                 const IView& topk, const GView& gates) {
  using S = typename PView::non_const_value_type;
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1)), B = kSumsInOrder;
  Kokkos::parallel_for(
      "examoe::router::softmax_topk", Kokkos::RangePolicy<Space>(space, 0, (T + B - 1) / B), [=](const int b) {
        const int t0 = b * B, m = T - t0 < B ? T - t0 : B;
        S umax[kSumsInOrder], sum[kSumsInOrder];
        for (int j = 0; j < m; ++j) {
          S* u = &p(t0 + j, 0);
          if (r.jitter > 0 || r.inv_temperature != 1.0)
            for (int e = 0; e < E; ++e) u[e] = router_logit(r, u[e], t0 + j, e, E);
          umax[j] = host::row_max(u, E);
          if constexpr (std::is_same<S, float>::value)
            host::exp_shifted(u, umax[j], E);
          else
            for (int e = 0; e < E; ++e) u[e] = exp_(u[e] - umax[j]);
        }
        bool summed = false;
        if constexpr (std::is_same<S, float>::value) {
          if (m == B) {  // eight rows at once, vectorized (host::sums_in_order_8, the same sums)
            const float* rows[kSumsInOrder];
            for (int j = 0; j < B; ++j) rows[j] = &p(t0 + j, 0);
            host::sums_in_order_8(rows, nullptr, nullptr, E, sum);
            summed = true;
          }
        }
        if (!summed) sums_in_order(m, E, [&](const int j, const int e) { return p(t0 + j, e); }, sum);
        for (int j = 0; j < m; ++j) {
          const int t = t0 + j;
          S* u = &p(t, 0);
          const S inv = S(1) / sum[j];
          for (int e = 0; e < E; ++e) u[e] *= inv;
          lse(t) = umax[j] + kc::log(sum[j]);
          topk_by_insertion(p, t, E, k, topk, [u, E](int e, S last) { return host::first_greater(u, e, E, last); });
          S chosen = 0;
          for (int i = 0; i < k; ++i) {
            gates(t, i) = u[topk(t, i)];
            chosen += u[topk(t, i)];
          }
          if (r.renormalize && chosen > 0)
            for (int i = 0; i < k; ++i) gates(t, i) /= chosen;
        }
      });
}

/// In: logits z[T][E] in `p`. Out: the scores in p (softmax(u), or sigmoid(u) with
/// rp.sigmoid, when also q = softmax(u) and inv_sum = 1 / sum_e s), lse[T], topk[T][k] by the
/// selection key (SelectionKey: s + bias within the chosen groups; descending, ties to the
/// lower id), gates[T][k] (the chosen s, normalised over the k as rp.renormalize says). One team per token, its threads over the E experts;
/// sums run in expert order on host backends and as the team's fixed-order reduction on GPUs.
template <class Space, class PView, class LView, class IView, class GView, class Mem>
void router_softmax_topk(const Space& space, const RouterParams& rp, const PView& p,
                         const LView& lse, const IView& topk, const GView& gates,
                         const RouterModeViews<typename PView::non_const_value_type, Mem>& modes,
                         TopkSearch search = TopkSearch::automatic) {
  using S = typename PView::non_const_value_type;
  static_assert(std::is_same<typename PView::array_layout, Kokkos::LayoutRight>::value,
                "examoe::impl::router_softmax_topk: p's rows must be contiguous (row_max reads a row)");
  if constexpr (!kc::device_memory_v<Space> &&
                (std::is_same<S, float>::value || std::is_same<S, double>::value)) {
    if (search != TopkSearch::team_argmax && !rp.sigmoid && rp.topk_groups == 0 && modes.bias.extent(0) == 0) {
      router_softmax_topk_on_host(space, rp, p, lse, topk, gates);
      return;
    }
  }
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1));
  const RouterParams r = rp;
  const auto q = modes.q;
  const auto inv_sum = modes.inv_sum;
  using Key = SelectionKey<PView, decltype(modes.bias), decltype(modes.chosen)>;
  Key key;
  key.s = p;
  key.bias = modes.bias;
  key.chosen = modes.chosen;
  key.E = E;
  key.G = rp.groups;
  key.M = rp.topk_groups;
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
        if (r.jitter > 0 || r.inv_temperature != 1.0)
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) { p(t, e) = router_logit(r, p(t, e), t, e, E); });
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
        if (r.sigmoid) {  // q = softmax(u) (for the z-loss), p = sigmoid(u)
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, E),
              [&](const int e, S& acc) {
                const S u = p(t, e);
                const S v = kc::exp(u - umax);
                q(t, e) = v;
                p(t, e) = S(1) / (S(1) + kc::exp(-u));
                acc += v;
              },
              sum);
          const S inv = S(1) / sum;
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) { q(t, e) *= inv; });
          S ssum = 0;
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, E), [&](const int e, S& acc) { acc += p(t, e); }, ssum);
          Kokkos::single(Kokkos::PerTeam(m), [&]() { inv_sum(t) = ssum > 0 ? S(1) / ssum : S(0); });
        } else {
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, E),
              [&](const int e, S& acc) {
                const S v = exp_(p(t, e) - umax);
                p(t, e) = v;
                acc += v;
              },
              sum);
          const S inv = S(1) / sum;
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) { p(t, e) *= inv; });
        }
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          lse(t) = umax + kc::log(sum);
          if (key.M > 0) choose_groups(key, t);
        });
        m.team_barrier();
        const bool plain = key.M == 0 && key.bias.extent(0) == 0;
        if (one_thread)
          Kokkos::single(Kokkos::PerTeam(m), [&]() {
            if (plain)
              topk_by_insertion(p, t, E, k, topk);
            else
              topk_by_insertion(key, t, E, k, topk);
          });
        else if (plain)
          topk_by_team_argmax(m, p, t, E, k, topk);
        else
          topk_by_team_argmax(m, key, t, E, k, topk);
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          S chosen = 0;
          for (int j = 0; j < k; ++j) {
            gates(t, j) = p(t, topk(t, j));
            chosen += p(t, topk(t, j));
          }
          // Divide (not multiply by 1/chosen): with k = 1 the gate is then exactly 1. Sigmoid
          // scores of the chosen may all underflow to 0: the gates stay 0.
          if (r.renormalize && chosen > 0)
            for (int j = 0; j < k; ++j) gates(t, j) /= chosen;
        });
      });
}

/// Softmax scores, no bias, no group limit.
template <class Space, class PView, class LView, class IView, class GView>
void router_softmax_topk(const Space& space, const RouterParams& rp, const PView& p,
                         const LView& lse, const IView& topk, const GView& gates,
                         TopkSearch search = TopkSearch::automatic) {
  RouterParams r = rp;
  r.sigmoid = false;
  r.topk_groups = 0;
  router_softmax_topk(space, r, p, lse, topk, gates,
                      RouterModeViews<typename PView::non_const_value_type, typename PView::memory_space>{}, search);
}

/// Sums over local tokens: out[e] = sum_t s'[t][e] (e < E), out[E] = sum_t lse[t]^2, where
/// s' = p (softmax scores) or p * inv_sum[t] (sigmoid scores normalised over the experts;
/// inv_sum of extent 0 means softmax).
template <class Space, class PView, class LView, class NView>
struct RouterStatsFunctor {
  using value_type = double[];
  using size_type = int;
  int value_count;
  PView p;
  LView lse;
  NView inv_sum;
  RouterStatsFunctor(const PView& p_, const LView& l_, const NView& n_)
      : value_count(static_cast<int>(p_.extent(1)) + 1), p(p_), lse(l_), inv_sum(n_) {}
  KOKKOS_INLINE_FUNCTION void operator()(const int t, value_type sum) const {
    const int E = value_count - 1;
    if (inv_sum.extent(0) > 0) {
      const double n = static_cast<double>(inv_sum(t));
      for (int e = 0; e < E; ++e) sum[e] += static_cast<double>(p(t, e)) * n;
    } else {
      for (int e = 0; e < E; ++e) sum[e] += static_cast<double>(p(t, e));
    }
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

/// The gate part of dL/ds for token t's k chosen scores, from the gate gradients dg:
/// renormalised, (dg_j - sum_j' dg_j' g_j') / S with S the chosen scores' sum (0 when S = 0);
/// otherwise dg_j. The same for softmax and sigmoid scores.
template <class S, class PView, class IView, class GView>
struct GatePart {
  S chosen = 0, dgg = 0;
  const GView& dg;
  int t;
  bool renorm;
  KOKKOS_INLINE_FUNCTION GatePart(const PView& p, const IView& topk, const GView& gates, const GView& dg_, int t_,
                                  int k, bool renorm_)
      : dg(dg_), t(t_), renorm(renorm_) {
    for (int j = 0; j < k; ++j) {
      chosen += p(t, topk(t, j));
      dgg += dg(t, j) * gates(t, j);
    }
  }
  KOKKOS_INLINE_FUNCTION S operator()(const int j) const {
    return renorm ? (chosen > 0 ? (dg(t, j) - dgg) / chosen : S(0)) : dg(t, j);
  }
};

/// dL/du_e of a softmax score p_e with dL/dp_e = dpe, dot = sum_e' p_e' dL/dp_e' and the z-loss
/// term zt = zc lse, divided by the temperature (du/dz).
template <class S>
KOKKOS_INLINE_FUNCTION S softmax_dz(const S p, const S dpe, const S dot, const S zt, const double invtemp) {
  const S du = p * (dpe - dot) + zt * p;
  return static_cast<S>(du * invtemp);
}

/// router_backward_softmax on a host backend: tokens in blocks of kSumsInOrder, the block's
/// dot products interleaved (sums_in_order), each token's row by plain loops. Bitwise the team
/// kernel's results.
template <class Space, class PView, class LView, class IView, class GView, class AView, class DView>
void router_backward_softmax_on_host(const Space& space, const RouterParams& rp, const PView& p, const LView& lse,
                                     const IView& topk, const GView& gates, const GView& dg, const AView& aux,
                                     double zc, const DView& dz) {
  using S = typename PView::non_const_value_type;
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1)), B = kSumsInOrder;
  const bool renorm = rp.renormalize;
  const double invtemp = rp.inv_temperature;
  // The rows of dz as host vector loops where p's and dz's rows and aux are contiguous doubles.
  constexpr bool rows_contiguous =
      std::is_same<S, typename DView::non_const_value_type>::value &&
      (std::is_same<S, float>::value || std::is_same<S, double>::value) &&
      std::is_same<typename AView::non_const_value_type, double>::value &&
      std::is_same<typename PView::array_layout, Kokkos::LayoutRight>::value &&
      std::is_same<typename DView::array_layout, Kokkos::LayoutRight>::value &&
      (std::is_same<typename AView::array_layout, Kokkos::LayoutRight>::value ||
       std::is_same<typename AView::array_layout, Kokkos::LayoutLeft>::value);
  Kokkos::parallel_for(
      "examoe::router::backward", Kokkos::RangePolicy<Space>(space, 0, (T + B - 1) / B), [=](const int b) {
        const int t0 = b * B, m = T - t0 < B ? T - t0 : B;
        S dot[kSumsInOrder];  // sum_e p_e dp_e, the aux part first (as the team kernel)
        bool summed = false;
        if constexpr (rows_contiguous && std::is_same<S, float>::value) {
          if (m == B) {  // eight rows at once, vectorized (host::sums_in_order_8, the same sums)
            const float* rows[kSumsInOrder];
            for (int j = 0; j < B; ++j) rows[j] = &p(t0 + j, 0);
            host::sums_in_order_8(rows, nullptr, aux.data(), E, dot);
            summed = true;
          }
        }
        if (!summed)
          sums_in_order(m, E, [&](const int j, const int e) { return p(t0 + j, e) * static_cast<S>(aux(e)); }, dot);
        for (int j = 0; j < m; ++j) {
          const int t = t0 + j;
          const GatePart<S, PView, IView, GView> gate_part(p, topk, gates, dg, t, k, renorm);
          for (int i = 0; i < k; ++i) dot[j] += p(t, topk(t, i)) * gate_part(i);
          const S zt = static_cast<S>(zc) * lse(t), dt = dot[j];
          if constexpr (rows_contiguous)
            host::softmax_dz_row(&p(t, 0), aux.data(), dt, zt, invtemp, &dz(t, 0), E);
          else
            for (int e = 0; e < E; ++e) dz(t, e) = softmax_dz(p(t, e), static_cast<S>(aux(e)), dt, zt, invtemp);
          for (int i = 0; i < k; ++i) {
            const int e = topk(t, i);
            dz(t, e) = softmax_dz(p(t, e), static_cast<S>(aux(e)) + gate_part(i), dt, zt, invtemp);
          }
        }
      });
}

/// Router backward with softmax scores, one team per token, its threads over the E experts. dz[T][E] = dL/dz for
/// the gate gradients dg[T][k], the aux-loss gradient coefficient aux[e] = alpha E f_e / T_g
/// and z-loss coefficient zc = 2 beta / T_g. Every expert first gets the aux part of dp; the
/// k chosen ones are then rewritten with their gate part added (the same expression). On host
/// backends router_backward_softmax_on_host runs instead, unless `team_kernel` (the tests').
template <class Space, class PView, class LView, class IView, class GView, class AView,
          class DView>
void router_backward_softmax(const Space& space, const RouterParams& rp, const PView& p,
                             const LView& lse, const IView& topk, const GView& gates, const GView& dg,
                             const AView& aux, double zc, const DView& dz, bool team_kernel = false) {
  if constexpr (!kc::device_memory_v<Space>) {
    if (!team_kernel) {
      router_backward_softmax_on_host(space, rp, p, lse, topk, gates, dg, aux, zc, dz);
      return;
    }
  }
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
        const GatePart<S, PView, IView, GView> gate_part(p, topk, gates, dg, t, k, renorm);
        // sum_e p_e dp_e
        S dot = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(m, E), [&](const int e, S& acc) { acc += p(t, e) * static_cast<S>(aux(e)); },
            dot);
        for (int j = 0; j < k; ++j) dot += p(t, topk(t, j)) * gate_part(j);
        const S zt = static_cast<S>(zc) * lse(t);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) {
          dz(t, e) = softmax_dz(p(t, e), static_cast<S>(aux(e)), dot, zt, invtemp);
        });
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          for (int j = 0; j < k; ++j) {
            const int e = topk(t, j);
            dz(t, e) = softmax_dz(p(t, e), static_cast<S>(aux(e)) + gate_part(j), dot, zt, invtemp);
          }
        });
      });
}

/// Router backward with sigmoid scores s = sigmoid(u), one team per token. The aux loss sees
/// s' = s / sum_e s, so its part of dL/ds_e is (aux(e) - sum_e' aux(e') s'_e') / sum_e s; the
/// gate part of the k chosen as with softmax; du = dL/ds * s (1 - s) + zc lse q (q = softmax(u)).
template <class Space, class PView, class LView, class IView, class GView, class AView,
          class QView, class NView, class DView>
void router_backward_sigmoid(const Space& space, const RouterParams& rp, const PView& p,
                             const LView& lse, const IView& topk, const GView& gates, const GView& dg,
                             const AView& aux, double zc, const QView& q, const NView& inv_sum,
                             const DView& dz) {
  using S = typename PView::non_const_value_type;
  const int T = static_cast<int>(p.extent(0)), E = static_cast<int>(p.extent(1));
  const int k = static_cast<int>(topk.extent(1));
  const bool renorm = rp.renormalize;
  const double invtemp = rp.inv_temperature;
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::router::backward_sigmoid", row_policy(space, T, E),
      KOKKOS_LAMBDA(const team& m) {
        const int t = m.league_rank();
        const GatePart<S, PView, IView, GView> gate_part(p, topk, gates, dg, t, k, renorm);
        const S n = inv_sum(t);
        S dot = 0;  // sum_e aux(e) s_e
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(m, E), [&](const int e, S& acc) { acc += p(t, e) * static_cast<S>(aux(e)); },
            dot);
        const S abar = dot * n;
        const S zt = static_cast<S>(zc) * lse(t);
        auto dz_of = [&](const int e, const S dse) {
          const S du = dse * p(t, e) * (S(1) - p(t, e)) + zt * q(t, e);
          return static_cast<S>(du * invtemp);
        };
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, E), [&](const int e) {
          dz(t, e) = dz_of(e, (static_cast<S>(aux(e)) - abar) * n);
        });
        m.team_barrier();
        Kokkos::single(Kokkos::PerTeam(m), [&]() {
          for (int j = 0; j < k; ++j) {
            const int e = topk(t, j);
            dz(t, e) = dz_of(e, (static_cast<S>(aux(e)) - abar) * n + gate_part(j));
          }
        });
      });
}

}  // namespace examoe::impl
