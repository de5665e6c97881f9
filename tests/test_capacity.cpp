// Expert capacity and token dropping (MoEConfig::capacity_factor): ONE layer per case driven
// through many steps of random per-rank token counts (0, 1, ragged, skewed), each against the
// independent reference with the capacity rule (tests/reference.cpp), forward and every
// gradient; the corner cases C = 1 (below one row per expert), every token to one expert,
// exact ties in the gates (Wr = 0: the token index decides), a factor so large that nothing
// drops (bitwise the dropless layer); overlap on and off; bf16 rows against RefWire; the same
// choice and result as one rank holding everything; bitwise run to run. Registered at 1..4
// ranks (ctest capacity.npN).
#include "test_util.hpp"

#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/model.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace examoe::test {
namespace {

/// How a step's inputs route tokens: at random, every token's top-1 to expert 0, or with
/// Wr = 0 (every gate equal: the capacity keeps the lowest global token indices).
enum class Route { random, all_to_zero, ties };

/// Per-rank token counts of step s (the same draw on every rank): the first steps force
/// many everywhere, only rank 0, everyone empty, skewed; then 0, 1, a few or many at random.
std::vector<int> step_tokens(int s, int P, Rng& rng) {
  std::vector<int> t(P, 0);
  for (int r = 0; r < P; ++r) {
    switch (s) {
      case 0: t[r] = 30 + r; break;
      case 1: t[r] = r == 0 ? 41 : 0; break;
      case 2: t[r] = 0; break;
      case 3: t[r] = 1 + 15 * r; break;
      default: {
        const int kind = rng.below(10);
        t[r] = kind < 2 ? 0 : kind < 3 ? 1 : kind < 6 ? 2 + rng.below(6) : 20 + rng.below(40);
      }
    }
  }
  return t;
}

/// Inputs of one step whose top-k and capacity decisions are `gap` away from flipping (ties
/// routing: exact ties, which both sides break the same way). The same on every rank.
RefInputs step_inputs(const MoEConfig& cfg, int Tg, std::uint64_t seed, Route route, bool is_float,
                      RefResult& ref, const RefWire* wire) {
  const double gap = is_float ? 1e-4 : 1e-9;
  for (int tries = 0; tries < 200; ++tries, ++seed) {
    RefInputs in = make_inputs(cfg, Tg, seed, route == Route::all_to_zero ? Routing::all_to_zero : Routing::random,
                               is_float);
    if (route == Route::ties) std::fill(in.Wr.begin(), in.Wr.end(), 0.0);
    ref = reference_moe(cfg, in, wire);
    if (route == Route::ties || (ref.min_topk_gap >= gap && ref.min_capacity_gap >= gap)) return in;
  }
  ADD_FAILURE() << "no inputs with decision margin " << gap << " found (T = " << Tg << ", last gaps "
                << ref.min_topk_gap << ", " << ref.min_capacity_gap << ")";
  return {};
}

struct Case {
  const char* name;
  int E, k, d, h;
  Activation act;
  double capacity_factor;
};

struct Options {
  bool overlap = true;
  DispatchDtype wire = DispatchDtype::scalar;
  bool migrate = true;  // move the experts every few steps
};

/// One layer through `steps` ragged steps against the reference with the capacity rule.
template <class Scalar>
void capacity_steps(const Case& c, int steps, std::uint64_t seed, Options o = {}) {
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  const double tol = is_float ? 5e-5 : 1e-12;
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.capacity_factor = c.capacity_factor;
  cfg.overlap_exchange = o.overlap;
  cfg.dispatch_dtype = o.wire;
  const std::size_t dh = static_cast<std::size_t>(c.d) * c.h;
  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);
  Rng rng(seed);
  std::int64_t dropped_seen = 0, steps_with_empty_rank = 0;
  for (int s = 0; s < steps; ++s) {
    if (o.migrate && s > 0 && s % 5 == 0) {
      std::vector<int> owner(c.E);
      for (auto& w : owner) w = rng.below(P);
      layer.set_placement(Placement::from_owners(owner, P));
    }
    const std::vector<int> counts = step_tokens(s, P, rng);
    // Every token to expert 0 puts its gates within 1e-7 of 1: float cannot order them (they
    // round to ties), so float runs the other two.
    Route route = static_cast<Route>(rng.below(3));
    if (is_float && route == Route::all_to_zero) route = Route::random;
    std::vector<int> off(P + 1, 0);
    for (int r = 0; r < P; ++r) off[r + 1] = off[r] + counts[r];
    const int Tg = off[P], t0 = off[rank], T = counts[rank];
    steps_with_empty_rank += T == 0 ? 1 : 0;
    const Placement& pl = layer.placement();
    RefWire wire;
    for (int r = 0; r < P; ++r)
      for (int t = off[r]; t < off[r + 1]; ++t) wire.token_rank.push_back(r);
    for (int e = 0; e < c.E; ++e) wire.expert_rank.push_back(pl.owner(e));
    RefResult ref;
    const RefInputs in = step_inputs(cfg, Tg, seed * 1000 + s, route, is_float, ref,
                                     o.wire == DispatchDtype::bf16 ? &wire : nullptr);
    set_layer_weights(layer, in);
    Matrix<Scalar> x = make_matrix<Scalar>(in.x, t0, T, c.d, "test::x");
    Matrix<Scalar> dout = make_matrix<Scalar>(in.dout, t0, T, c.d, "test::dout");
    Matrix<Scalar> out("test::out", T, c.d), dx("test::dx", T, c.d);
    layer.zero_grad();
    layer.forward(x, out);
    layer.backward(dout, dx);

    const std::string at = std::string(c.name) + " step " + std::to_string(s) + " (T = " + std::to_string(T) +
                           " here, " + std::to_string(Tg) + " in all, route " +
                           std::to_string(static_cast<int>(route)) + ", C = " + std::to_string(ref.capacity) + ")";
    const LayerStats& st = layer.stats();
    EXPECT_EQ(st.capacity, ref.capacity) << at;
    EXPECT_EQ(st.dropped_per_expert, ref.dropped) << at;
    EXPECT_EQ(st.tokens_per_expert, ref.counts) << at;  // the router's choices, before dropping
    EXPECT_TRUE(close_to("out, " + at, to_host(out), rows_of(ref.out, t0, T, c.d), tol));
    EXPECT_TRUE(close_to("dx, " + at, to_host(dx), rows_of(ref.dx, t0, T, c.d), tol));
    EXPECT_TRUE(close_to("dWr, " + at, to_host(layer.router_grad()), ref.dWr, tol));
    EXPECT_TRUE(close_to("dW1, " + at, to_host(layer.w1_grad()), local_expert_slices(ref.dW1, pl, rank, dh), tol));
    EXPECT_TRUE(close_to("dW2, " + at, to_host(layer.w2_grad()), local_expert_slices(ref.dW2, pl, rank, dh), tol));
    if (c.act == Activation::swiglu)
      EXPECT_TRUE(close_to("dW3, " + at, to_host(layer.w3_grad()), local_expert_slices(ref.dW3, pl, rank, dh), tol));
    EXPECT_TRUE(scalar_close("aux, " + at, layer.losses().aux, ref.aux, tol)) << at;
    // The buffers are bounded: no more than C rows per local expert are received or computed,
    // and only kept rows cross ranks.
    std::int64_t kept_here = 0, kept_sent = 0;
    for (int t = t0; t < t0 + T; ++t)
      for (int j = 0; j < c.k; ++j) {
        const int tj = t * c.k + j;
        kept_here += ref.kept[tj];
        kept_sent += ref.kept[tj] && pl.owner(ref.topk[tj]) != rank ? 1 : 0;
      }
    EXPECT_EQ(st.rows_sent, kept_sent) << at;
    EXPECT_EQ(st.rows_local + st.rows_sent, kept_here) << at;
    for (std::int64_t rows : st.rows_per_local_expert) EXPECT_LE(rows, ref.capacity) << at;
    for (auto n : ref.dropped) dropped_seen += n;
    if (!all_ranks(!::testing::Test::HasFailure())) return;  // one step's report is enough
  }
  EXPECT_GT(dropped_seen, 0) << c.name << ": no step dropped anything";
  EXPECT_GT(allreduce_sum(static_cast<double>(steps_with_empty_rank)), 0.0) << "no rank ever held zero tokens";
}

