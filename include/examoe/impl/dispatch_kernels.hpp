// Dispatch kernels: the stable counting sort that is the position tracking, and the
// row gathers of dispatch and combine. No atomics: every output row has one writer, and
// every result is a fixed-order sum, so results are bitwise reproducible.
#pragma once
#include <examoe/impl/bf16.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/row_policy.hpp>
#include <examoe/impl/sums_in_order.hpp>

#include <cstring>
#include <type_traits>

namespace examoe::impl {

/// One contiguous block of expert-input rows: rows [dest, dest+count) of local expert `l`
/// coming from rank `src`. `from` is, for src == me, the first sorted slot (index into perm);
/// otherwise the first row in the dispatch receive buffer.
struct RowBlock {
  int dest, count, from, local;  // local: 1 when the rows come from this rank
};

/// The return location of a dropped assignment (MoEConfig::capacity_factor): it has no row,
/// and adds nothing to the combine or the gate gradients.
constexpr int kDroppedRow = -2147483647 - 1;

/// A part of the expert rows: all of them, the rows that never left this rank (kept: ready
/// before the dispatch arrives) or the rows that came from other ranks (received).
enum class ExpertRows { all, kept, received };

/// How a chunk ranks its assignments among the chunk's assignments of the same key.
/// running_count: one thread walks the chunk and counts (O(chunk) per chunk: host backends,
/// whose teams are one thread); team_count: every thread of the team ranks its own
/// assignment by counting the same keys before it (O(chunk) per assignment, all in parallel:
/// GPUs). Both give the same ranks; automatic picks by the space.
enum class ChunkRanks { automatic, running_count, team_count };

/// Stable counting sort of keys[A] in [0, K), in chunks of `chunk` assignments, no atomics:
///   1. histogram: hist[key][c] = assignments of chunk c with that key (one team per chunk;
///      each assignment's rank among its chunk's same keys is kept in inv_perm);
///   2. exclusive scan of hist in (key, chunk) order: where chunk c's run of key starts;
///   3. scatter: slot s = hist[key][c] + rank, one thread per assignment.
/// The sorted order is by key, then by assignment index (stable), whatever the chunking.
/// Out: perm[s] = a (sorted slot -> assignment), inv_perm[a] = s, key_start[K+1] (all of it,
/// for any A >= 0). hist holds at least K * ceil(A / chunk) entries.
template <class Space, class KView, class HView, class PView, class SView>
void stable_counting_sort(const Space& space, const KView& keys, int K, int chunk,
                          const HView& hist, const PView& perm, const PView& inv_perm,
                          const SView& key_start, ChunkRanks ranks = ChunkRanks::automatic) {
  const int A = static_cast<int>(keys.extent(0));
  const int C = (A + chunk - 1) / chunk;
  const bool running = ranks == ChunkRanks::running_count ||
                       (ranks == ChunkRanks::automatic && !kc::device_memory_v<Space>);
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::dispatch::histogram", row_policy(space, C, chunk),
      KOKKOS_LAMBDA(const team& m) {
        const int c = m.league_rank(), begin = c * chunk, end = kc::min(A, begin + chunk);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, K), [&](const int key) { hist(key * C + c) = 0; });
        m.team_barrier();
        if (running) {
          Kokkos::single(Kokkos::PerTeam(m), [&]() {
            for (int a = begin; a < end; ++a) inv_perm(a) = hist(keys(a) * C + c)++;
          });
        } else {
          // Rank = same keys before a in the chunk; the last of its key writes the count.
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, begin, end), [&](const int a) {
            const int key = keys(a);
            int before = 0, after = 0;
            for (int b = begin; b < a; ++b) before += keys(b) == key ? 1 : 0;
            for (int b = a + 1; b < end; ++b) after += keys(b) == key ? 1 : 0;
            inv_perm(a) = before;
            if (after == 0) hist(key * C + c) = before + 1;
          });
        }
      });
  Kokkos::parallel_scan(
      "examoe::dispatch::scan", Kokkos::RangePolicy<Space>(space, 0, K * C),
      KOKKOS_LAMBDA(const int i, int& acc, const bool final) {
        const int v = hist(i);
        if (final) hist(i) = acc;
        acc += v;
      });
  // Every entry of key_start is written on every call, also when there are no chunks
  // (A = 0: every key starts at 0), so no count of an earlier call survives.
  Kokkos::parallel_for(
      "examoe::dispatch::key_start", Kokkos::RangePolicy<Space>(space, 0, K + 1),
      KOKKOS_LAMBDA(const int key) { key_start(key) = key < K && C > 0 ? hist(key * C) : A; });
  Kokkos::parallel_for(
      "examoe::dispatch::scatter", Kokkos::RangePolicy<Space>(space, 0, A),
      KOKKOS_LAMBDA(const int a) {
        const int s = hist(keys(a) * C + a / chunk) + inv_perm(a);
        perm(s) = a;
        inv_perm(a) = s;
      });
}

