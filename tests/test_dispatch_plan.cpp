// DispatchPlan and MigrationPlan (src/layer) against brute-force host references.
//
// Every rank draws every rank's assignments from the same seeded generator, so each rank
// can compute the whole exchange by counting, independently of the plan's counting sort,
// count exchange and block layout.
#include "layer/dispatch_plan.hpp"
#include "layer/migration_plan.hpp"
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/placement.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

namespace examoe::test {
namespace {

using impl::DispatchPlan;
using impl::MigrationPlan;

using Space = Kokkos::DefaultExecutionSpace;

/// Experts owned by random ranks (some ranks may own none), or balanced blocks.
Placement random_placement(std::mt19937& rng, int E, int P) {
  if (rng() % 3 == 0) return Placement::balanced(E, P);
  std::vector<int> owner(E);
  for (int& o : owner) o = static_cast<int>(rng() % P);
  return Placement::from_owners(owner, P);
}

/// One step's assignments of every rank: topk[r] is rank r's [T_r][k], row-major.
struct Step {
  int k = 1;
  std::vector<std::vector<int>> topk;
  int tokens(int r) const { return static_cast<int>(topk[r].size()) / k; }
};

/// Step `s`: random token counts (zero included), a rank without tokens, everything to one
/// expert, no tokens anywhere, in turn.
Step make_step(std::mt19937& rng, int s, int E, int P) {
  Step st;
  const int mode = s % 5;
  st.k = mode == 2 ? 1 : 1 + static_cast<int>(rng() % std::min(E, 3));
  const int one = static_cast<int>(rng() % E);
  st.topk.resize(P);
  for (int r = 0; r < P; ++r) {
    int T = static_cast<int>(rng() % 41);
    if (mode == 1 && (r + s) % 2 == 0) T = 0;
    if (mode == 3) T = 0;
    for (int t = 0; t < T; ++t) {
      std::vector<int> e(E);
      for (int i = 0; i < E; ++i) e[i] = i;
      std::shuffle(e.begin(), e.end(), rng);
      for (int j = 0; j < st.k; ++j) st.topk[r].push_back(mode == 2 ? one : e[j]);
    }
  }
  return st;
}

template <class V>
std::vector<int> to_host_ints(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<int>(h.data(), h.data() + h.extent(0));
}

/// The plan of rank `me` for step `st` under `pl`, checked against counting.
void check_plan(const DispatchPlan& plan, const Step& st, const Placement& pl, int me) {
  const int P = pl.num_ranks(), E = pl.num_experts();
  const std::vector<int>& mine = st.topk[me];
  const int A = static_cast<int>(mine.size());
  ASSERT_TRUE(plan.complete());
  ASSERT_EQ(plan.tokens(), st.tokens(me));
  ASSERT_EQ(plan.assignments(), A);

  // perm: the assignments in (owner rank, local index) order, ties in assignment order.
  std::vector<int> ref_perm(A);
  for (int a = 0; a < A; ++a) ref_perm[a] = a;
  std::stable_sort(ref_perm.begin(), ref_perm.end(),
                   [&](int a, int b) { return pl.key(mine[a]) < pl.key(mine[b]); });
  const std::vector<int> perm = to_host_ints(plan.perm()), inv = to_host_ints(plan.inv_perm());
  ASSERT_EQ(perm, ref_perm);
  for (int s = 0; s < A; ++s) ASSERT_EQ(inv[ref_perm[s]], s);

  // cnt[r][e]: rank r's assignments to expert e.
  std::vector<std::vector<int>> cnt(P, std::vector<int>(E, 0));
  for (int r = 0; r < P; ++r)
    for (int e : st.topk[r]) ++cnt[r][e];
  for (int e = 0; e < E; ++e) EXPECT_EQ(plan.assignments_to(e), cnt[me][e]) << "expert " << e;

  std::vector<int> sc(P, 0), rc(P, 0), sd(P, 0), rd(P, 0);
  int self = 0, before_self = 0;
  for (int e = 0; e < E; ++e) {
    const int o = pl.owner(e);
    if (o == me) self += cnt[me][e];
    if (o < me) before_self += cnt[me][e];
    if (o != me) sc[o] += cnt[me][e];
    for (int r = 0; r < P; ++r)
      if (o == me && r != me) rc[r] += cnt[r][e];
  }
  for (int r = 1; r < P; ++r) {
    sd[r] = sd[r - 1] + sc[r - 1];
    rd[r] = rd[r - 1] + rc[r - 1];
  }
  EXPECT_EQ(plan.send_counts(), sc);
  EXPECT_EQ(plan.recv_counts(), rc);
  EXPECT_EQ(plan.send_displs(), sd);
  EXPECT_EQ(plan.recv_displs(), rd);
  EXPECT_EQ(plan.self_begin(), before_self);
  EXPECT_EQ(plan.self_count(), self);
  EXPECT_EQ(plan.rows_sent(), A - self);
  int received = 0;
  for (int r = 0; r < P; ++r) received += rc[r];
  EXPECT_EQ(plan.rows_received(), received);

  // Expert rows: local expert lx's rows are every rank's assignments to it, by source rank.
  const int nloc = pl.num_local(me);
  ASSERT_EQ(plan.num_local(), nloc);
  std::vector<int> begin(nloc + 1, 0);
  for (int lx = 0; lx < nloc; ++lx) {
    const int e = pl.global_expert(me, lx);
    int n = 0;
    for (int r = 0; r < P; ++r) n += cnt[r][e];
    begin[lx + 1] = begin[lx] + n;
  }
  for (int lx = 0; lx <= nloc; ++lx) EXPECT_EQ(plan.expert_row_begin(lx), begin[lx]) << "local expert " << lx;
  EXPECT_EQ(plan.expert_rows(), begin[nloc]);
  auto blocks = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.blocks());
  ASSERT_EQ(plan.num_blocks(), nloc * P);
  for (int lx = 0; lx < nloc; ++lx) {
    const int e = pl.global_expert(me, lx);
    int dest = begin[lx];
    for (int r = 0; r < P; ++r) {
      EXPECT_EQ(blocks(lx * P + r).dest, dest) << "block (" << lx << ", " << r << ")";
      EXPECT_EQ(blocks(lx * P + r).count, cnt[r][e]) << "block (" << lx << ", " << r << ")";
      dest += cnt[r][e];
    }
  }

