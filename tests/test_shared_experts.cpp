// Shared experts (docs/model.md, "Shared experts"): the full model's gradients against central
// finite differences (double) and float against double; the same losses at every rank count and
// dp x ep split, bitwise run to run and with the layer's overlap on or off; the KV-cache decoder
// against the full forward; checkpoints (round trip, another rank count, mismatched configs);
// bad keys; the memory estimate against the model's own accounting.
#include "test_util.hpp"

#include "model/decoder.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/data.hpp>
#include <examoe/error.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

/// A small model with two shared experts of width 6 beside four routed experts of width 12.
ModelConfig shared_model(Activation act) {
  ModelConfig m;
  m.d_model = 8;
  m.n_layers = 2;
  m.n_heads = 2;
  m.seq_len = 12;
  m.d_hidden = 12;
  m.num_experts = 4;
  m.top_k = 2;
  m.num_shared_experts = 2;
  m.shared_hidden = 6;
  m.activation = act;
  m.router.aux_loss_coef = 0.05;
  m.router.z_loss_coef = 0.01;
  return m;
}

/// The batch of this rank: rank r of W holds sequences [3 r, 3 r + 3) of the addition corpus
/// (rank 1 none, so a rank without tokens takes part too).
Batch rank_batch(int seq_len) {
  AdditionCorpus corpus(5);
  Batch b;
  const int r = world_rank();
  corpus.train_batch(0, 3 * r, r == 1 ? 0 : 3, seq_len, b);
  return b;
}