/// Whether a row kernel runs as host loops over rows of one type (the host paths below): a host
/// backend, float or double rows, the same type on the wire (and in every view), contiguous rows.
template <class Space, class S, class W, class... Views>
inline constexpr bool host_row_loops_v =
    !kc::device_memory_v<Space> && std::is_same<S, W>::value &&
    (std::is_same<S, float>::value || std::is_same<S, double>::value) &&
    (std::is_same<typename Views::non_const_value_type, S>::value && ...) &&
    (std::is_same<typename Views::array_layout, Kokkos::LayoutRight>::value && ...);

/// Row `from` of x into row `to` of `out`, times g where `scaled` (host row loops).
template <class S>
inline void copy_row_on_host(S* to, const S* from, bool scaled, S g, int d) {
  if (scaled)
    host::scale_row(to, from, g, d);
  else
    std::memcpy(to, from, sizeof(S) * static_cast<std::size_t>(d));  // = 1 * x
}

/// Index of the block holding expert row q (blocks sorted by dest; empty blocks skipped).
template <class BView>
KOKKOS_INLINE_FUNCTION int find_block(const BView& blocks, int nblocks, int q) {
  int lo = 0, hi = nblocks;  // first block with dest > q
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (blocks(mid).dest <= q) lo = mid + 1; else hi = mid;
  }
  return lo - 1;
}

/// Dispatch pack: send[p] = scale(a) * x[a / k] for the p-th sorted slot outside this rank's
/// own block [self_begin, self_begin + self_count). scale = gates when given (backward). The
/// send buffer holds the wire type (the scalar, or bf16: impl/bf16.hpp).
template <class Space, class XView, class PView, class GView, class BufView>
void pack_rows(const Space& space, const XView& x, const PView& perm, int k, int self_begin,
               int self_count, const GView& gates, bool scaled, const BufView& send) {
  const int n = static_cast<int>(send.extent(0)), d = static_cast<int>(send.extent(1));
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  using W = typename BufView::non_const_value_type;
  using S = typename XView::non_const_value_type;
  if constexpr (host_row_loops_v<Space, S, W, XView, BufView, GView>) {
    // Host: a copy (or scaled copy) per row, the scattered source rows asked for ahead.
    auto assignment = [=](const int p) { return perm(p < self_begin ? p : p + self_count); };
    Kokkos::parallel_for("examoe::dispatch::pack", Kokkos::RangePolicy<Space>(space, 0, n), [=](const int p) {
      if (p + host::kRowsAhead < n) host::prefetch(&x(assignment(p + host::kRowsAhead) / k, 0), sizeof(S) * d);
      const int a = assignment(p);
      copy_row_on_host(&send(p, 0), &x(a / k, 0), scaled, scaled ? gates(a / k, a % k) : S(1), d);
    });
    return;
  }
  Kokkos::parallel_for(
      "examoe::dispatch::pack", row_policy(space, n, d),
      KOKKOS_LAMBDA(const team& m) {
        const int p = m.league_rank();
        const int s = p < self_begin ? p : p + self_count;
        const int a = perm(s);
        const int t = a / k;
        const auto g = scaled ? gates(t, a % k) : 1;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d),
                             [&](const int c) { send(p, c) = to_wire<W>(g * x(t, c)); });
      });
}