  // Return locations: own experts' rows in the expert rows; the others in the combine
  // receive buffer, laid out like the send buffer.
  const std::vector<int> loc = to_host_ints(plan.return_location());
  for (int a = 0; a < A; ++a) {
    const int e = mine[a], o = pl.owner(e);
    int earlier_same_dest = 0, earlier_same_expert = 0;
    for (int b = 0; b < A; ++b) {
      const bool before = pl.key(mine[b]) < pl.key(e) || (mine[b] == e && b < a);
      if (pl.owner(mine[b]) == o && before) ++earlier_same_dest;
      if (mine[b] == e && b < a) ++earlier_same_expert;
    }
    if (o == me) {
      int row = begin[pl.local_index(e)] + earlier_same_expert;
      for (int r = 0; r < me; ++r) row += cnt[r][e];
      EXPECT_EQ(loc[a], row) << "assignment " << a;
    } else {
      EXPECT_EQ(loc[a], -1 - (sd[o] + earlier_same_dest)) << "assignment " << a;
    }
  }
}

TEST(DispatchPlan, MatchesCountingThroughRandomSteps) {
  const int P = world_size(), me = world_rank(), E = 6;
  std::shared_ptr<Communicator> comm(make_mpi_communicator(MPI_COMM_WORLD));
  const Space space;
  std::mt19937 rng(2024);  // the same stream on every rank
  Placement pl = Placement::balanced(E, P);
  DispatchPlan plan;
  plan.set_placement(space, pl, me);
  for (int s = 0; s < 40; ++s) {
    if (s % 3 == 2) {  // a new placement between steps
      pl = random_placement(rng, E, P);
      plan.set_placement(space, pl, me);
    }
    const Step st = make_step(rng, s, E, P);
    const int T = st.tokens(me);
    DispatchPlan::TopkView topk("topk", T, st.k);
    auto h = Kokkos::create_mirror_view(topk);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < st.k; ++j) h(t, j) = st.topk[me][t * st.k + j];
    Kokkos::deep_copy(topk, h);
    plan.sort(space, topk);
    EXPECT_FALSE(plan.complete());
    plan.exchange_counts(space, *comm);
    SCOPED_TRACE("step " + std::to_string(s));
    check_plan(plan, st, pl, me);
  }
}

TEST(DispatchPlan, MigrationMatchesBruteForce) {
  const int P = world_size(), me = world_rank(), E = 7;
  std::shared_ptr<Communicator> comm(make_mpi_communicator(MPI_COMM_WORLD));
  const Space space;
  impl::Collectives<Space> coll(*comm, space);
  std::mt19937 rng(77);
  const std::size_t block = 3;
  for (int trial = 0; trial < 12; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const Placement from = random_placement(rng, E, P), to = random_placement(rng, E, P);
    const MigrationPlan plan(from, to, me);
    // The plan: blocks that change rank, by (destination or source rank, global id).
    std::vector<int> sc(P, 0), rc(P, 0), send_blocks, recv_blocks;
    std::vector<std::pair<int, int>> kept;
    for (int r = 0; r < P; ++r)
      for (int e = 0; e < E; ++e) {
        if (from.owner(e) == me && to.owner(e) == r && r != me) {
          ++sc[r];
          send_blocks.push_back(from.local_index(e));
        }
        if (from.owner(e) == r && to.owner(e) == me && r != me) {
          ++rc[r];
          recv_blocks.push_back(to.local_index(e));
        }
      }
    for (int e = 0; e < E; ++e)
      if (from.owner(e) == me && to.owner(e) == me) kept.emplace_back(from.local_index(e), to.local_index(e));
    EXPECT_EQ(plan.exchange().send_counts, sc);
    EXPECT_EQ(plan.exchange().recv_counts, rc);
    EXPECT_EQ(plan.send_blocks(), send_blocks);
    EXPECT_EQ(plan.recv_blocks(), recv_blocks);
    EXPECT_EQ(plan.kept_blocks(), kept);
    EXPECT_EQ(plan.old_local(), from.num_local(me));
    EXPECT_EQ(plan.new_local(), to.num_local(me));

    // The data: expert e's block holds 1000 e + i wherever it lives.
    Kokkos::View<double*, Space::memory_space> old("old", from.num_local(me) * block);
    auto ho = Kokkos::create_mirror_view(old);
    for (int l = 0; l < from.num_local(me); ++l)
      for (std::size_t i = 0; i < block; ++i) ho(l * block + i) = 1000.0 * from.global_expert(me, l) + i;
    Kokkos::deep_copy(old, ho);
    const auto moved = impl::migrate_blocks(space, coll, plan, old.data(), block);
    auto hm = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), moved);
    ASSERT_EQ(hm.extent(0), to.num_local(me) * block);
    for (int l = 0; l < to.num_local(me); ++l)
      for (std::size_t i = 0; i < block; ++i)
        EXPECT_EQ(hm(l * block + i), 1000.0 * to.global_expert(me, l) + i) << "new local " << l;
  }
}

}  // namespace
}  // namespace examoe::test
