// Ragged work, the way the layer and the model are used: ONE instance driven through many
// steps whose per-rank token counts are drawn at random every step (0, 1, a few, many; every
// token to one expert; every rank empty at once), with the expert placement changed between
// steps. Each step is checked against an independent result: the dense double reference for
// the layer (forward and every gradient), the same model on one rank for the model.
// Registered at 1..4 ranks (ctest ragged.npN).
//
// This is the test that would have found the stale-count bug: a rank whose token count dropped
// to zero reused the previous step's per-expert counts.
#include "test_hdf5.hpp"
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>


#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace examoe::test {
namespace {

/// Token count of one rank at one step, by kind (the same draw on every rank).
int draw_tokens(Rng& rng) {
  const int kind = rng.below(10);
  if (kind < 3) return 0;                 // no tokens
  if (kind < 4) return 1;                 // one token
  if (kind < 7) return 2 + rng.below(6);  // a few
  return 30 + rng.below(50);              // many
}

/// Per-rank token counts of step s. The first steps force the transitions that matter:
/// many everywhere, then only rank 0 with tokens (the others drop to 0), then every rank 0,
/// then many again; later steps are random.
std::vector<int> step_tokens(int s, int P, Rng& rng) {
  std::vector<int> t(P, 0);
  for (int r = 0; r < P; ++r) {
    switch (s) {
      case 0: t[r] = 40 + r; break;
      case 1: t[r] = r == 0 ? 33 : 0; break;
      case 2: t[r] = 0; break;
      case 3: t[r] = 1 + 20 * r; break;
      default: t[r] = draw_tokens(rng);
    }
  }
  return t;
}

/// A random owner table for E experts on P ranks (ranks may own none).
std::vector<int> random_owners(int E, int P, Rng& rng) {
  std::vector<int> owner(E);
  for (auto& o : owner) o = rng.below(P);
  return owner;
}

struct RaggedCase {
  const char* name;
  int E, k, d, h;
  Activation act;
  bool renormalize;
};

/// The router's modes of a case (softmax, no bias, no groups by default).
struct RouterModes {
  RouterScore score = RouterScore::softmax;
  double bias_rate = 0;  // > 0: a random selection bias every step (make_inputs)
  int groups = 0, topk_groups = 0;
};

template <class Scalar>
void layer_steps(const RaggedCase& c, int steps, std::uint64_t seed, bool overlap = true,
                 const RouterModes& modes = {}) {
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  // Float: dWr sums up to a few hundred tokens' terms in float (1e-5 is for ~50 tokens).
  const double tol = is_float ? 5e-5 : 1e-12;
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.router.renormalize = c.renormalize;
  cfg.overlap_exchange = overlap;
  cfg.router.score = modes.score;
  cfg.router.bias_rate = modes.bias_rate;
  cfg.router.groups = modes.groups;
  cfg.router.topk_groups = modes.topk_groups;
  // The reference does not know the ranks: router.groups = 0 means one group per rank.
  MoEConfig ref_cfg = cfg;
  if (modes.topk_groups > 0 && modes.groups == 0) ref_cfg.router.groups = P;
  const std::size_t dh = static_cast<std::size_t>(c.d) * c.h;
  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);  // the one instance of the whole sequence
  Rng rng(seed);
  int changed_placements = 0, steps_with_empty_rank = 0;
  long long choices_moved = 0;  // top-k entries the bias or the group limit changed
  MoEConfig unlimited = ref_cfg;
  unlimited.router.bias_rate = 0;
  unlimited.router.topk_groups = 0;
  // Groups of one expert each cannot bind (the top M experts hold the top k); larger ones do.
  const bool modes_on = modes.bias_rate > 0 ||
                        (modes.topk_groups > 0 && ref_cfg.router.groups > 1 && ref_cfg.router.groups < c.E);
  for (int s = 0; s < steps; ++s) {
    // Every fifth step moves the experts (live migration between steps).
    if (s > 0 && s % 5 == 0) {
      layer.set_placement(Placement::from_owners(random_owners(c.E, P, rng), P));
      ++changed_placements;
    }
    const std::vector<int> counts = step_tokens(s, P, rng);
    const Routing routing = rng.below(5) == 0 ? Routing::all_to_zero : Routing::random;
    std::vector<int> off(P + 1, 0);
    for (int r = 0; r < P; ++r) off[r + 1] = off[r] + counts[r];
    const int Tg = off[P], t0 = off[rank], T = counts[rank];
    for (int r = 0; r < P; ++r) steps_with_empty_rank += counts[r] == 0 && r == rank ? 1 : 0;

    const std::uint64_t sd = seed_with_margin(ref_cfg, Tg, seed * 1000 + s, routing, is_float,
                                              is_float ? 1e-3 : 1e-9);
    const RefInputs in = make_inputs(ref_cfg, Tg, sd, routing, is_float);
    const RefResult ref = reference_moe(ref_cfg, in);
    set_layer_weights(layer, in);  // the weights change between steps, as under an optimizer
    if (modes.bias_rate > 0) layer.set_router_bias(in.bias);
    if (modes_on || modes.topk_groups > 0) {
      RefInputs no_bias = in;
      no_bias.bias.clear();
      const RefResult plain = reference_moe(unlimited, no_bias);
      for (std::size_t i = 0; i < plain.topk.size(); ++i) choices_moved += plain.topk[i] != ref.topk[i];
    }
    Matrix<Scalar> x = make_matrix<Scalar>(in.x, t0, T, c.d, "test::x");
    Matrix<Scalar> dout = make_matrix<Scalar>(in.dout, t0, T, c.d, "test::dout");
    Matrix<Scalar> out("test::out", T, c.d), dx("test::dx", T, c.d);
    layer.zero_grad();
    layer.forward(x, out);
    layer.backward(dout, dx);

    const std::string at = std::string(c.name) + " step " + std::to_string(s) + " (T = " +
                           std::to_string(T) + " here, " + std::to_string(Tg) + " in all)";
    const Placement& pl = layer.placement();
    EXPECT_TRUE(close_to("out, " + at, to_host(out), rows_of(ref.out, t0, T, c.d), tol));
    EXPECT_TRUE(close_to("dx, " + at, to_host(dx), rows_of(ref.dx, t0, T, c.d), tol));
    EXPECT_TRUE(close_to("dWr, " + at, to_host(layer.router_grad()), ref.dWr, tol));
    EXPECT_TRUE(close_to("dW1, " + at, to_host(layer.w1_grad()),
                         local_expert_slices(ref.dW1, pl, rank, dh), tol));
    EXPECT_TRUE(close_to("dW2, " + at, to_host(layer.w2_grad()),
                         local_expert_slices(ref.dW2, pl, rank, dh), tol));
    if (c.act == Activation::swiglu) {
      EXPECT_TRUE(close_to("dW3, " + at, to_host(layer.w3_grad()),
                           local_expert_slices(ref.dW3, pl, rank, dh), tol));
    }
    EXPECT_TRUE(scalar_close("aux, " + at, layer.losses().aux, ref.aux, tol)) << at;
    EXPECT_TRUE(scalar_close("z, " + at, layer.losses().z, ref.z, tol)) << at;
    EXPECT_EQ(layer.stats().tokens_per_expert, ref.counts) << at;
    EXPECT_EQ(layer.stats().tokens, T) << at;
    std::vector<int> want_topk(ref.topk.begin() + t0 * c.k, ref.topk.begin() + (t0 + T) * c.k);
    EXPECT_EQ(to_host_int(layer.topk_experts()), want_topk) << at;
    // Ranks per token, counted by hand from the reference's choices and the placement.
    long long rank_sum = 0, rank_max = 0;
    for (int t = 0; t < T; ++t) {
      std::vector<int> ranks;
      for (int j = 0; j < c.k; ++j) ranks.push_back(pl.owner(want_topk[t * c.k + j]));
      std::sort(ranks.begin(), ranks.end());
      const long long n = std::unique(ranks.begin(), ranks.end()) - ranks.begin();
      rank_sum += n;
      rank_max = std::max(rank_max, n);
    }
    EXPECT_EQ(layer.stats().max_ranks_per_token, rank_max) << at;
    EXPECT_DOUBLE_EQ(layer.stats().ranks_per_token, T > 0 ? static_cast<double>(rank_sum) / T : 0.0) << at;
    // One group per rank and the balanced placement (before the first migration): a token's
    // rows reach at most topk_groups ranks.
    if (modes.topk_groups > 0 && modes.groups == 0 && s < 5)
      EXPECT_LE(layer.stats().max_ranks_per_token, modes.topk_groups) << at;
    if (!all_ranks(!::testing::Test::HasFailure())) return;  // one step's report is enough (on every rank: the steps are collective)
  }
  EXPECT_EQ(changed_placements, (steps - 1) / 5);
  EXPECT_GT(steps_with_empty_rank, 0) << "the sequence never gave this rank zero tokens";
  if (modes_on) EXPECT_GT(choices_moved, 0) << "neither the bias nor the group limit changed a choice";
  if (!modes_on && modes.topk_groups > 0) EXPECT_EQ(choices_moved, 0) << "groups that cannot bind changed a choice";
}

