// MoELayer against the dense double reference, at any rank count (registered at 1..4 ranks; the
// rank-count tests also at 8 and 16, ctest label "scale").
//
// Every rank builds the same global problem from a seed, takes an uneven contiguous slice of
// the tokens (some ranks get none), and sets the replicated router weight and its local
// experts' weights from the global arrays. The distributed forward/backward must match the
// reference: out, dx (local slices), dWr (full), dW1/dW2/dW3 (local experts), aux and z
// losses, top-k ids, gates and the dispatch statistics.
#include "test_util.hpp"

#include <examoe/metrics.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <type_traits>
#include <vector>

namespace examoe::test {
namespace {

enum class PlacementMode {
  balanced,      ///< config.placement empty
  all_on_rank0,  ///< explicit: rank 0 owns every expert, the others none
  reversed,      ///< explicit: owner[e] = (E - 1 - e) % P
};

struct LayerCase {
  const char* name;
  int E, k, d, h, T;
  Activation act;
  bool renormalize;
  double temperature, alpha, beta;
  Routing routing;
  bool empty_rank1;  ///< rank 1 gets no tokens (when P > 1)
  PlacementMode placement;
  std::uint64_t seed;
};

std::ostream& operator<<(std::ostream& os, const LayerCase& c) { return os << c.name; }

MoEConfig make_config(const LayerCase& c, int P) {
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.router.renormalize = c.renormalize;
  cfg.router.temperature = c.temperature;
  cfg.router.aux_loss_coef = c.alpha;
  cfg.router.z_loss_coef = c.beta;
  cfg.placement.clear();
  if (c.placement == PlacementMode::all_on_rank0) cfg.placement.assign(c.E, 0);
  if (c.placement == PlacementMode::reversed)
    for (int e = 0; e < c.E; ++e) cfg.placement.push_back((c.E - 1 - e) % P);
  return cfg;
}

Placement expected_placement(const MoEConfig& cfg, int P) {
  return cfg.placement.empty() ? Placement::balanced(cfg.num_experts, P)
                               : Placement::from_owners(cfg.placement, P);
}

// clang-format off
const LayerCase kCases[] = {
  //  name                            E   k   d   h   T  act                renorm temp  alpha  beta  routing               empty1 placement                    seed
  {"gelu_E4_k1",                      4,  1,  8, 12, 24, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,     101},
  {"gelu_E4_k2_plain_temp07",         4,  2, 12, 16, 37, Activation::gelu,  false, 0.7, 5e-2, 1e-2, Routing::random,       true, PlacementMode::balanced,     202},
  {"gelu_E4_k4_all_experts",          4,  4,  8, 12, 22, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,     303},
  {"swiglu_E6_k2_temp15",             6,  2, 10, 20, 45, Activation::swiglu, true, 1.5, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,     404},
  {"swiglu_E8_k4_plain",              8,  4, 16, 24, 60, Activation::swiglu,false, 1.0, 2e-2, 5e-3, Routing::random,       true, PlacementMode::balanced,     505},
  {"gelu_E16_k4_temp2",              16,  4, 12, 18, 50, Activation::gelu,   true, 2.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,     606},
  {"gelu_E16_k1_plain",              16,  1,  8, 12, 33, Activation::gelu,  false, 1.0, 1e-2, 1e-3, Routing::random,       true, PlacementMode::balanced,     707},
  {"swiglu_E16_k2_temp05_noloss",    16,  2,  8, 16, 40, Activation::swiglu, true, 0.5, 0.0,  0.0,  Routing::random,      false, PlacementMode::reversed,     808},
  {"all_to_expert0_gelu_k1",          8,  1,  8, 12, 30, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::all_to_zero, false, PlacementMode::balanced,     909},
  {"all_to_expert0_swiglu_k2_plain",  4,  2, 12, 16, 28, Activation::swiglu,false, 0.8, 1e-2, 1e-3, Routing::all_to_zero,  true, PlacementMode::balanced,    1010},
  {"experts_all_on_rank0_gelu_k2",    6,  2,  8, 12, 26, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::all_on_rank0, 1111},
  {"reversed_placement_swiglu_k4",    8,  4, 10, 14, 35, Activation::swiglu, true, 1.2, 3e-2, 2e-3, Routing::random,       true, PlacementMode::reversed,    1212},
  {"tiny_T3_gelu_E4_k2",              4,  2,  8, 12,  3, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,    1313},
  // Blocks of rows longer than a chunk of the host schedule (Experts::chunk_rows: 264 rows in
  // double, 528 in float at these widths): chunk boundaries inside the kept and the received
  // blocks (in double at 1-4 ranks, in float at 1-2). Every token to one expert: a random
  // routing of this many tokens takes long to find with a float top-k margin.
  {"chunks_all_to_expert0_gelu_k1",   4,  1,  8, 240,2400, Activation::gelu, true, 1.0, 1e-2, 1e-3, Routing::all_to_zero, false, PlacementMode::balanced,    1414},
  {"chunks_all_to_expert0_swiglu_k1", 4,  1,  8, 160,1200, Activation::swiglu,true, 1.0, 1e-2, 1e-3, Routing::all_to_zero, false, PlacementMode::balanced,    1515},
  // Rows too wide for 256 of them in a chunk: every block is one chunk.
  {"wide_rows_gelu_E4_k2",            4,  2,  8, 600, 300, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,    1616},
  // Experts whose weights exceed 1 MiB (float and double): by expert, their kept rows run
  // while the exchanges travel and their received rows after (two visits); smaller experts
  // are visited once (Experts::one_visit).
  {"large_experts_two_visits_gelu",   4,  2, 16,8200,  40, Activation::gelu,   true, 1.0, 1e-2, 1e-3, Routing::random,      false, PlacementMode::balanced,    1717},
};
// clang-format on

/// Everything one forward + backward produced on this rank, on the host, in double.
struct StepResult {
  std::vector<double> out, dx, dWr, dW1, dW2, dW3, gates;
  std::vector<int> topk;
  double aux = 0.0, z = 0.0;
};

template <class Scalar>
StepResult collect(const MoELayer<Scalar>& layer, const Matrix<Scalar>& out,
                   const Matrix<Scalar>& dx) {
  StepResult r;
  r.out = to_host(out);
  r.dx = to_host(dx);
  r.dWr = to_host(layer.router_grad());
  r.dW1 = to_host(layer.w1_grad());
  r.dW2 = to_host(layer.w2_grad());
  if (layer.config().activation == Activation::swiglu) r.dW3 = to_host(layer.w3_grad());
  r.gates = to_host(layer.gates());
  r.topk = to_host_int(layer.topk_experts());
  r.aux = layer.losses().aux;
  r.z = layer.losses().z;
  return r;
}

/// Local problem of this rank: its token slice as views, plus the global inputs.
template <class Scalar>
struct LocalProblem {
  MoEConfig cfg;
  RefInputs in;
  std::vector<int> off;  ///< token offsets per rank
  int t0 = 0, T = 0;
  Matrix<Scalar> x, out, dout, dx;