/// Dispatch regroup: expert-input row q = its block's source row, either a received row or,
/// for rows that never left this rank, scale(a) * x[a / k] directly. `which` rows only (the
/// kept ones may be regrouped while the received ones are still in flight).
template <class Space, class BView, class XView, class PView, class GView, class WireView, class BufView>
void gather_expert_rows(const Space& space, const BView& blocks, int nblocks, int nrows,
                        const XView& x, const PView& perm, int k, const GView& gates, bool scaled,
                        const WireView& recv, const BufView& xe, ExpertRows which = ExpertRows::all) {
  const int d = static_cast<int>(xe.extent(1));
  using S = typename BufView::non_const_value_type;
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int skip_local = which == ExpertRows::received ? 1 : 0, skip_remote = which == ExpertRows::kept ? 1 : 0;
  using W = typename WireView::non_const_value_type;
  if constexpr (host_row_loops_v<Space, S, W, XView, WireView, BufView, GView>) {
    // Host: block by block (no search per row), a copy (or scaled copy) per row, the scattered
    // rows of x asked for ahead. The blocks cover the nrows rows.
    (void)nrows;
    Kokkos::parallel_for(
        "examoe::dispatch::regroup", Kokkos::RangePolicy<Space>(space, 0, nblocks), [=](const int bi) {
          const RowBlock b = blocks(bi);
          if (b.count == 0 || (b.local ? skip_local : skip_remote)) return;
          for (int r = 0; r < b.count; ++r) {
            S* to = &xe(b.dest + r, 0);
            if (!b.local) {
              std::memcpy(to, &recv(b.from + r, 0), sizeof(S) * static_cast<std::size_t>(d));
              continue;
            }
            if (r + host::kRowsAhead < b.count)
              host::prefetch(&x(perm(b.from + r + host::kRowsAhead) / k, 0), sizeof(S) * d);
            const int a = perm(b.from + r), t = a / k;
            copy_row_on_host(to, &x(t, 0), scaled, scaled ? gates(t, a % k) : S(1), d);
          }
        });
    return;
  }
  Kokkos::parallel_for(
      "examoe::dispatch::regroup", row_policy(space, nrows, d),
      KOKKOS_LAMBDA(const team& m) {
        const int q = m.league_rank();
        const RowBlock b = blocks(find_block(blocks, nblocks, q));
        if (b.local ? skip_local : skip_remote) return;
        const int i = b.from + (q - b.dest);
        if (b.local) {
          const int a = perm(i);
          const int t = a / k;
          const auto g = scaled ? gates(t, a % k) : 1;
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d),
                               [&](const int c) { xe(q, c) = g * x(t, c); });
        } else {
          Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d),
                               [&](const int c) { xe(q, c) = from_wire<S>(recv(i, c)); });
        }
      });
}

/// Combine pack: rows of remote blocks go back to their source rank, in the layout they
/// arrived in (the receive buffer's layout).
template <class Space, class BView, class BufView, class WireView>
void pack_back_rows(const Space& space, const BView& blocks, int nblocks, int nrows,
                    const BufView& ye, const WireView& back_send) {
  const int d = static_cast<int>(ye.extent(1));
  using W = typename WireView::non_const_value_type;
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::combine::pack", row_policy(space, nrows, d),
      KOKKOS_LAMBDA(const team& m) {
        const int q = m.league_rank();
        const RowBlock b = blocks(find_block(blocks, nblocks, q));
        if (b.local) return;
        const int i = b.from + (q - b.dest);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d),
                             [&](const int c) { back_send(i, c) = to_wire<W>(ye(q, c)); });
      });
}

/// Where the result row of assignment a lives after the reverse exchange: loc >= 0 is a row
/// of this rank's expert output, loc < 0 is row -1-loc of the combine receive buffer.

/// Combine: out[t] = beta_out * out[t] + sum_j w(t,j) * row(loc[t*k+j]), in order j = 0..k-1,
/// with w = gates (forward) or 1 (backward dx); a dropped assignment (kDroppedRow) adds nothing.
/// One team per token, its threads over the d
/// elements; every element is summed in the same order j = 0..k-1 (the partial sum lives in
/// out[t] between the k passes, which each thread makes over the same elements). On host
/// backends with rows of one type, a vector loop per token (host::combine_row), bitwise the
/// same (the team kernel with `team_kernel`: the tests compare the two).
template <class Space, class LView, class GView, class BufView, class WireView, class OView>
void combine_rows(const Space& space, const LView& loc, int k, const GView& gates, bool weighted,
                  const BufView& ye, const WireView& back_recv, bool accumulate, const OView& out,
                  bool team_kernel = false) {
  const int T = static_cast<int>(out.extent(0)), d = static_cast<int>(out.extent(1));
  using S = typename BufView::non_const_value_type;
  using O = typename OView::non_const_value_type;
  using W = typename WireView::non_const_value_type;
  if constexpr (host_row_loops_v<Space, S, W, BufView, WireView, OView, GView>) {
    // Host rows of one type: a vector loop per token (host::combine_row).
    constexpr int kMax = 16;
    if (!team_kernel && d > 0 && k <= kMax) {
      Kokkos::parallel_for(
          "examoe::combine::gather", Kokkos::RangePolicy<Space>(space, 0, T), [=](const int t) {
            auto row_of = [&](const int a) -> const S* {
              const int l = loc(a);
              return l == kDroppedRow ? nullptr : l >= 0 ? &ye(l, 0) : &back_recv(-1 - l, 0);
            };
            if (t + host::kRowsAhead < T)  // the rows are scattered: ask for later ones early
              for (int j = 0; j < k; ++j)
                if (const S* r = row_of((t + host::kRowsAhead) * k + j)) host::prefetch(r, sizeof(S) * d);
            const S* rows[kMax];
            S w[kMax];
            for (int j = 0; j < k; ++j) {
              rows[j] = row_of(t * k + j);
              w[j] = gates(t, j);
            }
            host::combine_row(&out(t, 0), rows, weighted ? w : nullptr, k, d, accumulate);
          });
      return;
    }
  }
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::combine::gather", row_policy(space, T, d),
      KOKKOS_LAMBDA(const team& m) {
        const int t = m.league_rank();
        for (int j = 0; j < k; ++j) {
          const int l = loc(t * k + j);
          const bool fresh = j == 0 && !accumulate;  // out[t] holds no partial sum yet
          const auto w = gates(t, j);
          if (l == kDroppedRow) {
            if (fresh) Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d), [&](const int c) { out(t, c) = O(0); });
          } else if (l >= 0) {
            Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d), [&](const int c) {
              const O acc = fresh ? O(0) : out(t, c);
              const S v = ye(l, c);
              out(t, c) = acc + (weighted ? w * v : v);
            });
          } else {
            Kokkos::parallel_for(Kokkos::TeamThreadRange(m, d), [&](const int c) {
              const O acc = fresh ? O(0) : out(t, c);
              const S v = from_wire<S>(back_recv(-1 - l, c));
              out(t, c) = acc + (weighted ? w * v : v);
            });
          }
        }
      });
}