// C = ceil(cf k T / E): 1e-6 gives C = 1 at every T > 0 (below one row per expert).
const Case kGelu{"gelu_E4_k2_cf1", 4, 2, 8, 12, Activation::gelu, 1.0};
const Case kSwiglu{"swiglu_E6_k2_cf1.25", 6, 2, 10, 14, Activation::swiglu, 1.25};
const Case kOneRow{"gelu_E8_k2_C1", 8, 2, 8, 10, Activation::gelu, 1e-6};
const Case kManyExperts{"gelu_E16_k4_cf0.5", 16, 4, 8, 10, Activation::gelu, 0.5};

TEST(Capacity, StepsDoubleGelu) { capacity_steps<double>(kGelu, 8, 11); }
TEST(Capacity, StepsDoubleSwiglu) { capacity_steps<double>(kSwiglu, 8, 12); }
TEST(Capacity, StepsDoubleOneRowPerExpert) { capacity_steps<double>(kOneRow, 6, 13); }
TEST(Capacity, StepsDoubleManyExpertsOverlapOff) { capacity_steps<double>(kManyExperts, 6, 14, {false}); }
TEST(Capacity, StepsFloatSwiglu) { capacity_steps<float>(kSwiglu, 6, 15); }
TEST(Capacity, StepsDoubleBf16RowsAgainstRefWire) {
  capacity_steps<double>(kGelu, 6, 16, {true, DispatchDtype::bf16, true});
}