  LocalProblem(const MoEConfig& c, int Tg, std::uint64_t seed, Routing routing, bool empty_rank1,
               double min_gap)
      : cfg(c) {
    constexpr bool is_float = std::is_same_v<Scalar, float>;
    const std::uint64_t s = seed_with_margin(cfg, Tg, seed, routing, is_float, min_gap);
    in = make_inputs(cfg, Tg, s, routing, is_float);
    off = split_tokens(Tg, world_size(), empty_rank1);
    t0 = off[world_rank()];
    T = off[world_rank() + 1] - t0;
    x = make_matrix<Scalar>(in.x, t0, T, cfg.d_model, "test::x");
    dout = make_matrix<Scalar>(in.dout, t0, T, cfg.d_model, "test::dout");
    out = Matrix<Scalar>("test::out", T, cfg.d_model);
    dx = Matrix<Scalar>("test::dx", T, cfg.d_model);
  }
};

template <class Scalar>
void run_vs_reference(const LayerCase& c) {
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  const double tol = is_float ? 1e-5 : 1e-12;
  const int P = world_size(), rank = world_rank();
  const MoEConfig cfg = make_config(c, P);
  const int d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts, k = cfg.top_k;

  LocalProblem<Scalar> pb(cfg, c.T, c.seed, c.routing, c.empty_rank1, is_float ? 1e-3 : 1e-9);
  const RefResult ref = reference_moe(cfg, pb.in);
  const int t0 = pb.t0, T = pb.T;

  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);
  const Placement pl = expected_placement(cfg, P);
  EXPECT_TRUE(layer.placement() == pl) << "layer placement:\n"
                                       << layer.placement().to_string() << "expected:\n"
                                       << pl.to_string();
  EXPECT_EQ(layer.num_local_experts(), pl.num_local(rank));
  EXPECT_EQ(layer.communicator().size(), P);
  EXPECT_EQ(layer.communicator().rank(), rank);
  set_layer_weights(layer, pb.in);

  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  const StepResult got = collect(layer, pb.out, pb.dx);