long long global_valid(const Batch& b) {
  long long v = 0, g = 0;
  for (int t : b.targets) v += t >= 0 ? 1 : 0;
  MPI_Allreduce(&v, &g, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  return g;
}

/// The model's loss L = sum(CE) / N + sum_l (aux_l + z_l) of the batch, forward only.
template <class S>
double loss_of(Model<S>& model, const Batch& b, long long n) {
  const StepStats st = model.evaluate(b);
  double ce = 0;
  MPI_Allreduce(&st.ce_sum, &ce, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return ce / static_cast<double>(n) + st.aux + st.z;
}

/// Parameter id of `name` in the model's FSDP registry.
template <class S>
int param_id(Model<S>& model, const std::string& name) {
  auto& F = model.fsdp();
  for (int p = 0; p < F.num_params(); ++p)
    if (F.param_name(p) == name) return p;
  ADD_FAILURE() << "no parameter " << name;
  return 0;
}

/// Every rank's FSDP shard gradient of parameter p, as the full flat parameter (allreduced).
template <class S>
std::vector<double> full_grad(Model<S>& model, int p) {
  auto& F = model.fsdp();
  const int u = F.param_unit(p);
  const std::size_t sh = F.shard_numel(u), first = static_cast<std::size_t>(world_rank()) * sh;
  std::size_t n = 1;
  for (int s : F.param_shape(p)) n *= static_cast<std::size_t>(s);
  const std::vector<double> g = to_host(F.shard_grad(u));
  std::vector<double> mine(n, 0.0), all(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t flat = F.param_offset(p) + i;
    if (flat >= first && flat < first + sh) mine[i] = g[flat - first];
  }
  MPI_Allreduce(mine.data(), all.data(), static_cast<int>(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return all;
}

/// Adds `delta * v[i]` to every element i of parameter p, each on the rank whose shard holds it.
template <class S>
void nudge(Model<S>& model, int p, const std::vector<double>& v, double delta) {
  auto& F = model.fsdp();
  const int u = F.param_unit(p);
  const std::size_t sh = F.shard_numel(u), first = static_cast<std::size_t>(world_rank()) * sh;
  auto shard = F.shard(u);
  auto h = Kokkos::create_mirror_view(shard);
  Kokkos::deep_copy(h, shard);
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::size_t flat = F.param_offset(p) + i;
    if (flat >= first && flat < first + sh) h(flat - first) += static_cast<S>(delta * v[i]);
  }
  Kokkos::deep_copy(shard, h);
}

/// The routed decisions of every layer after the last forward.
template <class S>
std::vector<int> decisions(Model<S>& model) {
  std::vector<int> all;
  for (int l = 0; l < model.n_layers(); ++l) {
    const auto t = to_host_int(model.moe(l).topk_experts());
    all.insert(all.end(), t.begin(), t.end());
  }
  return all;
}

// ------------------------------------------------------------------ gradients

/// "All shared": one routed expert (top-1, so every gate is exactly 1) beside the shared
/// ones: the blocks are dense MLPs (docs/model.md, "Shared experts"); dp = world, ep = 1.
ModelConfig all_shared_model() {
  ModelConfig m = shared_model(Activation::gelu);
  m.num_experts = 1;
  m.top_k = 1;
  return m;
}

TEST(SharedExperts, FullModelGradientsMatchFiniteDifferences) {
  const int W = world_size();
  for (int variant = 0; variant < 3; ++variant) {
    const ModelConfig cfg = variant == 2 ? all_shared_model() : shared_model(variant == 0 ? Activation::gelu : Activation::swiglu);
    const Activation act = cfg.activation;
    ParallelConfig par;
    Mesh mesh(MPI_COMM_WORLD, cfg.num_experts >= W ? W : 1);
    Model<double> model(cfg, par, mesh, 17);
    const Batch b = rank_batch(cfg.seq_len);
    const long long n = global_valid(b);
    model.forward_backward(b, n, 0);
    const double l0 = loss_of(model, b, n);
    const std::vector<int> routed0 = decisions(model);
    // Parameters on the path of the shared experts' input gradient (the position embedding,
    // the norm in front of them), and each block's shared experts' w1, w2 (, w3) together.
    // Each group is checked along a random direction v of +-1 entries: (L(p + eps v) -
    // L(p - eps v)) / 2 eps against <dL/dp, v>, every element of the gradients taking part.
    std::vector<std::vector<std::string>> groups;
    if (variant < 2) groups = {{"embed.wpe"}, {"block0.moe_norm"}};
    for (int l = 0; l < cfg.n_layers; ++l) {
      groups.emplace_back();
      for (const char* w : {"w1", "w2", "w3"})
        if (act == Activation::swiglu || std::string(w) != "w3")
          groups.back().push_back("block" + std::to_string(l) + ".moe.shared." + w);
    }
    Rng rng(3 + variant);
    const double eps = 1e-6;
    double worst = 0, biggest = 0;
    int flips = 0;
    for (const std::vector<std::string>& group : groups) {
      const std::string name = group.front() + (group.size() > 1 ? " and the block's other shared weights" : "");
      std::vector<std::vector<double>> vs;
      double analytic = 0;
      for (const std::string& t : group) {
        const std::vector<double> g = full_grad(model, param_id(model, t));
        vs.emplace_back(g.size());
        for (std::size_t i = 0; i < g.size(); ++i) {
          vs.back()[i] = rng.below(2) ? 1.0 : -1.0;
          analytic += g[i] * vs.back()[i];
        }
      }
      auto move = [&](double delta) {
        for (std::size_t t = 0; t < group.size(); ++t) nudge(model, param_id(model, group[t]), vs[t], delta);
      };
      move(eps);
      const double lp = loss_of(model, b, n);
      flips += decisions(model) != routed0;
      move(-2 * eps);
      const double lm = loss_of(model, b, n);
      flips += decisions(model) != routed0;
      move(eps);
      const double fd = (lp - lm) / (2 * eps);
      const double allowed = 1e-6 * std::max(std::fabs(fd), std::fabs(analytic)) + 5e-9 * std::max(1.0, l0);
      EXPECT_LE(std::fabs(fd - analytic), allowed)
          << "variant " << variant << " dL/d" << name << " along v: analytic " << analytic << ", finite difference " << fd;
      worst = std::max(worst, std::fabs(fd - analytic) / allowed);
      if (name.find("shared") != std::string::npos) biggest = std::max(biggest, std::fabs(analytic));
    }
    EXPECT_EQ(flips, 0) << "a perturbation flipped a routing decision: the check is invalid";
    EXPECT_GT(biggest, 1e-5) << "the sampled shared-expert gradients vanish: the check is vacuous";
    if (world_rank() == 0 && std::getenv("EXAMOE_TEST_VERBOSE"))
      std::printf("[ shared gradcheck ] variant %d: worst |fd - analytic| / tolerance %.3g\n", variant, worst);
  }
}

TEST(SharedExperts, FloatGradientsFollowDouble) {
  const ModelConfig cfg = shared_model(Activation::swiglu);
  Mesh mesh(MPI_COMM_WORLD, world_size());
  Model<double> md(cfg, ParallelConfig{}, mesh, 21);
  Model<float> mf(cfg, ParallelConfig{}, mesh, 21);
  const Batch b = rank_batch(cfg.seq_len);
  const long long n = global_valid(b);
  md.forward_backward(b, n, 0);
  mf.forward_backward(b, n, 0);
  for (int l = 0; l < cfg.n_layers; ++l)
    for (const char* w : {"w1", "w2", "w3"}) {
      const std::string name = "block" + std::to_string(l) + ".moe.shared." + w;
      const std::vector<double> gd = full_grad(md, param_id(md, name)), gf = full_grad(mf, param_id(mf, name));
      double scale = 0, diff = 0;
      for (std::size_t i = 0; i < gd.size(); ++i) {
        scale = std::max(scale, std::fabs(gd[i]));
        diff = std::max(diff, std::fabs(gd[i] - gf[i]));
      }
      EXPECT_GT(scale, 0.0) << name;
      EXPECT_LE(diff, 1e-4 * scale) << name << ": float and double gradients differ";
    }
}

// ------------------------------------------------------ decomposition independence

std::vector<double> one_rank_losses(const TrainConfig& c) {
  std::vector<double> ref;
  if (world_rank() == 0) ref = train(c, MPI_COMM_SELF, nullptr).losses;
  int n = static_cast<int>(ref.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  ref.resize(n);
  MPI_Bcast(ref.data(), n, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return ref;
}

TrainConfig shared_train_config() {
  TrainConfig c = tiny_train_config();
  c.model.num_shared_experts = 2;
  c.model.shared_hidden = 12;
  c.train.steps = 6;
  c.train.warmup = 2;
  return c;
}

TEST(SharedExperts, SameLossesAtEveryRankCountSplitAndOverlap) {
  const int W = world_size();
  const TrainConfig base = shared_train_config();
  const std::vector<double> ref = one_rank_losses(base);
  ASSERT_EQ(static_cast<int>(ref.size()), base.train.steps);
  EXPECT_LT(ref.back(), ref.front()) << "the reference run does not learn";
  TrainConfig plain = base;
  plain.model.num_shared_experts = 0;
  EXPECT_NE(one_rank_losses(plain), ref) << "the shared experts changed nothing";

  std::vector<int> eps{W};
  if (W % 2 == 0 && W > 1) eps.push_back(W / 2);  // dp 2 x ep W/2
  if (W > 1) eps.push_back(1);                    // dp W x ep 1
  std::vector<double> a;  // dp 1 x ep W
  for (int ep : eps) {
    TrainConfig c = base;
    c.parallel.ep = ep;
    const std::vector<double> got = train(c, MPI_COMM_WORLD, nullptr).losses;
    ASSERT_EQ(got.size(), ref.size());
    for (std::size_t i = 0; i < ref.size(); ++i)
      EXPECT_NEAR(got[i], ref[i], 1e-10 * std::fabs(ref[i])) << "dp " << W / ep << " x ep " << ep << ", step " << i;
    if (ep == W) a = got;
  }
  // Bitwise: run to run, and with the exchanges not overlapped (the shared experts then run
  // after the layer's work instead of while its rows travel).
  const std::vector<double> again = train(base, MPI_COMM_WORLD, nullptr).losses;
  TrainConfig no_overlap = base;
  no_overlap.parallel.overlap_exchange = false;
  const std::vector<double> off = train(no_overlap, MPI_COMM_WORLD, nullptr).losses;
  EXPECT_EQ(again, a) << "not bitwise run to run";
  EXPECT_EQ(off, a) << "overlap off changed the losses";
}

TEST(SharedExperts, SwigluKeepGatheredAndCheckpointingChangeNothing) {
  TrainConfig a = shared_train_config();
  a.model.activation = Activation::swiglu;
  a.model.shared_hidden = 0;  // = d_hidden
  a.train.steps = 5;
  TrainConfig b = a;
  b.parallel.reshard_after_forward = false;
  b.parallel.activation_checkpointing = true;
  const auto ra = train(a, MPI_COMM_WORLD, nullptr);
  const auto rb = train(b, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(rb.losses, ra.losses) << "keeping gathered units / recomputing blocks changed the losses";
  EXPECT_LT(rb.memory.activations, rb.memory.activations_without_checkpointing);
}

TEST(SharedExperts, OtherParametersKeepTheirInitialValues) {
  // The shared experts are registered after every other dense parameter: a model with them
  // starts from the same embeddings, attention, routers and experts as one without.
  ModelConfig with = shared_model(Activation::gelu), without = with;
  without.num_shared_experts = 0;
  Mesh mesh(MPI_COMM_WORLD, world_size());
  Model<double> a(with, ParallelConfig{}, mesh, 9), b(without, ParallelConfig{}, mesh, 9);
  auto& Fa = a.fsdp();
  auto& Fb = b.fsdp();
  EXPECT_EQ(Fa.num_params(), Fb.num_params() + 2 * with.n_layers);
  for (int p = 0; p < Fb.num_params(); ++p) {
    ASSERT_EQ(Fa.param_name(p), Fb.param_name(p));
    Fa.gather(Fa.param_unit(p));
    Fb.gather(Fb.param_unit(p));
    EXPECT_EQ(to_host(Fa.param1(p)), to_host(Fb.param1(p))) << Fb.param_name(p);
    Fa.release(Fa.param_unit(p));
    Fb.release(Fb.param_unit(p));
  }
  for (int l = 0; l < with.n_layers; ++l) EXPECT_EQ(to_host(a.moe(l).w1()), to_host(b.moe(l).w1()));
}

// ------------------------------------------------------------------ decoding

TEST(SharedExperts, DecoderMatchesTheFullForward) {
  const ModelConfig cfg = shared_model(Activation::swiglu);
  Mesh mesh(MPI_COMM_WORLD, world_size());
  Model<double> model(cfg, ParallelConfig{}, mesh, 31);
  const Batch b = rank_batch(cfg.seq_len);
  std::vector<float> full;
  model.evaluate(b, nullptr, &full);
  impl::IncrementalDecoder<double> dec(model, b.batch);
  double scale = 0, diff = 0;
  for (int s = 0; s < cfg.seq_len; ++s) {
    std::vector<int> tokens(b.batch);
    for (int q = 0; q < b.batch; ++q) tokens[q] = b.tokens[q * cfg.seq_len + s];
    std::vector<double> lg;
    dec.step(tokens, lg);
    for (int q = 0; q < b.batch; ++q)
      for (int c = 0; c < cfg.vocab; ++c) {
        const double f = full[(static_cast<std::size_t>(q) * cfg.seq_len + s) * cfg.vocab + c];
        scale = std::max(scale, std::fabs(f));
        diff = std::max(diff, std::fabs(lg[static_cast<std::size_t>(q) * cfg.vocab + c] - f));
      }
  }
  // evaluate() hands the logits over in float: they agree to float rounding.
  if (b.batch > 0) EXPECT_GT(scale, 0.0);
  EXPECT_LE(diff, 1e-6 * std::max(scale, 1.0));
}

// ------------------------------------------------------------------ bad input, memory

void expect_train_error(const TrainConfig& c, const std::string& needle) {
  try {
    train(c, MPI_COMM_WORLD, nullptr);
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  MPI_Barrier(MPI_COMM_WORLD);  // every rank got here: nobody hangs
}

#if EXAMOE_ENABLE_HDF5
TEST(SharedExperts, CheckpointsResumeAtAnyRankCountAndRefuseAnotherShape) {
  const std::string dir = make_shared_dir("shared", "resume");
  TrainConfig full = shared_train_config();
  full.model.activation = Activation::swiglu;
  full.checkpoint.dir = dir;
  full.checkpoint.interval = 4;  // one checkpoint, at step 4
  const auto a = train(full, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(a.losses.size(), 6u);
  // Same rank count: bitwise; one rank and dp 2 x ep 2: 1e-10 (the shards and AdamW moments
  // of the shared experts resharded).
  TrainConfig r = full;
  r.checkpoint.resume = checkpoint_path(dir, 4);
  r.checkpoint.interval = 0;  // the resumed runs write nothing
  const auto b = train(r, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(b.losses.size(), 2u);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(b.losses[i], a.losses[4 + i]) << "step " << 4 + i;
  if (world_rank() == 0) {
    const auto c = train(r, MPI_COMM_SELF, nullptr);
    ASSERT_EQ(c.losses.size(), 2u);
    for (int i = 0; i < 2; ++i)
      EXPECT_NEAR(c.losses[i], a.losses[4 + i], 1e-10 * std::fabs(a.losses[4 + i])) << "1 rank, step " << 4 + i;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_size() == 4) {
    TrainConfig s = r;
    s.parallel.ep = 2;
    const auto d = train(s, MPI_COMM_WORLD, nullptr);
    ASSERT_EQ(d.losses.size(), 2u);
    for (int i = 0; i < 2; ++i)
      EXPECT_NEAR(d.losses[i], a.losses[4 + i], 1e-10 * std::fabs(a.losses[4 + i])) << "dp2 x ep2, step " << 4 + i;
  }
  // Another shape: a clear error naming the key, on every rank.
  TrainConfig none = r;
  none.model.num_shared_experts = 0;
  expect_train_error(none, "was written for model.num_shared_experts = 2, this run has model.num_shared_experts = 0");
  TrainConfig wider = r;
  wider.model.shared_hidden = 16;
  expect_train_error(wider, "was written for model.shared_hidden = 12, this run has model.shared_hidden = 16");
  // A checkpoint without shared experts (as every one written before they existed; those
  // resume with the default config, tests/test_checkpoint.cpp) is refused with them.
  TrainConfig old = full;
  old.model.num_shared_experts = 0;
  old.model.shared_hidden = 0;
  old.checkpoint.dir = dir + "/old";
  old.train.steps = 1;
  old.checkpoint.interval = 1;
  train(old, MPI_COMM_WORLD, nullptr);
  TrainConfig add = old;
  add.checkpoint.resume = checkpoint_path(old.checkpoint.dir, 1);
  add.train.steps = 2;
  add.model.num_shared_experts = 1;
  expect_train_error(add, "was written for model.num_shared_experts = 0, this run has model.num_shared_experts = 1");
  remove_shared_dir(dir);
}
#endif

TEST(SharedExperts, AllSharedNoRouted) {
  // No routed experts at all is refused, naming the key and the dense alternative.
  TrainConfig c = shared_train_config();
  c.model.num_experts = 0;
  expect_train_error(c, "model.num_experts must be positive (no routed experts is no MoE model; dense MLP blocks: "
                        "model.num_experts 1 and model.top_k 1");
  // That alternative: every gate is exactly 1, and dp = world gives the losses of one rank.
  c = shared_train_config();
  c.model.num_experts = 1;
  c.model.top_k = 1;
  c.parallel.ep = 1;
  const std::vector<double> ref = one_rank_losses(c);
  const std::vector<double> got = train(c, MPI_COMM_WORLD, nullptr).losses;
  ASSERT_EQ(got.size(), ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-10 * std::fabs(ref[i])) << "step " << i;
  Mesh mesh(MPI_COMM_WORLD, 1);
  Model<double> model(all_shared_model(), ParallelConfig{}, mesh, 5);
  const Batch b = rank_batch(model.config().seq_len);
  model.evaluate(b);
  for (int l = 0; l < model.n_layers(); ++l)
    for (double g : to_host(model.moe(l).gates())) ASSERT_EQ(g, 1.0) << "layer " << l;
}

TEST(SharedExperts, BadKeysNameTheKey) {
  TrainConfig c = shared_train_config();
  c.model.num_shared_experts = -1;
  expect_train_error(c, "model.num_shared_experts must be >= 0 (0 = none) (got -1)");
  c = shared_train_config();
  c.model.shared_hidden = -4;
  expect_train_error(c, "model.shared_hidden must be >= 0 (0 = model.d_hidden) (got -4)");
  c = shared_train_config();
  c.model.num_shared_experts = 1 << 20;
  c.model.shared_hidden = 1 << 12;
  expect_train_error(c, "model.num_shared_experts must be at most (2^31 - 1) / model.shared_hidden");
  TrainConfig t;
  EXPECT_THROW(apply_json_config(t, R"({"model": {"num_shared_experts": "two"}})", "t.json"), Error);
  apply_json_config(t, R"({"model": {"num_shared_experts": 3, "shared_hidden": 40}})", "t.json");
  EXPECT_EQ(t.model.num_shared_experts, 3);
  EXPECT_EQ(t.model.shared_width(), 40);
  // The library's own check, without the key table.
  ModelConfig m = shared_model(Activation::gelu);
  m.shared_hidden = -1;
  try {
    m.validate();
    ADD_FAILURE() << "shared_hidden -1 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("examoe::ModelConfig::validate: num_shared_experts (2) and shared_hidden (-1"),
              std::string::npos)
        << e.what();
  }
  // Left out of the canonical config at their defaults: a default run's config hash (and
  // every checkpoint written before the keys existed) is unchanged.
  EXPECT_EQ(canonical_config(TrainConfig{}).find("shared"), std::string::npos);
  EXPECT_NE(canonical_config(shared_train_config()).find("model.num_shared_experts=2\nmodel.shared_hidden=12\n"),
            std::string::npos);
}

TEST(SharedExperts, MemoryEstimateMatchesTheModel) {
  const int P = world_size();
  for (const bool ckpt : {false, true}) {
    TrainConfig c = shared_train_config();
    c.model.activation = ckpt ? Activation::swiglu : Activation::gelu;
    c.parallel.activation_checkpointing = ckpt;
    Mesh mesh(MPI_COMM_WORLD, P);
    Model<double> model(c.model, c.parallel, mesh, 3);
    AdditionCorpus corpus(c.train.seed, c.data.digits, c.data.val_problems);
    Batch b;
    corpus.train_batch(0, 0, 3, c.model.seq_len, b);
    model.forward_backward(b, 3LL * P * c.model.seq_len, 0);
    const MemoryReport got = model.memory();
    const MemoryReport est = estimate_memory(c.model, c.parallel, P, P, 3LL * c.model.seq_len, sizeof(double));
    TrainConfig none = c;
    none.model.num_shared_experts = 0;
    const MemoryReport plain = estimate_memory(none.model, none.parallel, P, P, 3LL * c.model.seq_len, sizeof(double));
    const std::size_t width = 2 * 12, d = c.model.d_model, per = ckpt ? 3 : 2;
    EXPECT_EQ(est.dense_total_params, got.dense_total_params);
    EXPECT_EQ(est.dense_total_params, plain.dense_total_params + c.model.n_layers * per * d * width);
    EXPECT_EQ(est.dense_shard, got.dense_shard);
    EXPECT_EQ(est.gathered_unit_max, got.gathered_unit_max);
    EXPECT_EQ(est.gathered_peak, got.gathered_peak);
    EXPECT_EQ(est.grad_buffer, got.grad_buffer);
    long long opt = static_cast<long long>(got.optimizer), opt_max = 0;
    MPI_Allreduce(&opt, &opt_max, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_EQ(est.optimizer, static_cast<std::size_t>(opt_max)) << "the fullest rank's AdamW state";
    EXPECT_EQ(est.activations, got.activations);
    EXPECT_EQ(est.activations_without_checkpointing, got.activations_without_checkpointing);
    EXPECT_EQ(est.activations_without_checkpointing - plain.activations_without_checkpointing,
              c.model.n_layers * per * width * 3 * c.model.seq_len * sizeof(double));
    EXPECT_GT(est.buffers, plain.buffers);
  }
}

}  // namespace
}  // namespace examoe::test