/// Runs one forward and backward; returns out, dx, dWr, dW1, dW2 (local) and the drops.
template <class Scalar>
std::vector<std::vector<double>> step_results(MoELayer<Scalar>& layer, const RefInputs& in, int t0, int T) {
  const int d = layer.config().d_model;
  set_layer_weights(layer, in);
  Matrix<Scalar> x = make_matrix<Scalar>(in.x, t0, T, d, "test::x");
  Matrix<Scalar> dout = make_matrix<Scalar>(in.dout, t0, T, d, "test::dout");
  Matrix<Scalar> out("test::out", T, d), dx("test::dx", T, d);
  layer.zero_grad();
  layer.forward(x, out);
  layer.backward(dout, dx);
  const auto& dr = layer.stats().dropped_per_expert;
  return {to_host(out), to_host(dx), to_host(layer.router_grad()), to_host(layer.w1_grad()),
          to_host(layer.w2_grad()), std::vector<double>(dr.begin(), dr.end())};
}

// A factor so large that no expert reaches its capacity: bitwise the dropless layer (the
// same plan, the same GEMMs), step after step; and the capacity layer bitwise run to run.
TEST(Capacity, LargeFactorIsDroplessBitwiseAndRunToRun) {
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(6, 2, Activation::swiglu, 10, 14);
  MoEConfig big = cfg;
  big.capacity_factor = 1e6;
  MoEConfig tight = cfg;
  tight.capacity_factor = 0.75;
  MoELayer<double> dropless(cfg, MPI_COMM_WORLD), large(big, MPI_COMM_WORLD), capped(tight, MPI_COMM_WORLD);
  Rng rng(21);
  for (int s = 0; s < 5; ++s) {
    const std::vector<int> counts = step_tokens(s, P, rng);
    int t0 = 0, Tg = 0;
    for (int r = 0; r < P; ++r) (r < rank ? t0 : Tg) += counts[r];
    Tg += t0;
    const RefInputs in = make_inputs(cfg, Tg, 2100 + s, s % 3 == 1 ? Routing::all_to_zero : Routing::random, false);
    const auto a = step_results(dropless, in, t0, counts[rank]);
    const auto b = step_results(large, in, t0, counts[rank]);
    const auto c1 = step_results(capped, in, t0, counts[rank]);
    const auto c2 = step_results(capped, in, t0, counts[rank]);
    for (std::size_t j = 0; j < a.size(); ++j) {
      EXPECT_TRUE(bitwise_equal(a[j], b[j])) << "dropless vs cf 1e6, result " << j << ", step " << s;
      EXPECT_TRUE(bitwise_equal(c1[j], c2[j])) << "cf 0.75 run to run, result " << j << ", step " << s;
    }
    EXPECT_EQ(large.stats().capacity, Tg > 0 ? static_cast<long long>(std::ceil(1e6 * 2 * Tg / 6.0)) : 0);
    if (!all_ranks(!::testing::Test::HasFailure())) return;
  }
}

