// Training on the dp x ep mesh: FSDP sharding, loss sequences that do not depend on the
// parallel decomposition, learning, memory accounting and bad input.
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/fsdp.hpp>
#include <examoe/mesh.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

using examoe::test::world_rank;
using examoe::test::world_size;

using examoe::test::to_host;

examoe::TrainConfig tiny_config() { return examoe::test::tiny_train_config(); }

/// The losses of `c` trained on rank 0 alone, on every rank (the reference of a split run).
std::vector<double> one_rank_losses(const examoe::TrainConfig& c) {
  std::vector<double> ref;
  if (world_rank() == 0) ref = examoe::train(c, MPI_COMM_SELF, nullptr).losses;
  int n = static_cast<int>(ref.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  ref.resize(n);
  MPI_Bcast(ref.data(), n, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return ref;
}

void expect_same_losses(const std::vector<double>& a, const std::vector<double>& b, double rtol,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double rel = std::fabs(a[i] - b[i]) / std::max(1e-300, std::fabs(b[i]));
    worst = std::max(worst, rel);
    EXPECT_LE(rel, rtol) << what << ": step " << i << " loss " << a[i] << " vs " << b[i];
  }
  if (std::getenv("EXAMOE_TEST_VERBOSE") && world_rank() == 0)
    std::printf("[ %s ] worst relative loss difference %.3g\n", what.c_str(), worst);
}

}  // namespace

// ------------------------------------------------------------------------- FSDP

TEST(TrainFsdp, GatherEqualsUnshardedAndReduceScatterSums) {
  const int W = world_size(), me = world_rank();
  examoe::Mesh mesh(MPI_COMM_WORLD);
  examoe::Mesh self(MPI_COMM_SELF);
  auto build = [](examoe::Fsdp<double>& f) {
    const int u0 = f.add_unit("a"), u1 = f.add_unit("b");
    f.add_param(u0, "a.w", {5, 3}, {examoe::ParamInit::uniform, 0.5}, true);
    f.add_param(u0, "a.g", {7}, {examoe::ParamInit::constant, 1.0}, false);
    f.add_param(u1, "b.w", {2, 9}, {examoe::ParamInit::uniform, 0.25}, true);
    f.finalize(42);
  };
  for (bool reshard : {true, false}) {
    examoe::Fsdp<double> dist(mesh.world(), reshard), ref(self.world(), reshard);
    build(dist);
    build(ref);
    for (int u = 0; u < dist.num_units(); ++u) {
      // Sharded storage: ceil(numel / W) per rank.
      EXPECT_EQ(dist.shard_numel(u), (dist.unit_numel(u) + W - 1) / W);
      dist.gather(u);
      ref.gather(u);
      for (int p = 0; p < dist.num_params(); ++p) {
        if (dist.param_unit(p) != u) continue;
        const auto a = to_host(dist.param1(p)), b = to_host(ref.param1(p));
        ASSERT_EQ(a, b) << "gathered " << dist.param_name(p) << " differs from the unsharded one";
      }
      // Reduce-scatter: rank r contributes (r+1) * (i+1) at flat index i.
      dist.begin_grad(u);
      for (int p = 0; p < dist.num_params(); ++p) {
        if (dist.param_unit(p) != u) continue;
        auto g = dist.grad1(p);
        auto h = Kokkos::create_mirror_view(g);
        for (std::size_t i = 0; i < h.size(); ++i)
          h(i) = (me + 1.0) * static_cast<double>(dist.param_offset(p) + i + 1);
        Kokkos::deep_copy(g, h);
      }
      dist.reduce_scatter_grad(u);
      const auto sg = to_host(dist.shard_grad(u));
      const double ranks_sum = W * (W + 1) / 2.0;
      for (std::size_t i = 0; i < sg.size(); ++i) {
        const std::size_t flat = me * dist.shard_numel(u) + i;
        const double want = flat < dist.unit_numel(u) ? ranks_sum * static_cast<double>(flat + 1) : 0.0;
        EXPECT_EQ(sg[i], want) << "unit " << u << " shard element " << i;
      }
      dist.release(u);
      ref.release(u);
    }
  }
}