  // Router decisions. With the margin check these agree exactly, also in float.
  EXPECT_EQ(got.topk, std::vector<int>(ref.topk.begin() + t0 * k, ref.topk.begin() + (t0 + T) * k))
      << "top-k experts of the local tokens";
  EXPECT_TRUE(close_to("gates", got.gates, rows_of(ref.gates, t0, T, k), tol));
  if (c.routing == Routing::all_to_zero) {
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(got.topk[t * k], 0) << "token " << t0 + t;
    }
  }

  // Values.
  EXPECT_TRUE(close_to("out", got.out, rows_of(ref.out, t0, T, d), tol));
  EXPECT_TRUE(close_to("dx", got.dx, rows_of(ref.dx, t0, T, d), tol));
  EXPECT_TRUE(close_to("dWr (router_grad)", got.dWr, ref.dWr, tol));
  const std::size_t dh = static_cast<std::size_t>(d) * h;
  EXPECT_TRUE(close_to("dW1 (local experts)", got.dW1, local_expert_slices(ref.dW1, pl, rank, dh), tol));
  EXPECT_TRUE(close_to("dW2 (local experts)", got.dW2, local_expert_slices(ref.dW2, pl, rank, dh), tol));
  if (cfg.activation == Activation::swiglu) {
    EXPECT_TRUE(close_to("dW3 (local experts)", got.dW3, local_expert_slices(ref.dW3, pl, rank, dh), tol));
  } else {
    EXPECT_EQ(layer.w3().extent(0) * layer.w3().extent(1) * layer.w3().extent(2), 0u)
        << "w3 must be empty for GELU";
  }
  EXPECT_TRUE(scalar_close("aux loss", got.aux, ref.aux, tol));
  EXPECT_TRUE(scalar_close("z loss", got.z, ref.z, tol));

  // Dispatch statistics, counted independently from the top-k ids and the placement.
  const LayerStats& st = layer.stats();
  std::int64_t sent = 0, local_rows = 0, received = 0;
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = got.topk[t * k + j];
      if (e < 0 || e >= E) {
        ADD_FAILURE() << "expert id " << e << " out of range";
        continue;
      }
      (pl.owner(e) == rank ? local_rows : sent) += 1;
    }
  for (int tg = 0; tg < c.T; ++tg) {
    if (tg >= t0 && tg < t0 + T) continue;
    for (int j = 0; j < k; ++j) received += pl.owner(ref.topk[tg * k + j]) == rank ? 1 : 0;
  }
  const std::int64_t row_bytes = static_cast<std::int64_t>(d) * sizeof(Scalar);
  EXPECT_EQ(st.tokens, T);
  EXPECT_EQ(st.assignments, static_cast<std::int64_t>(T) * k);
  EXPECT_EQ(st.rows_sent, sent);
  EXPECT_EQ(st.rows_local, local_rows);
  EXPECT_EQ(st.rows_received, received);
  EXPECT_EQ(st.expert_rows, local_rows + received);
  EXPECT_EQ(st.bytes_sent_dispatch, st.rows_sent * row_bytes);
  EXPECT_EQ(st.bytes_recv_dispatch, st.rows_received * row_bytes);
  EXPECT_EQ(st.bytes_sent_combine, st.rows_received * row_bytes);
  EXPECT_EQ(st.bytes_recv_combine, st.rows_sent * row_bytes);
  EXPECT_EQ(st.tokens_per_expert, ref.counts) << "global tokens per expert";
  std::vector<std::int64_t> per_local;
  for (int l = 0; l < pl.num_local(rank); ++l) per_local.push_back(ref.counts[pl.global_expert(rank, l)]);
  EXPECT_EQ(st.rows_per_local_expert, per_local);
  // The GEMM blocks: rows from each source rank's tokens, counted from the reference's choices.
  std::vector<std::int64_t> per_block(static_cast<std::size_t>(pl.num_local(rank)) * P, 0);
  for (int src = 0; src < P; ++src)
    for (int tg = pb.off[src]; tg < pb.off[src + 1]; ++tg)
      for (int j = 0; j < k; ++j) {
        const int e = ref.topk[tg * k + j];
        if (pl.owner(e) == rank) ++per_block[static_cast<std::size_t>(pl.local_index(e)) * P + src];
      }
  EXPECT_EQ(st.rows_per_block, per_block);
  std::int64_t mine[2] = {st.rows_sent, st.rows_received}, tot[2] = {0, 0};
  MPI_Allreduce(mine, tot, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(tot[0], tot[1]) << "sum over ranks of rows_sent != sum of rows_received";
  EXPECT_GE(st.imbalance, 1.0 - 1e-12);
}