// The same global inputs on P ranks and on one rank holding every token and expert (the
// layer on MPI_COMM_SELF): the same drops, the same result (to rounding: BLAS rounds rows of
// GEMMs of other heights differently), with the experts in random places.
TEST(Capacity, SameChoiceAndResultAsOneRank) {
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(8, 2, Activation::gelu, 8, 12);
  cfg.capacity_factor = 1.0;
  MoEConfig one = cfg;
  MoELayer<double> dist(cfg, MPI_COMM_WORLD), self(one, MPI_COMM_SELF);
  Rng rng(31);
  std::int64_t dropped = 0;
  for (int s = 0; s < 5; ++s) {
    std::vector<int> owner(cfg.num_experts);
    for (auto& w : owner) w = rng.below(P);
    dist.set_placement(Placement::from_owners(owner, P));
    const std::vector<int> counts = step_tokens(s, P, rng);
    int t0 = 0, Tg = 0;
    for (int r = 0; r < P; ++r) (r < rank ? t0 : Tg) += counts[r];
    Tg += t0;
    RefResult ref;
    const RefInputs in = step_inputs(cfg, Tg, 3100 + s, s % 2 ? Route::random : Route::ties, false, ref, nullptr);
    const auto d = step_results(dist, in, t0, counts[rank]);
    const auto o = step_results(self, in, 0, Tg);
    EXPECT_EQ(d[5], o[5]) << "drops per expert, step " << s;
    EXPECT_TRUE(close_to("out", d[0], rows_of(o[0], t0, counts[rank], cfg.d_model), 1e-13)) << s;
    EXPECT_TRUE(close_to("dx", d[1], rows_of(o[1], t0, counts[rank], cfg.d_model), 1e-13)) << s;
    EXPECT_TRUE(close_to("dWr", d[2], o[2], 1e-13)) << s;
    EXPECT_TRUE(close_to("dW1", d[3], local_expert_slices(o[3], dist.placement(), rank, 8 * 12), 1e-13)) << s;
    for (double v : o[5]) dropped += static_cast<std::int64_t>(v);
    if (!all_ranks(!::testing::Test::HasFailure())) return;
  }
  EXPECT_GT(dropped, 0);
}

// The memory estimate counts the experts' side of the rows at their bound, C per local expert.
// By hand, d = 8, h = 12, E = 4, k = 2, ep = 2, 10 tokens per rank, in doubles: router state
// 10 (3E + 3k) = 180 values, sending side A 2d = 20 * 16 = 320; experts' side (6d + 5h = 108 per
// row) dropless A = 20 rows (2160), with f = 0.5 2 local experts x C = ceil(0.5 2 20 / 4) = 5.
TEST(Capacity, MemoryEstimateCountsTheBound) {
  ModelConfig mc;
  mc.d_model = 8;
  mc.d_hidden = 12;
  mc.num_experts = 4;
  mc.top_k = 2;
  EXPECT_EQ(estimate_moe_layer_memory(mc, 2, 10, 8).buffers, (180u + 320u + 20u * 108u) * 8u);
  mc.capacity_factor = 0.5;
  EXPECT_EQ(estimate_moe_layer_memory(mc, 2, 10, 8).buffers, (180u + 320u + 10u * 108u) * 8u);
  mc.capacity_factor = 3.0;  // C = 30 per expert: more than the rank's share, still the bound
  EXPECT_EQ(estimate_moe_layer_memory(mc, 2, 10, 8).buffers, (180u + 320u + 60u * 108u) * 8u);
}