TEST(TrainFsdp, OptimizerUpdatesExactlyTheOwnShard) {
  const int me = world_rank();
  examoe::Mesh mesh(MPI_COMM_WORLD);
  examoe::Fsdp<double> f(mesh.world(), true);
  const int u = f.add_unit("u");
  const int p = f.add_param(u, "w", {6, 5}, {examoe::ParamInit::uniform, 1.0}, true);
  f.finalize(3);
  f.gather(u);
  const auto before = to_host(f.param1(p));
  f.release(u);
  // Gradient of the full parameter = its flat index + 1 on every rank; after the sum over
  // W ranks each shard holds W * (i+1).
  f.begin_grad(u);
  {
    auto g = f.grad1(p);
    auto h = Kokkos::create_mirror_view(g);
    for (std::size_t i = 0; i < h.size(); ++i) h(i) = static_cast<double>(i + 1);
    Kokkos::deep_copy(g, h);
  }
  f.reduce_scatter_grad(u);
  examoe::AdamWConfig ac;
  ac.weight_decay = 0.1;
  examoe::AdamW<double> opt(ac);
  using U = examoe::AdamW<double>::vector;
  opt.add(U(f.shard(u).data(), f.shard_numel(u)), U(f.shard_grad(u).data(), f.shard_numel(u)),
          U(f.shard_decay_mask(u).data(), f.shard_numel(u)), true);
  EXPECT_EQ(opt.state_bytes(), 2 * f.shard_numel(u) * sizeof(double)) << "state only for the own shard";
  const double lr = 0.01;
  opt.step(lr, 1.0);
  f.gather(u);
  const auto after = to_host(f.param1(p));
  // First AdamW step: m/(1-b1) = g, v/(1-b2) = g^2, so the update is lr * (sign(g) * |g|/(|g|+eps) + wd * p).
  const int W = world_size();
  for (std::size_t i = 0; i < after.size(); ++i) {
    const double g = W * static_cast<double>(i + 1);
    const double want = before[i] - lr * (g / (std::sqrt(g * g) + ac.eps) + ac.weight_decay * before[i]);
    EXPECT_NEAR(after[i], want, 1e-14) << "element " << i << " (rank " << me << ")";
  }
}

TEST(TrainSchedule, WarmupThenCosine) {
  EXPECT_DOUBLE_EQ(examoe::lr_schedule(0, 100, 10, 1.0, 0.1), 0.1);
  EXPECT_DOUBLE_EQ(examoe::lr_schedule(9, 100, 10, 1.0, 0.1), 1.0);
  EXPECT_DOUBLE_EQ(examoe::lr_schedule(10, 100, 10, 1.0, 0.1), 1.0);
  EXPECT_NEAR(examoe::lr_schedule(55, 100, 10, 1.0, 0.1), 0.55, 1e-12);  // half way: (1+0.1)/2
  EXPECT_NEAR(examoe::lr_schedule(100, 100, 10, 1.0, 0.1), 0.1, 1e-12);
}

// ------------------------------------------------------ decomposition independence

TEST(TrainMesh, LossesIndependentOfRankCountAndSplit) {
  const int W = world_size();
  const examoe::TrainConfig base = tiny_config();
  // Reference: the whole model on one rank.
  const std::vector<double> ref = one_rank_losses(base);
  ASSERT_EQ(static_cast<int>(ref.size()), base.train.steps);
  EXPECT_LT(ref.back(), ref.front()) << "the reference run does not learn";

  std::vector<int> eps{W};             // dp = 1 x ep = W
  if (W == 4) eps.push_back(2);        // dp = 2 x ep = 2
  if (W == 2) eps.push_back(1);        // dp = 2 x ep = 1
  for (int ep : eps) {
    examoe::TrainConfig c = base;
    c.parallel.ep = ep;
    const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
    expect_same_losses(r.losses, ref, 1e-10,
                       "dp " + std::to_string(W / ep) + " x ep " + std::to_string(ep));
  }
}

// Sigmoid scores, the selection bias (moved every step from the global loads) and two groups
// with one per token: the same losses at any rank count and dp x ep, and bitwise run to run.
TEST(TrainMesh, RouterModesIndependentOfRankCountAndSplit) {
  const int W = world_size();
  examoe::TrainConfig base = tiny_config();
  base.train.steps = 12;
  base.model.router.score = examoe::RouterScore::sigmoid;
  base.model.router.bias_rate = 0.02;
  base.model.router.aux_loss_coef = 0;
  base.model.router.groups = 2;
  base.model.router.topk_groups = 1;
  const std::vector<double> ref = one_rank_losses(base);
  std::vector<int> eps{W};
  if (W == 4) eps.push_back(2);
  if (W == 2) eps.push_back(1);
  for (int ep : eps) {
    examoe::TrainConfig c = base;
    c.parallel.ep = ep;
    const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
    expect_same_losses(r.losses, ref, 1e-10, "router modes, dp " + std::to_string(W / ep) + " x ep " + std::to_string(ep));
    if (ep == W) {
      const auto again = examoe::train(c, MPI_COMM_WORLD, nullptr);
      EXPECT_EQ(again.losses, r.losses) << "not bitwise run to run";
    }
  }
}