class LayerVsReference : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerVsReference, Double) { run_vs_reference<double>(GetParam()); }
TEST_P(LayerVsReference, Float) { run_vs_reference<float>(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Configs, LayerVsReference, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<LayerCase>& i) {
                           return std::string(i.param.name);
                         });

// ---------------------------------------------------------------------------------------------
// Determinism: two identical steps give bitwise identical results.

template <class Scalar>
void check_determinism(const LayerCase& c) {
  const int P = world_size();
  const MoEConfig cfg = make_config(c, P);
  LocalProblem<Scalar> pb(cfg, c.T, c.seed, c.routing, c.empty_rank1, 0.0);
  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);
  set_layer_weights(layer, pb.in);

  layer.zero_grad();
  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  const StepResult a = collect(layer, pb.out, pb.dx);
  layer.zero_grad();
  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  const StepResult b = collect(layer, pb.out, pb.dx);

  EXPECT_TRUE(bitwise_equal(a.out, b.out)) << "out";
  EXPECT_TRUE(bitwise_equal(a.dx, b.dx)) << "dx";
  EXPECT_TRUE(bitwise_equal(a.dWr, b.dWr)) << "dWr";
  EXPECT_TRUE(bitwise_equal(a.dW1, b.dW1)) << "dW1";
  EXPECT_TRUE(bitwise_equal(a.dW2, b.dW2)) << "dW2";
  EXPECT_TRUE(bitwise_equal(a.dW3, b.dW3)) << "dW3";
  EXPECT_TRUE(bitwise_equal(a.gates, b.gates)) << "gates";
  EXPECT_EQ(a.topk, b.topk);
  EXPECT_EQ(a.aux, b.aux);
  EXPECT_EQ(a.z, b.z);

  // Without zero_grad, gradients accumulate: a third step doubles them.
  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  const StepResult c2 = collect(layer, pb.out, pb.dx);
  auto twice = [](std::vector<double> v) {
    for (auto& x : v) x *= 2.0;
    return v;
  };
  const double tol = std::is_same_v<Scalar, float> ? 1e-6 : 1e-14;
  EXPECT_TRUE(close_to("accumulated dWr", c2.dWr, twice(a.dWr), tol));
  EXPECT_TRUE(close_to("accumulated dW1", c2.dW1, twice(a.dW1), tol));
  EXPECT_TRUE(close_to("accumulated dW2", c2.dW2, twice(a.dW2), tol));
  EXPECT_TRUE(close_to("accumulated dW3", c2.dW3, twice(a.dW3), tol));
  EXPECT_TRUE(bitwise_equal(a.dx, c2.dx)) << "dx is overwritten, not accumulated";
}

TEST(LayerDeterminism, DoubleSwiGLU) { check_determinism<double>(kCases[4]); }
TEST(LayerDeterminism, DoubleSwiGLUReversedPlacement) { check_determinism<double>(kCases[11]); }
TEST(LayerDeterminism, FloatGelu) { check_determinism<float>(kCases[5]); }

// ---------------------------------------------------------------------------------------------
// Rank-count invariance: the distributed layer equals one layer holding every token on rank 0.