/// Gate gradients: dg[t][j] = <dout[t], row(loc[t*k+j])>, 0 for a dropped assignment. One team per assignment, its
/// threads over the d elements, on GPUs (the team's fixed-order reduction, the same every run).
/// On host backends the sum runs in element order, kSumsInOrder assignments at once where the
/// rows are contiguous and of one type (the team kernel otherwise, or with `team_kernel`: the
/// tests compare the two).
template <class Space, class LView, class BufView, class WireView, class DView, class GView>
void gate_grads(const Space& space, const LView& loc, int k, const BufView& ye,
                const WireView& back_recv, const DView& dout, const GView& dg, bool team_kernel = false) {
  const int T = static_cast<int>(dout.extent(0)), d = static_cast<int>(dout.extent(1));
  using S = typename BufView::non_const_value_type;
  using G = typename GView::non_const_value_type;
  using W = typename WireView::non_const_value_type;
  constexpr bool rows_contiguous = std::is_same<typename BufView::array_layout, Kokkos::LayoutRight>::value &&
                                   std::is_same<typename WireView::array_layout, Kokkos::LayoutRight>::value &&
                                   std::is_same<typename DView::array_layout, Kokkos::LayoutRight>::value;
  if constexpr (!kc::device_memory_v<Space> && std::is_same<W, S>::value && rows_contiguous) {  // host, rows of S
    if (!team_kernel) {  // kSumsInOrder assignments at once, each sum over its two rows in order
      const int A = T * k, B = kSumsInOrder;
      Kokkos::parallel_for(
          "examoe::combine::gate_grads", Kokkos::RangePolicy<Space>(space, 0, (A + B - 1) / B), [=](const int b) {
            const int a0 = b * B, m = A - a0 < B ? A - a0 : B;
            const S* x[kSumsInOrder] = {};
            const S* y[kSumsInOrder] = {};
            bool dropped[kSumsInOrder] = {};
            for (int j = 0; j < m; ++j) {
              const int a = a0 + j, l = loc(a);
              dropped[j] = l == kDroppedRow;
              x[j] = &dout(a / k, 0);
              y[j] = l >= 0 ? &ye(l, 0) : dropped[j] ? x[j] : &back_recv(-1 - l, 0);  // dropped: any row, result 0
            }
            G s[kSumsInOrder];
            bool summed = false;
            if constexpr (std::is_same<S, float>::value && std::is_same<G, float>::value) {
              if (m == B) {  // eight at once, vectorized (host::sums_in_order_8, the same sums)
                host::sums_in_order_8(x, y, nullptr, d, s);
                summed = true;
              }
            }
            if (!summed) sums_in_order(m, d, [&](const int j, const int c) -> G { return x[j][c] * y[j][c]; }, s);
            for (int j = 0; j < m; ++j) dg((a0 + j) / k, (a0 + j) % k) = dropped[j] ? G(0) : s[j];
          });
      return;
    }
  }
  using team = typename Kokkos::TeamPolicy<Space>::member_type;
  Kokkos::parallel_for(
      "examoe::combine::gate_grads", row_policy(space, T * k, d),
      KOKKOS_LAMBDA(const team& m) {
        const int a = m.league_rank(), t = a / k, l = loc(a);
        G s = 0;
        if (l == kDroppedRow)
          s = 0;
        else if (l >= 0)
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, d), [&](const int c, G& acc) { acc += dout(t, c) * ye(l, c); }, s);
        else
          Kokkos::parallel_reduce(
              Kokkos::TeamThreadRange(m, d),
              [&](const int c, G& acc) { acc += dout(t, c) * from_wire<S>(back_recv(-1 - l, c)); }, s);
        Kokkos::single(Kokkos::PerTeam(m), [&]() { dg(t, a % k) = s; });
      });
}

}  // namespace examoe::impl
