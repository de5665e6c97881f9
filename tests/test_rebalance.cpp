// Dynamic expert placement: the LPT rebalancer, migration of experts (and their optimizer
// state) between ranks, and that nothing a model computes depends on where experts live.
#include "test_util.hpp"

#include <examoe/placement.hpp>
#include <examoe/checkpoint.hpp>
#include <examoe/train.hpp>

#include <unistd.h>

#include <gtest/gtest.h>

#include <map>
#include <numeric>

using examoe::test::world_rank;
using examoe::test::world_size;

namespace {
using Mat = examoe::MoELayer<double>::matrix;

std::vector<double> host(const examoe::MoELayer<double>::tensor3& t) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), t);
  return std::vector<double>(h.data(), h.data() + h.size());
}
std::vector<double> host(const Mat& t) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), t);
  return std::vector<double>(h.data(), h.data() + h.size());
}

/// Expert gradients of this rank keyed by global expert id.
std::map<int, std::vector<double>> grads_by_expert(examoe::MoELayer<double>& layer) {
  std::map<int, std::vector<double>> out;
  const auto g1 = host(layer.w1_grad()), g2 = host(layer.w2_grad());
  const std::size_t b1 = g1.size() / std::max(1, layer.num_local_experts());
  const std::size_t b2 = g2.size() / std::max(1, layer.num_local_experts());
  for (int l = 0; l < layer.num_local_experts(); ++l) {
    const int e = layer.placement().global_expert(layer.communicator().rank(), l);
    std::vector<double> v(g1.begin() + l * b1, g1.begin() + (l + 1) * b1);
    v.insert(v.end(), g2.begin() + l * b2, g2.begin() + (l + 1) * b2);
    out[e] = v;
  }
  return out;
}
}  // namespace

TEST(Rebalance, LptBalancesAndKeepsEveryRankBusy) {
  // Loads 10, 9, 1, 1, 1, 1 over 2 ranks: LPT puts 10 and 9 apart.
  const auto p = examoe::Placement::rebalance_lpt({10, 9, 1, 1, 1, 1}, 2);
  EXPECT_NE(p.owner(0), p.owner(1));
  EXPECT_LE(p.imbalance({10, 9, 1, 1, 1, 1}), 12.0 / 11.5 + 1e-12);
  const auto bal = examoe::Placement::balanced(6, 2);  // {0,0,0,1,1,1}: 20 vs 3
  EXPECT_GT(bal.imbalance({10, 9, 1, 1, 1, 1}), 1.7);
  // All load on one expert: every rank still gets at least one expert.
  const auto q = examoe::Placement::rebalance_lpt({100, 0, 0, 0}, 4);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(q.num_local(r), 1);
  EXPECT_THROW(examoe::Placement::rebalance_lpt({1, 1}, 3), examoe::Error);
  // Deterministic.
  EXPECT_EQ(examoe::Placement::rebalance_lpt({3, 3, 2, 2, 1}, 2), examoe::Placement::rebalance_lpt({3, 3, 2, 2, 1}, 2));
}

TEST(RebalanceLayer, MigrationChangesNothingButWhereExpertsLive) {
  const int P = world_size(), me = world_rank();
  examoe::MoEConfig cfg;
  cfg.d_model = 8;
  cfg.d_hidden = 12;
  cfg.num_experts = 6;
  cfg.top_k = 2;
  cfg.activation = examoe::Activation::swiglu;
  if (P > 6) GTEST_SKIP() << "needs at most 6 ranks";
  examoe::MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  const int T = 10 + 3 * me, d = cfg.d_model;
  Mat x("x", T, d), out("out", T, d), dout("dout", T, d), dx("dx", T, d);
  {
    examoe::test::Rng rng(17 + me);
    auto hx = Kokkos::create_mirror_view(x);
    auto hd = Kokkos::create_mirror_view(dout);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < d; ++c) {
        hx(t, c) = rng.uniform(-1, 1);
        hd(t, c) = rng.uniform(-1, 1);
      }
    Kokkos::deep_copy(x, hx);
    Kokkos::deep_copy(dout, hd);
  }
  layer.forward(x, out);
  layer.backward(dout, dx);
  const auto out0 = host(out), dx0 = host(dx), dWr0 = host(layer.router_grad());
  auto g0 = grads_by_expert(layer);
  // Gather every expert's gradient (by global id) on every rank for comparison after moving.
  auto all_grads = [&](const std::map<int, std::vector<double>>& mine) {
    const std::size_t per = static_cast<std::size_t>(2 * d * cfg.d_hidden);
    std::vector<double> flat(cfg.num_experts * per, 0.0);
    for (const auto& [e, v] : mine) std::copy(v.begin(), v.begin() + per, flat.begin() + e * per);
    MPI_Allreduce(MPI_IN_PLACE, flat.data(), static_cast<int>(flat.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return flat;
  };
  const auto G0 = all_grads(g0);

  // Reverse the placement (explicit table; rank P-1 gets what rank 0 had, ...), and move an
  // extra per-expert state tensor holding each expert's id, like optimizer moments.
  std::vector<int> owners(cfg.num_experts);
  for (int e = 0; e < cfg.num_experts; ++e) owners[e] = P - 1 - layer.placement().owner(e);
  const auto np = examoe::Placement::from_owners(owners, P);
  const std::size_t block = static_cast<std::size_t>(d) * cfg.d_hidden;
  std::vector<examoe::MoELayer<double>::flat_vector> state(1);
  state[0] = examoe::MoELayer<double>::flat_vector("state", layer.num_local_experts() * block);
  {
    auto h = Kokkos::create_mirror_view(state[0]);
    for (int l = 0; l < layer.num_local_experts(); ++l)
      for (std::size_t i = 0; i < block; ++i) h(l * block + i) = 1000.0 * layer.placement().global_expert(me, l) + i;
    Kokkos::deep_copy(state[0], h);
  }
  layer.set_placement(np, state);
  ASSERT_EQ(layer.placement(), np);
  ASSERT_EQ(state[0].size(), layer.num_local_experts() * block);
  {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), state[0]);
    for (int l = 0; l < layer.num_local_experts(); ++l)
      for (std::size_t i = 0; i < block; i += 7)
        ASSERT_EQ(h(l * block + i), 1000.0 * np.global_expert(me, l) + i) << "state did not follow its expert";
  }
  layer.zero_grad();
  layer.forward(x, out);
  layer.backward(dout, dx);
  EXPECT_EQ(host(out), out0) << "outputs changed with the placement";
  EXPECT_EQ(host(dx), dx0);
  EXPECT_EQ(host(layer.router_grad()), dWr0);
  EXPECT_EQ(all_grads(grads_by_expert(layer)), G0) << "expert gradients changed with the placement";
}