struct SelfComparison {
  bool out_bitwise = false, dx_bitwise = false, dWr_bitwise = false, dW_bitwise = false;
};

/// Runs the distributed layer and, on rank 0, a layer on MPI_COMM_SELF with all tokens;
/// compares out, dx, dWr, all expert gradients and the losses.
SelfComparison compare_with_self(const MoEConfig& cfg, int Tg, std::uint64_t seed, bool empty_rank1,
                                 bool training, double tol) {
  SelfComparison res;
  const int rank = world_rank();
  const int d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts;
  const std::size_t dh = static_cast<std::size_t>(d) * h;
  LocalProblem<double> pb(cfg, Tg, seed, Routing::random, empty_rank1, 0.0);

  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  set_layer_weights(layer, pb.in);
  layer.forward(pb.x, pb.out, training);
  layer.backward(pb.dout, pb.dx);
  const StepResult got = collect(layer, pb.out, pb.dx);

  // Expert gradients in global [E][...] order on rank 0 (each entry has one contributor).
  auto globalize = [&](const std::vector<double>& local) {
    std::vector<double> g(E * dh, 0.0), sum(rank == 0 ? E * dh : 0);
    const Placement& pl = layer.placement();
    for (int l = 0; l < pl.num_local(rank) && (l + 1) * dh <= local.size(); ++l)
      std::copy(local.begin() + l * dh, local.begin() + (l + 1) * dh,
                g.begin() + pl.global_expert(rank, l) * dh);
    MPI_Reduce(g.data(), sum.data(), static_cast<int>(g.size()), MPI_DOUBLE, MPI_SUM, 0,
               MPI_COMM_WORLD);
    return sum;
  };
  const std::vector<double> out_all = gather_to_root(got.out);
  const std::vector<double> dx_all = gather_to_root(got.dx);
  const std::vector<double> dW1_all = globalize(got.dW1);
  const std::vector<double> dW2_all = globalize(got.dW2);
  const std::vector<double> dW3_all =
      cfg.activation == Activation::swiglu ? globalize(got.dW3) : std::vector<double>();

  if (rank == 0) {
    MoEConfig self_cfg = cfg;
    self_cfg.placement.clear();
    MoELayer<double> self(self_cfg, MPI_COMM_SELF);
    EXPECT_EQ(self.num_local_experts(), E);
    set_layer_weights(self, pb.in);
    Matrix<double> x = make_matrix<double>(pb.in.x, 0, Tg, d, "test::x_all");
    Matrix<double> dout = make_matrix<double>(pb.in.dout, 0, Tg, d, "test::dout_all");
    Matrix<double> out("test::out_all", Tg, d), dx("test::dx_all", Tg, d);
    self.forward(x, out, training);
    self.backward(dout, dx);
    const StepResult s = collect(self, out, dx);
    EXPECT_TRUE(close_to("out (distributed vs single rank)", out_all, s.out, tol));
    EXPECT_TRUE(close_to("dx (distributed vs single rank)", dx_all, s.dx, tol));
    EXPECT_TRUE(close_to("dWr (distributed vs single rank)", got.dWr, s.dWr, tol));
    EXPECT_TRUE(close_to("dW1 (distributed vs single rank)", dW1_all, s.dW1, tol));
    EXPECT_TRUE(close_to("dW2 (distributed vs single rank)", dW2_all, s.dW2, tol));
    if (cfg.activation == Activation::swiglu) {
      EXPECT_TRUE(close_to("dW3 (distributed vs single rank)", dW3_all, s.dW3, tol));
    }
    EXPECT_TRUE(scalar_close("aux (distributed vs single rank)", got.aux, s.aux, tol));
    EXPECT_TRUE(scalar_close("z (distributed vs single rank)", got.z, s.z, tol));
    res.out_bitwise = bitwise_equal(out_all, s.out);
    res.dx_bitwise = bitwise_equal(dx_all, s.dx);
    res.dWr_bitwise = bitwise_equal(got.dWr, s.dWr);
    res.dW_bitwise = bitwise_equal(dW1_all, s.dW1) && bitwise_equal(dW2_all, s.dW2) &&
                     bitwise_equal(dW3_all, s.dW3);
  }
  return res;
}