TEST(TrainMesh, KeepGatheredAndCheckpointingChangeNothing) {
  examoe::TrainConfig a = tiny_config();
  a.train.steps = 8;
  const auto ra = examoe::train(a, MPI_COMM_WORLD, nullptr);
  examoe::TrainConfig b = a;
  b.parallel.reshard_after_forward = false;
  b.parallel.activation_checkpointing = true;
  b.model.router.jitter = 0.1;  // checkpointing must replay the same router noise
  a.model.router.jitter = 0.1;
  const auto rj = examoe::train(a, MPI_COMM_WORLD, nullptr);
  const auto rb = examoe::train(b, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(rb.losses, rj.losses) << "keeping gathered units / recomputing blocks changed the losses";
  EXPECT_NE(rj.losses, ra.losses) << "router jitter had no effect";
  // Memory accounting sees what checkpointing saves and what keeping units costs.
  EXPECT_LT(rb.memory.activations, rb.memory.activations_without_checkpointing);
  EXPECT_EQ(ra.memory.activations, ra.memory.activations_without_checkpointing);
  EXPECT_GT(rb.memory.gathered_peak, ra.memory.gathered_peak);
  EXPECT_EQ(ra.memory.gathered_peak, ra.memory.gathered_unit_max) << "reshard mode keeps one unit";
}

TEST(TrainMesh, DenseMemoryIsOneWorldthPlusOneUnit) {
  const int W = world_size();
  examoe::TrainConfig c = tiny_config();
  c.train.steps = 1;
  const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  const double total = static_cast<double>(r.memory.dense_total_params) * sizeof(double);
  // Shards: total / W plus at most one padding element per unit (2 + n_layers units).
  EXPECT_LE(static_cast<double>(r.memory.dense_shard), total / W + (2 + c.model.n_layers) * sizeof(double));
  EXPECT_GE(static_cast<double>(r.memory.dense_shard), total / W);
  EXPECT_EQ(r.memory.optimizer, 2 * (r.memory.dense_shard + r.memory.experts));
}

// ------------------------------------------------------------------- learning

TEST(TrainLearns, ShortDefaultRunCutsValidationLoss) {
  // The default model and corpus (float), 60 steps: validation loss must fall below 40 % of
  // its initial value and below the unigram entropy of the answers.
  examoe::TrainConfig c;
  c.train.steps = 60;
  c.train.warmup = 20;
  c.log.quiet = true;
  c.log.eval_interval = 1000;
  const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  EXPECT_LT(r.final.loss, 0.4 * r.initial.loss) << r.initial.loss << " -> " << r.final.loss;
  EXPECT_LT(r.final.loss, r.unigram_entropy);
  EXPECT_GE(r.final.accuracy, 0.0);
  if (world_rank() == 0)
    std::printf("[ learns ] val loss %.4f -> %.4f (unigram %.4f), exact match %.3f\n", r.initial.loss,
                r.final.loss, r.unigram_entropy, r.final.accuracy);
}

// ------------------------------------------------------------------ bad input

namespace {
void expect_error(const examoe::TrainConfig& c, const std::string& needle) {
  try {
    examoe::train(c, MPI_COMM_WORLD, nullptr);
    ADD_FAILURE() << "no error for " << needle;
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  // Still in step: a collective afterwards completes.
  MPI_Barrier(MPI_COMM_WORLD);
}
}  // namespace

TEST(TrainErrors, BadConfigAndDataOnEveryRank) {
  auto c = tiny_config();
  c.train.batch = 0;
  expect_error(c, "train.batch");
  c = tiny_config();
  c.model.n_heads = 3;
  expect_error(c, "n_heads");
  c = tiny_config();
  c.train.precision = "half";
  expect_error(c, "train.precision");
  c = tiny_config();
  c.data.path = "/nonexistent/corpus.txt";
  expect_error(c, "/nonexistent/corpus.txt");
  if (world_size() == 4) {
    c = tiny_config();
    c.parallel.ep = 3;
    expect_error(c, "ep = 3");
  }
  // A config that is invalid on one rank only: every rank still throws.
  if (world_size() > 1) {
    c = tiny_config();
    if (world_rank() == world_size() - 1) c.train.lr = -1;
    expect_error(c, "train.lr");
  }
  // An empty data file.
  const std::string empty = "/tmp/examoe_empty_" + std::to_string(getpid()) + ".txt";
  if (world_rank() == 0) std::ofstream(empty).close();
  MPI_Barrier(MPI_COMM_WORLD);
  c = tiny_config();
  c.data.path = empty;
  expect_error(c, "empty");
  if (world_rank() == 0) std::remove(empty.c_str());
}

TEST(TrainErrors, JsonConfigKeys) {
  examoe::TrainConfig c;
  examoe::apply_json_config(c, R"({"model": {"d_model": 32, "router": {"z_loss_coef": 0.5}}, "train.steps": 7})", "t.json");
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_EQ(c.model.router.z_loss_coef, 0.5);
  EXPECT_EQ(c.train.steps, 7);
  try {
    examoe::apply_json_config(c, R"({"model": {"d_modle": 32}})", "t.json");
    ADD_FAILURE() << "unknown key accepted";
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean 'model.d_model'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(examoe::apply_json_config(c, R"({"train": {"steps": "many"}})", "t.json"), examoe::Error);
  EXPECT_THROW(examoe::apply_json_config(c, "{not json", "t.json"), examoe::Error);
  EXPECT_EQ(examoe::closest_key("lr"), "train.lr");
}

// -------------------------------------------------------- gradient accumulation

namespace {
/// A config whose every rank's share divides into 4 micro-batches, with the aux and z losses,
/// router jitter, clipping and rebalancing every 2 steps on.
examoe::TrainConfig accumulation_config() {
  examoe::TrainConfig c = tiny_config();
  c.train.steps = 6;
  c.train.warmup = 2;
  c.train.batch = 4 * world_size();
  c.train.clip = 0.5;
  c.model.router.aux_loss_coef = 0.05;
  c.model.router.z_loss_coef = 0.01;
  c.model.router.jitter = 0.1;
  c.placement.rebalance_interval = 2;
  return c;
}
}  // namespace

// M micro-batches per step train as one batch of their union: the same losses (1e-10), the
// same expert loads (the rebalancer's migrations and imbalances, from the step's counts), the
// same validation; M = 4 with its blocks recomputed. (Every dp x ep and the gradients and
// parameters themselves: ModelAccumulation in test_model.cpp.) Then the run with M = 2
// resumed from its checkpoint at step 3 continues it bitwise; the key is in the checkpoint
// (and left out at its default, so older configs and checkpoints stay as they were).
TEST(TrainAccumulation, MicroBatchesTrainAsTheirUnionAndResumeBitwise) {
  const examoe::TrainConfig base = accumulation_config();
  const auto whole = examoe::train(base, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(whole.losses.size(), 6u);
  if (world_size() > 1) EXPECT_GT(whole.migrations, 0) << "the comparison should cover rebalancing";
  std::vector<examoe::TrainResult> runs;
  for (int M : {2, 4}) {
    examoe::TrainConfig c = base;
    c.train.micro_batches = M;
    c.parallel.activation_checkpointing = M == 4;
    runs.push_back(examoe::train(c, MPI_COMM_WORLD, nullptr));
    const examoe::TrainResult& r = runs.back();
    const std::string what = "micro_batches " + std::to_string(M);
    expect_same_losses(r.losses, whole.losses, 1e-10, what);
    expect_same_losses(r.ce, whole.ce, 1e-10, what + " (cross-entropy)");
    EXPECT_EQ(r.migrations, whole.migrations) << what;
    EXPECT_EQ(r.imbalance_before, whole.imbalance_before) << what;
    EXPECT_EQ(r.imbalance_after, whole.imbalance_after) << what;
    EXPECT_NEAR(r.final.loss, whole.final.loss, 1e-10 * whole.final.loss) << what;
    EXPECT_EQ(r.final.accuracy, whole.final.accuracy) << what;
  }
  EXPECT_EQ(examoe::canonical_config(examoe::TrainConfig()).find("micro_batches"), std::string::npos);
#if EXAMOE_ENABLE_HDF5
  const std::string dir = examoe::test::make_shared_dir("train", "accum");
  examoe::TrainConfig c = base;
  c.train.micro_batches = 2;
  EXPECT_NE(examoe::canonical_config(c).find("train.micro_batches=2"), std::string::npos);
  const examoe::TrainResult& full = runs[0];
  examoe::TrainConfig first = c;
  first.train.steps = 3;
  first.checkpoint.dir = dir;
  first.checkpoint.interval = 3;
  const auto a = examoe::train(first, MPI_COMM_WORLD, nullptr);
  const examoe::CheckpointInfo info = examoe::read_checkpoint_info(examoe::checkpoint_path(dir, 3), MPI_COMM_WORLD);
  bool recorded = false;
  for (const auto& kv : info.config) recorded = recorded || (kv.first == "train.micro_batches" && kv.second == "2");
  EXPECT_TRUE(recorded) << "train.micro_batches = 2 is not in the checkpoint's config";
  examoe::TrainConfig second = c;
  second.checkpoint.dir = dir;
  second.checkpoint.resume = "latest";
  const auto b = examoe::train(second, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(b.first_step, 3);
  ASSERT_EQ(a.losses.size(), 3u);
  ASSERT_EQ(b.losses.size(), 3u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(a.losses[s], full.losses[s]) << "step " << s + 1;
    EXPECT_EQ(b.losses[s], full.losses[3 + s]) << "resumed step " << s + 4;  // bitwise
  }
  examoe::test::remove_shared_dir(dir);
#endif
}

// Sigmoid scores, the selection bias (updated from loads counted M + 1 times: the same signs)
// and group-limited routing with jitter: M = 2 trains as the union.
TEST(TrainAccumulation, RouterModesTrainAsTheirUnion) {
  examoe::TrainConfig base = accumulation_config();
  base.model.router.score = examoe::RouterScore::sigmoid;
  base.model.router.bias_rate = 0.02;
  base.model.router.groups = 2;
  base.model.router.topk_groups = 1;
  base.model.router.jitter = 0.1;
  const auto whole = examoe::train(base, MPI_COMM_WORLD, nullptr);
  examoe::TrainConfig c = base;
  c.train.micro_batches = 2;
  const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  expect_same_losses(r.losses, whole.losses, 1e-10, "router modes, micro_batches 2");
  EXPECT_EQ(r.migrations, whole.migrations);
}

// A non-finite gradient in one micro-batch's step: that step is skipped, as without micro-batches.
TEST(TrainAccumulation, NonfiniteStepIsSkippedAsWithoutMicroBatches) {
  examoe::TrainConfig c = accumulation_config();
  c.train.steps = 3;
  c.placement.rebalance_interval = 0;
  std::vector<examoe::TrainResult> runs;
  for (int M : {1, 2}) {
    c.train.micro_batches = M;
    setenv("EXAMOE_FAULT", ("nan:step=2:rank=" + std::to_string(world_size() - 1)).c_str(), 1);
    runs.push_back(examoe::train(c, MPI_COMM_WORLD, nullptr));
    unsetenv("EXAMOE_FAULT");
  }
  EXPECT_EQ(runs[1].skipped, (std::vector<long long>{2}));
  EXPECT_EQ(runs[1].skipped, runs[0].skipped);
  expect_same_losses(runs[1].ce, runs[0].ce, 1e-10, "skip run, micro_batches 2");
}

TEST(TrainAccumulation, MicroBatchesThatDoNotDivideAShareAreRefusedOnEveryRank) {
  auto c = tiny_config();
  c.train.micro_batches = 0;
  expect_error(c, "train.micro_batches");
  // 8 sequences: shares of 8, 4, 3 or 2 over 1-4 ranks; none divides into 3.
  c = tiny_config();
  c.train.batch = 8;
  c.train.micro_batches = 3;
  expect_error(c, "train.micro_batches = 3 must divide every rank's share of train.batch = 8");
}

// ------------------------------------------------------------------- many ranks

// The "scale" label runs this at 8 and 16 ranks: 16 experts over ep = W and ep = W / 2 ranks
// (dp = 2), a batch of 12 sequences, so that at 16 ranks four ranks hold no tokens.
TEST(TrainManyRanks, LossesMatchOneRank) {
  const int W = world_size();
  examoe::TrainConfig base = tiny_config();
  base.model.num_experts = 16;
  base.train.steps = 6;
  base.train.warmup = 2;
  base.train.batch = 12;
  const std::vector<double> ref = one_rank_losses(base);
  ASSERT_EQ(static_cast<int>(ref.size()), base.train.steps);
  EXPECT_LT(ref.back(), ref.front()) << "the reference run does not learn";

  std::vector<int> eps{W};
  if (W % 2 == 0) eps.push_back(W / 2);
  for (int ep : eps) {
    examoe::TrainConfig c = base;
    c.parallel.ep = ep;
    const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
    expect_same_losses(r.losses, ref, 1e-10,
                       "dp " + std::to_string(W / ep) + " x ep " + std::to_string(ep));
  }
}