TEST(RebalanceLayer, SkewedRoutingImbalanceFalls) {
  const int P = world_size(), me = world_rank();
  if (P == 1) GTEST_SKIP() << "one rank has nothing to balance";
  examoe::MoEConfig cfg;
  cfg.d_model = 8;
  cfg.d_hidden = 8;
  cfg.num_experts = 8;
  cfg.top_k = 1;
  examoe::MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  // Skew on purpose: tokens go to expert 0 or 1 (both on rank 0 when balanced) by the sign of
  // their first feature.
  {
    auto h = Kokkos::create_mirror_view(layer.router_weight());
    examoe::test::Rng rng(5);
    for (int i = 0; i < cfg.d_model; ++i)
      for (int e = 0; e < cfg.num_experts; ++e) h(i, e) = 0.01 * rng.uniform(-1, 1);
    h(0, 0) = 5.0;
    h(0, 1) = -5.0;
    Kokkos::deep_copy(layer.router_weight(), h);
  }
  const int T = 64;
  Mat x("x", T, cfg.d_model), out("out", T, cfg.d_model);
  {
    examoe::test::Rng rng(99 + me);
    auto hx = Kokkos::create_mirror_view(x);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < cfg.d_model; ++c) hx(t, c) = c == 0 ? (t % 2 ? 1.0 : -1.0) : rng.uniform(-1, 1);
    Kokkos::deep_copy(x, hx);
  }
  layer.forward(x, out, false);
  const double before = layer.stats().imbalance;
  std::vector<double> load(layer.stats().tokens_per_expert.begin(), layer.stats().tokens_per_expert.end());
  layer.set_placement(examoe::Placement::rebalance_lpt(load, P));
  layer.forward(x, out, false);
  const double after = layer.stats().imbalance;
  if (me == 0) std::printf("[ rebalance ] %d ranks: imbalance %.3f -> %.3f\n", P, before, after);
  EXPECT_GT(before, 1.3) << "the routing was not skewed";
  EXPECT_LT(after, before - 0.2);
}

TEST(TrainRebalance, MigrationsLeaveTheLossSequenceAlone) {
  examoe::TrainConfig c = examoe::test::tiny_train_config();
  c.model.activation = examoe::Activation::swiglu;
  c.train.steps = 10;
  c.train.warmup = 2;
  const auto fixed = examoe::train(c, MPI_COMM_WORLD, nullptr);
  c.placement.rebalance_interval = 2;
  c.placement.ema = 0.5;
  const auto moving = examoe::train(c, MPI_COMM_WORLD, nullptr);
  // Equal up to rounding: the global gradient norm sums per-rank partial sums, whose split
  // follows the placement.
  ASSERT_EQ(moving.losses.size(), fixed.losses.size());
  for (std::size_t i = 0; i < fixed.losses.size(); ++i)
    EXPECT_NEAR(moving.losses[i], fixed.losses[i], 1e-12 * std::fabs(fixed.losses[i]))
        << "step " << i << ": moving experts (and their AdamW state) changed training";
  if (world_size() > 1) EXPECT_GT(moving.migrations, 0) << "no migration happened: the test is vacuous";
  for (std::size_t i = 0; i < moving.imbalance_after.size(); ++i)
    EXPECT_LE(moving.imbalance_after[i], moving.imbalance_before[i] + 1e-12);

  // Stop at step 5 (checkpoint) and resume: the saved placement, load average and AdamW
  // state come back, so the continuation is bitwise the uninterrupted run.
  int pid = static_cast<int>(getpid());
  MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
  c.checkpoint.dir = "/tmp/examoe_rebalance_" + std::to_string(pid) + "_np" + std::to_string(world_size());
  c.checkpoint.interval = 5;
  const auto with_ckpt = examoe::train(c, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(with_ckpt.losses, moving.losses);
  c.checkpoint.interval = 0;
  c.checkpoint.resume = c.checkpoint.dir + "/step-00000005.h5";
  const auto resumed = examoe::train(c, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(resumed.losses.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(resumed.losses[i], moving.losses[5 + i]) << "step " << 5 + i;
  const auto info = examoe::read_checkpoint_info(c.checkpoint.resume, MPI_COMM_WORLD);
  EXPECT_EQ(info.expert_load_ema.size(), 2u);
  if (world_size() > 1) EXPECT_NE(info.placement_history, "[]") << "migrations missing from the checkpoint";
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::system(("rm -rf " + c.checkpoint.dir).c_str());
}