void report_bitwise(const char* what, const SelfComparison& r) {
  if (world_rank() != 0) return;
  std::printf("[ rank-count ] %s at %d ranks vs 1: out %s, dx %s, dWr %s, dW1/2/3 %s\n", what,
              world_size(), r.out_bitwise ? "bitwise" : "not bitwise",
              r.dx_bitwise ? "bitwise" : "not bitwise", r.dWr_bitwise ? "bitwise" : "not bitwise",
              r.dW_bitwise ? "bitwise" : "not bitwise");
  std::fflush(stdout);
  ::testing::Test::RecordProperty("out_bitwise", r.out_bitwise ? "yes" : "no");
}

TEST(LayerRankCount, MatchesSingleRankGelu) {
  const MoEConfig cfg = make_config(kCases[5], world_size());  // E16 k4 temp 2
  report_bitwise("gelu_E16_k4", compare_with_self(cfg, 50, 31, false, true, 1e-13));
}

TEST(LayerRankCount, MatchesSingleRankSwiGLUEmptyRank) {
  const MoEConfig cfg = make_config(kCases[1], world_size());
  MoEConfig c2 = cfg;
  c2.activation = Activation::swiglu;
  report_bitwise("swiglu_E4_k2", compare_with_self(c2, 37, 32, true, true, 1e-13));
}

TEST(LayerRankCount, MatchesSingleRankInRowChunks) {
  MoEConfig cfg = make_config(kCases[14], world_size());  // SwiGLU, rows of 264 per chunk
  cfg.top_k = 2;  // random routing: blocks of about 2400 * 2 / 4 / P rows, several chunks
  report_bitwise("chunks_swiglu_E4_k2", compare_with_self(cfg, 2400, 33, false, true, 1e-13));
}

// Shapes that hold at any rank count (the "scale" label runs them at 8 and 16 ranks): the
// expert count follows P, so that every rank owns experts, or only some of them do.
TEST(LayerManyRanks, UnevenExpertsAndFewTokensSwiGLU) {
  const int P = world_size();
  // E = 2P + 3: balanced placement gives some ranks 3 experts and the others 2; 3 tokens per
  // rank on average with rank 1 holding none, so most ranks send to and receive from few peers.
  MoEConfig cfg = small_config(2 * P + 3, 2, Activation::swiglu, 8, 12);
  report_bitwise("swiglu_E2P+3_k2", compare_with_self(cfg, 3 * P + 2, 41, true, true, 1e-13));
}

TEST(LayerManyRanks, ExpertsOnEveryOtherRankGelu) {
  const int P = world_size();
  // 8 experts, owned by the even ranks only (explicit placement): odd ranks hold tokens but no
  // experts; k = 4 of 8 with temperature 2 spreads every token over several owners.
  MoEConfig cfg = small_config(8, 4, Activation::gelu, 12, 16);
  cfg.router.temperature = 2.0;
  const int owners = (P + 1) / 2;
  for (int e = 0; e < cfg.num_experts; ++e) cfg.placement.push_back(2 * (e % owners));
  report_bitwise("gelu_E8_k4_even_owners", compare_with_self(cfg, 5 * P + 1, 42, false, true, 1e-13));
}