const RaggedCase kGelu{"gelu_E4_k2", 4, 2, 8, 12, Activation::gelu, true};
const RaggedCase kSwiglu{"swiglu_E6_k2_plain", 6, 2, 10, 14, Activation::swiglu, false};
const RaggedCase kManyExperts{"gelu_E16_k4", 16, 4, 8, 10, Activation::gelu, true};
// Weights over 1 MiB per expert: by expert with overlap, two visits per direction (kept rows
// while the exchange travels, received rows after; Experts::one_visit). d x h x 2 x 4 bytes
// = 1,049,600 in float at h = 8200; in double h = 4112 is enough (1,052,672), at half the work.
const RaggedCase kLargeExperts{"gelu_E4_k2_h8200", 4, 2, 16, 8200, Activation::gelu, true};
const RaggedCase kLargeDoubleExperts{"gelu_E4_k2_h4112", 4, 2, 16, 4112, Activation::gelu, true};
const RaggedCase kEightExperts{"gelu_E8_k2", 8, 2, 8, 10, Activation::gelu, true};

TEST(Ragged, MoEStepsDoubleGelu) { layer_steps<double>(kGelu, 30, 11); }
TEST(Ragged, MoEStepsDoubleSwiglu) { layer_steps<double>(kSwiglu, 30, 12); }
TEST(Ragged, MoEStepsDoubleManyExperts) { layer_steps<double>(kManyExperts, 20, 13); }
TEST(Ragged, MoEStepsFloatGelu) { layer_steps<float>(kGelu, 30, 14); }
TEST(Ragged, MoEStepsFloatSwiglu) { layer_steps<float>(kSwiglu, 20, 15); }
TEST(Ragged, MoEStepsDoubleSwigluOverlapOff) { layer_steps<double>(kSwiglu, 20, 16, false); }
TEST(Ragged, MoEStepsFloatGeluOverlapOff) { layer_steps<float>(kGelu, 20, 17, false); }
TEST(Ragged, MoEStepsDoubleGeluLargeExperts) { layer_steps<double>(kLargeDoubleExperts, 10, 18); }