// A fixed data-parallel split, dp = 2, at two expert-parallel degrees: each replica's group of
// P/2 ranks (ep = P/2) against the replica's tokens on one rank (ep = 1), the statistics over
// both replicas in either case. C follows each group's own batch; the drops and the results
// are the same. (Other dp splits give other groups, hence other C: not compared.)
TEST(Capacity, SameAtEveryEpForAFixedDp) {
  const int P = world_size(), rank = world_rank();
  if (P % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  const int ep = P / 2, replica = rank / ep, in_group = rank % ep;
  MPI_Comm group, leaders;
  MPI_Comm_split(MPI_COMM_WORLD, replica, rank, &group);
  MPI_Comm_split(MPI_COMM_WORLD, in_group == 0 ? 0 : MPI_UNDEFINED, rank, &leaders);
  MoEConfig cfg = small_config(4, 2, Activation::gelu, 8, 12);
  cfg.capacity_factor = 0.75;
  MoELayerOptions wide;
  wide.comm = group;
  wide.stats_comm = MPI_COMM_WORLD;
  MoELayer<double> split(cfg, wide);
  std::unique_ptr<MoELayer<double>> alone;  // the replica's leader: ep = 1
  if (leaders != MPI_COMM_NULL) {
    MoELayerOptions one;
    one.comm = MPI_COMM_SELF;
    one.stats_comm = leaders;
    alone = std::make_unique<MoELayer<double>>(cfg, one);
  }
  Rng rng(41);
  std::int64_t dropped = 0;
  for (int s = 0; s < 5; ++s) {
    // Per-rank counts of the whole world; replica r's tokens are ranks [r ep, (r+1) ep).
    const std::vector<int> counts = step_tokens(s, P, rng);
    int Tg = 0, t0 = 0, g0 = 0, Tr = 0;
    for (int r = 0; r < P; ++r) {
      if (r < rank) t0 += counts[r];
      if (r / ep < replica) g0 += counts[r];
      if (r / ep == replica) Tr += counts[r];
      Tg += counts[r];
    }
    const RefInputs in = make_inputs(cfg, Tg, 4100 + s, s % 2 ? Routing::random : Routing::all_to_zero, false);
    const auto a = step_results(split, in, t0, counts[rank]);
    std::vector<double> out_alone;
    if (alone) {
      const auto b = step_results(*alone, in, g0, Tr);
      EXPECT_EQ(a[5], b[5]) << "drops per expert, step " << s;
      EXPECT_TRUE(close_to("dWr", a[2], b[2], 1e-13)) << s;
      out_alone = b[0];
      for (double v : b[5]) dropped += static_cast<std::int64_t>(v);
    }
    // The leader's rows of the replica, sent to every rank of its group.
    out_alone.resize(static_cast<std::size_t>(Tr) * cfg.d_model);
    MPI_Bcast(out_alone.data(), static_cast<int>(out_alone.size()), MPI_DOUBLE, 0, group);
    EXPECT_TRUE(close_to("out", a[0], rows_of(out_alone, t0 - g0, counts[rank], cfg.d_model), 1e-13)) << s;
  }
  if (alone) EXPECT_GT(dropped, 0);
  alone.reset();
  if (leaders != MPI_COMM_NULL) MPI_Comm_free(&leaders);
  MPI_Comm_free(&group);
}

}  // namespace
}  // namespace examoe::test