// Jitter: off in eval (then the jitter-free reference holds); in training the noise is keyed by
// the global token index, so the distributed result equals the single-rank one.
TEST(LayerJitter, EvalIgnoresJitterAndTrainingIsRankCountInvariant) {
  MoEConfig cfg = make_config(kCases[3], world_size());  // swiglu E6 k2
  cfg.router.jitter = 0.5;
  cfg.router.seed = 1234;
  const int Tg = 45;
  {
    LocalProblem<double> pb(cfg, Tg, 77, Routing::random, true, 1e-9);
    const RefResult ref = reference_moe(cfg, pb.in);
    MoELayer<double> layer(cfg, MPI_COMM_WORLD);
    set_layer_weights(layer, pb.in);
    layer.forward(pb.x, pb.out, /*training=*/false);
    const std::vector<double> out_eval = to_host(pb.out);
    EXPECT_TRUE(close_to("out (eval, jitter ignored)", out_eval, rows_of(ref.out, pb.t0, pb.T, cfg.d_model), 1e-12));
    layer.forward(pb.x, pb.out, /*training=*/true);
    const std::vector<double> out_train = to_host(pb.out);
    double local_diff = 0.0;
    for (std::size_t i = 0; i < out_train.size(); ++i)
      local_diff = std::max(local_diff, std::fabs(out_train[i] - out_eval[i]));
    double diff = 0.0;
    MPI_Allreduce(&local_diff, &diff, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_GT(diff, 1e-6) << "jitter 0.5 in training changed nothing";
  }
  report_bitwise("jitter_swiglu_E6_k2", compare_with_self(cfg, Tg, 78, true, true, 1e-13));
}

// ---------------------------------------------------------------------------------------------
// Aux-loss-free balancing: the selection bias moves by rate * sign(mean load - load) from the
// global counts of the training forwards since the last update, the same on every rank, and a
// bias larger than the scores' spread sends every token to the experts that were least loaded.

TEST(LayerRouterBias, UpdatesFromGlobalLoadsAndSteersTokens) {
  MoEConfig cfg = small_config(4, 1, Activation::gelu);
  cfg.router.score = RouterScore::sigmoid;
  cfg.router.bias_rate = 1.0;
  const int Tg = 24;
  LocalProblem<double> pb(cfg, Tg, 91, Routing::all_to_zero, true, 0.0);
  pb.in.bias.assign(4, 0.0);
  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  set_layer_weights(layer, pb.in);
  layer.set_router_bias(pb.in.bias);
  auto same_on_every_rank = [](const std::vector<double>& b) {
    std::vector<double> lo(b.size()), hi(b.size());
    MPI_Allreduce(b.data(), lo.data(), static_cast<int>(b.size()), MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(b.data(), hi.data(), static_cast<int>(b.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return lo == hi;
  };

  // Every token to expert 0: loads (24, 0, 0, 0), mean 6.
  layer.forward(pb.x, pb.out);
  EXPECT_EQ(layer.stats().tokens_per_expert, (std::vector<std::int64_t>{24, 0, 0, 0}));
  layer.update_router_bias();
  EXPECT_EQ(layer.router_bias(), (std::vector<double>{-1, 1, 1, 1}));
  EXPECT_TRUE(same_on_every_rank(layer.router_bias()));

  // Now no token picks expert 0, the gates are the scores' (k = 1: exactly 1) and the output
  // is the reference's with that bias.
  pb.in.bias = layer.router_bias();
  const RefResult ref = reference_moe(cfg, pb.in);
  layer.forward(pb.x, pb.out);
  for (int v : to_host_int(layer.topk_experts())) EXPECT_NE(v, 0);
  EXPECT_EQ(layer.stats().tokens_per_expert, ref.counts);
  EXPECT_EQ(ref.counts[0], 0);
  EXPECT_TRUE(close_to("out with the bias", to_host(pb.out), rows_of(ref.out, pb.t0, pb.T, cfg.d_model), 1e-12));
  for (double g : to_host(layer.gates())) EXPECT_EQ(g, 1.0);

  // An eval forward does not count; the update uses the training forward's loads only.
  layer.forward(pb.x, pb.out, /*training=*/false);
  layer.update_router_bias();
  std::vector<double> want = pb.in.bias;
  for (int e = 0; e < 4; ++e) {
    const double gap = Tg / 4.0 - static_cast<double>(ref.counts[e]);
    want[e] += gap > 0 ? 1.0 : gap < 0 ? -1.0 : 0.0;
  }
  EXPECT_EQ(layer.router_bias(), want);
  // No forward since: nothing to move.
  layer.update_router_bias();
  EXPECT_EQ(layer.router_bias(), want);
  EXPECT_TRUE(same_on_every_rank(layer.router_bias()));
  // A bias of the wrong size is refused.
  EXPECT_THROW(layer.set_router_bias(std::vector<double>(3, 0.0)), Error);
}

// ---------------------------------------------------------------------------------------------
// init_parameters: by global expert id, the same model at any rank count.

TEST(LayerInit, SameModelAtAnyRankCount) {
  MoEConfig cfg = make_config(kCases[11], world_size());  // swiglu E8, reversed placement
  const int rank = world_rank(), d = cfg.d_model, h = cfg.d_hidden;
  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  layer.init_parameters(2024);
  MoEConfig self_cfg = cfg;
  self_cfg.placement.clear();
  MoELayer<double> self(self_cfg, MPI_COMM_SELF);
  self.init_parameters(2024);
  const std::size_t dh = static_cast<std::size_t>(d) * h;
  const Placement& pl = layer.placement();

  EXPECT_TRUE(bitwise_equal(to_host(layer.router_weight()), to_host(self.router_weight())));
  EXPECT_TRUE(bitwise_equal(to_host(layer.w1()), local_expert_slices(to_host(self.w1()), pl, rank, dh)));
  EXPECT_TRUE(bitwise_equal(to_host(layer.w2()), local_expert_slices(to_host(self.w2()), pl, rank, dh)));
  EXPECT_TRUE(bitwise_equal(to_host(layer.w3()), local_expert_slices(to_host(self.w3()), pl, rank, dh)));

  // U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not degenerate.
  auto check_range = [](const std::vector<double>& v, double bound, const char* what) {
    double mx = 0.0;
    for (double a : v) mx = std::max(mx, std::fabs(a));
    EXPECT_LE(mx, bound * (1 + 1e-12)) << what;
    EXPECT_GT(mx, 0.5 * bound) << what;
  };
  check_range(to_host(self.router_weight()), 1.0 / std::sqrt(double(d)), "Wr");
  check_range(to_host(self.w1()), 1.0 / std::sqrt(double(d)), "W1");
  check_range(to_host(self.w3()), 1.0 / std::sqrt(double(d)), "W3");
  check_range(to_host(self.w2()), 1.0 / std::sqrt(double(h)), "W2");

  const std::vector<double> wr_old = to_host(self.router_weight());
  const std::vector<double> w1_old = to_host(self.w1());
  self.init_parameters(2025);
  EXPECT_FALSE(bitwise_equal(to_host(self.router_weight()), wr_old)) << "seed ignored (Wr)";
  EXPECT_FALSE(bitwise_equal(to_host(self.w1()), w1_old)) << "seed ignored (W1)";
  self.init_parameters(2024);
  EXPECT_TRUE(bitwise_equal(to_host(self.w1()), w1_old)) << "init_parameters not repeatable";
}

// ---------------------------------------------------------------------------------------------
// Steady state: a second step with the same shapes allocates nothing.

std::int64_t g_allocations = 0;
std::vector<std::string> g_allocation_labels;

void count_allocation(const Kokkos::Tools::SpaceHandle, const char* label, const void*,
                      const std::uint64_t size) {
  ++g_allocations;
  if (g_allocation_labels.size() < 20)
    g_allocation_labels.push_back(std::string(label ? label : "?") + " (" + std::to_string(size) +
                                  " bytes)");
}

template <class Scalar>
void check_no_allocation(const LayerCase& c) {
  const MoEConfig cfg = make_config(c, world_size());
  LocalProblem<Scalar> pb(cfg, c.T, c.seed, c.routing, c.empty_rank1, 0.0);
  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);
  set_layer_weights(layer, pb.in);
  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  const std::int64_t before = layer.workspace_allocations();

  g_allocations = 0;
  g_allocation_labels.clear();
  Kokkos::Tools::Experimental::set_allocate_data_callback(&count_allocation);
  layer.zero_grad();
  layer.forward(pb.x, pb.out);
  layer.backward(pb.dout, pb.dx);
  Kokkos::Tools::Experimental::set_allocate_data_callback(nullptr);
  const std::int64_t counted = g_allocations;

  EXPECT_EQ(layer.workspace_allocations(), before) << "the workspace grew in a steady-state step";
  std::string labels;
  for (const auto& l : g_allocation_labels) labels += "\n  " + l;
  EXPECT_EQ(counted, 0) << "Kokkos allocations in a steady-state step:" << labels;
}

TEST(LayerSteadyState, NoAllocationGelu) { check_no_allocation<double>(kCases[5]); }
TEST(LayerSteadyState, NoAllocationExpertlessRanks) {
  check_no_allocation<double>(kCases[10]);
}
TEST(LayerSteadyState, NoAllocationFloat) { check_no_allocation<float>(kCases[4]); }

}  // namespace
}  // namespace examoe::test