// Sigmoid scores, a selection bias and group-limited routing (docs/moe-layer.md, "Router").
TEST(Ragged, RouterSigmoidBiasDoubleSwiglu) {
  layer_steps<double>(kSwiglu, 12, 41, true, {RouterScore::sigmoid, 1e-3, 0, 0});
}
TEST(Ragged, RouterGroupsPerRankDoubleGelu) {  // router.groups = 0: one group per rank
  layer_steps<double>(kEightExperts, 12, 42, true, {RouterScore::softmax, 0, 0, 1});
}
TEST(Ragged, RouterSigmoidBiasGroupsFloatOverlapOff) {
  layer_steps<float>(kManyExperts, 10, 43, false, {RouterScore::sigmoid, 1e-3, 4, 2});
}
TEST(Ragged, RouterGroupsOfOneExpertDouble) {  // G = E
  layer_steps<double>(kEightExperts, 8, 44, true, {RouterScore::sigmoid, 0, 8, 3});
}

/// What the second layer of same_bits_as changes.
enum class Variant {
  overlap_off,    ///< every exchange completes before the experts run
  by_projection,  ///< the experts' GPU schedule (the first layer runs the host one, by expert)
};

/// Two layers, the second one's `variant` changed, through the same ragged sequence with
/// migrations: overlap and the experts' schedule only reorder independent work (the same GEMMs
/// on the same rows, the same sums), so every output and gradient is bitwise the same, step
/// after step.
template <class Scalar>
void same_bits_as(Variant variant, const RaggedCase& c, DispatchDtype wire, int steps, std::uint64_t seed) {
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.router.renormalize = c.renormalize;
  cfg.dispatch_dtype = wire;
  cfg.expert_schedule = ExpertSchedule::by_expert;
  MoEConfig off_cfg = cfg;
  if (variant == Variant::overlap_off) off_cfg.overlap_exchange = false;
  if (variant == Variant::by_projection) off_cfg.expert_schedule = ExpertSchedule::by_projection;
  MoELayer<Scalar> on(cfg, MPI_COMM_WORLD), off(off_cfg, MPI_COMM_WORLD);
  Rng rng(seed);
  std::int64_t rows_received = 0;
  for (int s = 0; s < steps; ++s) {
    if (s > 0 && s % 4 == 0) {
      const Placement pl = Placement::from_owners(random_owners(c.E, P, rng), P);
      on.set_placement(pl);
      off.set_placement(pl);
    }
    const std::vector<int> counts = step_tokens(s, P, rng);
    int t0 = 0;
    for (int r = 0; r < rank; ++r) t0 += counts[r];
    int Tg = 0;
    for (int r = 0; r < P; ++r) Tg += counts[r];
    const RefInputs in = make_inputs(cfg, Tg, seed * 100 + s, Routing::random, std::is_same_v<Scalar, float>);
    const int T = counts[rank];
    Matrix<Scalar> x = make_matrix<Scalar>(in.x, t0, T, c.d, "test::x");
    Matrix<Scalar> dout = make_matrix<Scalar>(in.dout, t0, T, c.d, "test::dout");
    // out, dx, dWr, dW1, dW2, dW3 of each layer
    std::vector<std::vector<double>> r[2];
    MoELayer<Scalar>* layers[2] = {&on, &off};
    for (int i = 0; i < 2; ++i) {
      set_layer_weights(*layers[i], in);
      Matrix<Scalar> out("test::out", T, c.d), dx("test::dx", T, c.d);
      layers[i]->zero_grad();
      layers[i]->forward(x, out);
      layers[i]->backward(dout, dx);
      r[i] = {to_host(out), to_host(dx), to_host(layers[i]->router_grad()), to_host(layers[i]->w1_grad()),
              to_host(layers[i]->w2_grad()), to_host(layers[i]->w3_grad())};
    }
    rows_received += on.stats().rows_received;
    const char* names[] = {"out", "dx", "dWr", "dW1", "dW2", "dW3"};
    for (int j = 0; j < 6; ++j)
      EXPECT_TRUE(bitwise_equal(r[0][j], r[1][j])) << names[j] << ", " << c.name << " step " << s;
    if (!all_ranks(!::testing::Test::HasFailure())) return;
  }
  if (P > 1) {
    std::int64_t all = 0;
    MPI_Allreduce(&rows_received, &all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    EXPECT_GT(all, 0) << "no row ever crossed ranks: the kept and received rows were never both exercised";
  }
}

TEST(Ragged, OverlapIsBitwiseDoubleSwiglu) { same_bits_as<double>(Variant::overlap_off, kSwiglu, DispatchDtype::scalar, 16, 31); }
TEST(Ragged, OverlapIsBitwiseFloatGeluBf16Rows) { same_bits_as<float>(Variant::overlap_off, kManyExperts, DispatchDtype::bf16, 16, 32); }
TEST(Ragged, OverlapIsBitwiseFloatGeluLargeExperts) { same_bits_as<float>(Variant::overlap_off, kLargeExperts, DispatchDtype::scalar, 10, 35); }
TEST(Ragged, ExpertSchedulesAreBitwiseFloatGelu) { same_bits_as<float>(Variant::by_projection, kGelu, DispatchDtype::scalar, 16, 33); }
TEST(Ragged, ExpertSchedulesAreBitwiseDoubleSwigluBf16Rows) { same_bits_as<double>(Variant::by_projection, kSwiglu, DispatchDtype::bf16, 16, 34); }

// ---------------------------------------------------------------------------------------------
// The model: one instance on a dp x ep mesh through steps of 0..3 sequences per rank (a batch
// smaller than the world included), each step against the same model on one rank given the
// union of the sequences: the loss, the router losses, every dense gradient (gathered from the
// FSDP shards) and every expert gradient.

/// The whole gradient of FSDP unit u, gathered from the shards of every rank.
std::vector<double> gathered_unit_grad(Fsdp<double>& f, int u) {
  const std::vector<double> mine = to_host(f.shard_grad(u));
  std::vector<double> all(mine.size() * world_size());
  MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_DOUBLE, all.data(),
                static_cast<int>(mine.size()), MPI_DOUBLE, MPI_COMM_WORLD);
  all.resize(f.unit_numel(u));
  return all;
}

/// The slice of batch `all` holding sequences [first, first + count).
Batch sequences(const Batch& all, int first, int count) {
  Batch b;
  b.batch = count;
  b.seq_len = all.seq_len;
  const auto from = static_cast<std::size_t>(first) * all.seq_len;
  const auto to = static_cast<std::size_t>(first + count) * all.seq_len;
  b.tokens.assign(all.tokens.begin() + from, all.tokens.begin() + to);
  b.targets.assign(all.targets.begin() + from, all.targets.begin() + to);
  b.sample_of_row.assign(all.sample_of_row.begin() + from, all.sample_of_row.begin() + to);
  return b;
}

void model_steps(int ep, int steps, std::uint64_t seed) {
  const int W = world_size(), rank = world_rank();
  TrainConfig c = tiny_train_config();
  c.model.num_experts = 4;
  Mesh mesh(MPI_COMM_WORLD, ep), self_mesh(MPI_COMM_SELF);
  Model<double> model(c.model, c.parallel, mesh, 5);  // the one instance of the sequence
  Model<double> ref(c.model, c.parallel, self_mesh, 5);
  AdditionCorpus corpus(c.train.seed, c.data.digits, c.data.val_problems);
  Rng rng(seed);
  const std::size_t dh = static_cast<std::size_t>(c.model.d_model) * c.model.d_hidden;
  for (int s = 0; s < steps; ++s) {
    std::vector<int> n(W);
    for (int r = 0; r < W; ++r) n[r] = s == 1 ? (r == 0 ? 1 : 0) : (s == 2 ? 0 : rng.below(4));
    std::vector<int> off(W + 1, 0);
    for (int r = 0; r < W; ++r) off[r + 1] = off[r] + n[r];
    Batch all;
    corpus.train_batch(s, 0, off[W], c.model.seq_len, all);
    long long valid = 0;
    for (int t : all.targets) valid += t >= 0 ? 1 : 0;
    const StepStats got = model.forward_backward(sequences(all, off[rank], n[rank]), valid, s);
    const StepStats want = ref.forward_backward(all, valid, s);
    const std::string at = "dp " + std::to_string(W / ep) + " x ep " + std::to_string(ep) +
                           ", step " + std::to_string(s) + " (" + std::to_string(n[rank]) +
                           " sequences here, " + std::to_string(off[W]) + " in all)";
    const double tol = 1e-11;
    EXPECT_TRUE(scalar_close("cross-entropy sum, " + at, allreduce_sum(got.ce_sum), want.ce_sum, tol));
    EXPECT_TRUE(scalar_close("aux, " + at, got.aux, want.aux, tol));
    EXPECT_TRUE(scalar_close("z, " + at, got.z, want.z, tol));
    for (int u = 0; u < model.fsdp().num_units(); ++u)
      EXPECT_TRUE(close_to("dense gradient of unit " + std::to_string(u) + ", " + at,
                           gathered_unit_grad(model.fsdp(), u), to_host(ref.fsdp().shard_grad(u)), tol));
    for (int l = 0; l < model.n_layers(); ++l) {
      const Placement& pl = model.moe(l).placement();
      const int me = model.moe(l).communicator().rank();
      const std::string L = "layer " + std::to_string(l) + " ";
      EXPECT_TRUE(close_to(L + "dW1, " + at, to_host(model.moe(l).w1_grad()),
                           local_expert_slices(to_host(ref.moe(l).w1_grad()), pl, me, dh), tol));
      EXPECT_TRUE(close_to(L + "dW2, " + at, to_host(model.moe(l).w2_grad()),
                           local_expert_slices(to_host(ref.moe(l).w2_grad()), pl, me, dh), tol));
    }
    if (!all_ranks(!::testing::Test::HasFailure())) return;
  }
}

TEST(Ragged, ModelStepsExpertParallel) { model_steps(world_size(), 12, 21); }
TEST(Ragged, ModelStepsDataAndExpertParallel) {
  // dp 2 x ep 2 at 4 ranks, dp 2 x ep 1 at 2, dp 3 x ep 1 at 3; one rank: ep 1.
  model_steps(world_size() % 2 == 0 && world_size() > 2 ? 2 : 1, 12, 22);
}

// ---------------------------------------------------------------------------------------------
// examoe::train with batches and validation sets smaller than the world (ranks with no
// sequences take part in every collective and contribute nothing): the same losses and
// validation results as on one rank.

void expect_same_run(const TrainConfig& c, const std::string& what) {
  TrainResult ref;
  TrainConfig one_rank = c;
  one_rank.parallel.ep = 0;
  if (world_rank() == 0) ref = train(one_rank, MPI_COMM_SELF, nullptr);
  std::vector<double> want = ref.losses;
  want.push_back(ref.final.loss);
  want.push_back(ref.final.accuracy);
  want.push_back(static_cast<double>(ref.final.targets));
  int n = static_cast<int>(want.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  want.resize(n);
  MPI_Bcast(want.data(), n, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  const TrainResult r = train(c, MPI_COMM_WORLD, nullptr);
  std::vector<double> got = r.losses;
  got.push_back(r.final.loss);
  got.push_back(r.final.accuracy);
  got.push_back(static_cast<double>(r.final.targets));
  ASSERT_EQ(r.losses.size(), static_cast<std::size_t>(c.train.steps)) << what;
  EXPECT_TRUE(close_to(what + ": losses, final val loss, accuracy, targets", got, want, 1e-10));
}

TEST(Ragged, TrainBatchesSmallerThanTheWorld) {
  const int W = world_size();
  for (int batch : {1, W - 1, W + 1, 2 * W - 1}) {
    if (batch < 1) continue;
    TrainConfig c = tiny_train_config();
    c.train.steps = 6;
    c.train.batch = batch;
    c.data.val_problems = 1;  // fewer validation sequences than ranks
    expect_same_run(c, "batch " + std::to_string(batch) + " at " + std::to_string(W) + " ranks");
    if (W == 4) {
      c.parallel.ep = 2;  // dp 2 x ep 2
      expect_same_run(c, "batch " + std::to_string(batch) + ", dp 2 x ep 2");
    }
  }
}

#if EXAMOE_ENABLE_HDF5
// examoe eval of fewer sequences than ranks: the same loss and logits as on one rank.

/// Writes `n` validation sequences of `corpus` as an eval input (rank 0 writes).
void write_eval_input(const std::string& path, const Corpus& corpus, int n, int seq) {
  Batch b;
  corpus.val_batch(0, n, seq, b);
  if (world_rank() == 0) write_int_datasets(path, {{"tokens", &b.tokens}, {"targets", &b.targets}}, n, seq);
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(Ragged, EvalFewerSequencesThanRanks) {
  const int W = world_size();
  const std::string dir = make_shared_dir("ragged", "eval");
  TrainConfig c = tiny_train_config();
  c.train.steps = 2;
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 2;
  train(c, MPI_COMM_WORLD, nullptr);
  const std::string ckpt = checkpoint_path(dir, 2);
  AdditionCorpus corpus(c.train.seed, c.data.digits, c.data.val_problems);
  for (int n : {1, W - 1}) {
    if (n < 1) continue;
    const std::string in = dir + "/in" + std::to_string(n) + ".h5";
    const std::string out = dir + "/out" + std::to_string(n) + ".h5";
    const std::string out1 = dir + "/out" + std::to_string(n) + "_one_rank.h5";
    write_eval_input(in, corpus, n, c.model.seq_len);
    const double loss = eval_file(ckpt, in, out, 0, MPI_COMM_WORLD, nullptr);
    double want = 0;
    if (world_rank() == 0) want = eval_file(ckpt, in, out1, 0, MPI_COMM_SELF, nullptr);
    MPI_Bcast(&want, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    const std::string what = std::to_string(n) + " sequences on " + std::to_string(W) + " ranks";
    EXPECT_GT(want, 0.0) << what;
    EXPECT_TRUE(scalar_close("eval loss, " + what, loss, want, 1e-12));
    if (world_rank() == 0) {
      const std::vector<float> a = read_logits(out), b = read_logits(out1);
      EXPECT_EQ(a.size(), static_cast<std::size_t>(n) * c.model.seq_len * 256) << what;
      EXPECT_EQ(a, b) << "logits, " << what;
    }
  }
  remove_shared_dir(dir);
}
#endif

}  // namespace
}  // namespace examoe::test
