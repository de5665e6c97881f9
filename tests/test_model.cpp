// The model's parameter table (Model::param_table): one row per optimizer tensor, in the one
// order that optimizer registration, expert migration and checkpoint I/O share, with names,
// global shapes, owners and decay checked against the model's definition (docs/model.md), and
// the views of each row pointing at the storage they stand for, also after the experts move;
// and gradient accumulation (Model::forward_backward_accumulated) against the step over the
// union of the micro-batches.
#include "test_util.hpp"

#include "train/setup.hpp"

#include <examoe/data.hpp>
#include <examoe/error.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>

#include <memory>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

ModelConfig table_config(Activation act) {
  ModelConfig c = tiny_train_config().model;
  c.activation = act;
  c.num_experts = std::max(4, world_size());
  return c;
}

TEST(Model, ParamTableListsUnitsThenExpertTensorsPerLayer) {
  for (Activation act : {Activation::gelu, Activation::swiglu}) {
    const ModelConfig c = table_config(act);
    Mesh mesh(MPI_COMM_WORLD);
    Model<double> model(c, ParallelConfig(), mesh, 11);
    const auto& table = model.param_table();
    const int d = c.d_model, h = c.d_hidden, E = c.num_experts, L = c.n_layers;
    const int per_layer = act == Activation::swiglu ? 3 : 2;
    // Units: embed (wte, wpe), one per block, head (final_norm, lm_head): docs/model.md.
    std::vector<std::string> names = {"embed"};
    std::vector<long long> numel = {static_cast<long long>(c.vocab) * d + static_cast<long long>(c.seq_len) * d};
    for (int l = 0; l < L; ++l) {
      names.push_back("block" + std::to_string(l));
      numel.push_back(d + 4LL * d * d + d + static_cast<long long>(d) * E);  // norms, q k v o, router
    }
    names.push_back("head");
    numel.push_back(d + static_cast<long long>(d) * c.vocab);
    const int U = static_cast<int>(names.size());
    ASSERT_EQ(static_cast<int>(table.size()), U + L * per_layer) << to_string(act);
    auto& F = model.fsdp();
    for (int i = 0; i < U; ++i) {
      const ParamSlot& row = table[i];
      EXPECT_EQ(row.owner, ParamSlot::Owner::fsdp_unit) << i;
      EXPECT_EQ(row.unit, i);
      EXPECT_EQ(row.name, names[i]);
      ASSERT_EQ(row.shape.size(), 1u);
      EXPECT_EQ(row.shape[0], numel[i]) << row.name;
      EXPECT_EQ(model.param_values(i).data(), F.shard(i).data()) << row.name;
      EXPECT_EQ(model.param_values(i).extent(0), F.shard_numel(i)) << row.name;
      EXPECT_EQ(model.param_grads(i).data(), F.shard_grad(i).data()) << row.name;
      EXPECT_EQ(model.param_decay_mask(i).data(), F.shard_decay_mask(i).data()) << row.name;
    }
    const char* tensors[] = {"w1", "w2", "w3"};
    for (int l = 0; l < L; ++l)
      for (int t = 0; t < per_layer; ++t) {
        const int i = U + l * per_layer + t;
        const ParamSlot& row = table[i];
        const ExpertTensor et = static_cast<ExpertTensor>(t);
        EXPECT_EQ(row.owner, ParamSlot::Owner::experts) << i;
        EXPECT_EQ(row.layer, l);
        EXPECT_EQ(row.tensor, et);
        EXPECT_EQ(row.name, "layer" + std::to_string(l) + "." + tensors[t]);
        const std::vector<int> want = et == ExpertTensor::w2 ? std::vector<int>{E, h, d} : std::vector<int>{E, d, h};
        EXPECT_EQ(row.shape, want) << row.name;
        EXPECT_TRUE(row.decay) << row.name;
        EXPECT_EQ(model.param_slot(l, et), i);
        const auto w = model.moe(l).weights(et), g = model.moe(l).weight_grads(et);
        EXPECT_EQ(model.param_values(i).data(), w.data()) << row.name;
        EXPECT_EQ(model.param_values(i).extent(0), static_cast<std::size_t>(model.moe(l).num_local_experts()) * d * h);
        EXPECT_EQ(model.param_grads(i).data(), g.data()) << row.name;
        EXPECT_EQ(model.param_decay_mask(i).extent(0), 0u) << "experts decay on every element";
      }
    if (act == Activation::gelu) EXPECT_THROW(model.param_slot(0, ExpertTensor::w3), Error);
  }
}

TEST(Model, ParamTableViewsFollowTheExpertsWhenTheyMove) {
  const ModelConfig c = table_config(Activation::swiglu);
  Mesh mesh(MPI_COMM_WORLD);
  Model<double> model(c, ParallelConfig(), mesh, 11);
  const int P = mesh.ep_size(), E = c.num_experts;
  // Expert e moves to rank (e + 1) % P: every rank keeps at least one expert.
  std::vector<int> owners(E);
  for (int e = 0; e < E; ++e) owners[e] = (model.moe(0).placement().owner(e) + 1) % P;
  model.moe(0).set_placement(Placement::from_owners(owners, P));
  for (ExpertTensor t : model.moe(0).expert_tensors()) {
    const int i = model.param_slot(0, t);
    const auto w = model.moe(0).weights(t);
    EXPECT_EQ(model.param_values(i).data(), w.data()) << to_string(t);
    EXPECT_EQ(model.param_values(i).extent(0), w.size()) << to_string(t);
    EXPECT_EQ(model.param_grads(i).data(), model.moe(0).weight_grads(t).data()) << to_string(t);
  }
}

/// max |a - b| / max |b| of two tensors (0 for two zero tensors).
template <class V>
double relative_difference(const V& a, const V& b) {
  const std::vector<double> ha = to_host(a), hb = to_host(b);
  EXPECT_EQ(ha.size(), hb.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < ha.size() && i < hb.size(); ++i) {
    diff = std::max(diff, std::fabs(ha[i] - hb[i]));
    scale = std::max(scale, std::fabs(hb[i]));
  }
  return scale > 0 ? diff / scale : diff;
}

double relative_difference(double a, double b) { return std::fabs(a - b) / std::max(1e-300, std::fabs(b)); }

/// Every gradient and (after the update) every parameter of `a` against `u`'s, row by row of
/// the parameter table (to 1e-10 relative, or bitwise); the step's statistics of every layer.
void expect_same_model_step(Model<double>& a, Model<double>& u, const std::string& what, bool grads, bool bitwise) {
  const auto& table = u.param_table();
  for (int i = 0; i < static_cast<int>(table.size()); ++i) {
    const double rel = grads ? relative_difference(a.param_grads(i), u.param_grads(i))
                             : relative_difference(a.param_values(i), u.param_values(i));
    EXPECT_LE(rel, bitwise ? 0.0 : 1e-10) << what << ": " << (grads ? "gradient of " : "parameters of ") << table[i].name;
  }
  if (!grads) return;
  for (int l = 0; l < u.n_layers(); ++l) {
    const LayerStats &sa = a.layer_stats(l), &su = u.layer_stats(l);
    EXPECT_EQ(sa.tokens_per_expert, su.tokens_per_expert) << what << ": layer " << l;
    EXPECT_EQ(sa.imbalance, su.imbalance) << what << ": layer " << l;
    EXPECT_EQ(sa.tokens, su.tokens) << what << ": layer " << l;
    EXPECT_EQ(sa.rows_sent, su.rows_sent) << what << ": layer " << l;
    EXPECT_EQ(sa.bytes_sent_dispatch + sa.bytes_sent_combine, su.bytes_sent_dispatch + su.bytes_sent_combine) << what;
    EXPECT_EQ(sa.rows_per_local_expert, su.rows_per_local_expert) << what << ": layer " << l;
  }
}

/// One optimizer step over M micro-batches against one step over their union, two steps in
/// a row (the parameters compared after the second update carry the first), at every dp x ep
/// of the world with M = 2, and at dp = 1 also M = 4 and 1, with the aux and z losses and
/// router jitter on; M = 4 recomputes its blocks (activation checkpointing), M = 2 keeps the
/// units gathered at dp = 1. One union model per mesh is the reference of all (each
/// collective costs at 3-4 ranks on 2 cores).
TEST(ModelAccumulation, MicroBatchesGiveTheStepOfTheirUnion) {
  const int W = world_size(), me = world_rank();
  ModelConfig c = tiny_train_config().model;
  c.router.aux_loss_coef = 0.05;
  c.router.z_loss_coef = 0.01;
  c.router.jitter = 0.1;
  const int B = 4 * W;  // every rank's share divides into 4
  const AdditionCorpus corpus(7, 2, 16);
  const auto share = impl::split(B, W, me);
  for (int ep = W; ep >= 1; --ep) {
    if (W % ep != 0) continue;
    const std::string mesh_name = "dp " + std::to_string(W / ep) + " x ep " + std::to_string(ep);
    std::vector<int> Ms{2};
    if (ep == W) Ms = {2, 4, 1};
    ParallelConfig pu;
    pu.ep = ep;
    Mesh mesh(MPI_COMM_WORLD, ep);
    Model<double> u(c, pu, mesh, 11);
    AdamWConfig ac;
    ac.weight_decay = 0.05;
    AdamW<double> ou(ac);
    impl::register_parameters(u, ou);
    std::vector<std::unique_ptr<Model<double>>> models;
    std::vector<std::unique_ptr<AdamW<double>>> opts;
    std::vector<ParallelConfig> pars;
    for (int M : Ms) {
      ParallelConfig pa = pu;
      pa.activation_checkpointing = M == 4;
      pa.reshard_after_forward = !(M == 2 && ep == W);
      pars.push_back(pa);
      models.push_back(std::make_unique<Model<double>>(c, pa, mesh, 11));
      opts.push_back(std::make_unique<AdamW<double>>(ac));
      impl::register_parameters(*models.back(), *opts.back());
    }
    for (int step = 0; step < 2; ++step) {
      Batch all;
      corpus.train_batch(step, share.first, share.second, c.seq_len, all);
      long long valid = 0;
      for (int t : all.targets) valid += t >= 0 ? 1 : 0;
      MPI_Allreduce(MPI_IN_PLACE, &valid, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
      const StepStats su = u.forward_backward(all, valid, step);
      EXPECT_GT(su.aux, 0);
      EXPECT_GT(su.z, 0);
      ou.step(1e-2, 1.0);
      for (std::size_t i = 0; i < Ms.size(); ++i) {
        const int M = Ms[i];
        Model<double>& a = *models[i];
        const std::string at = mesh_name + ", M = " + std::to_string(M) + ", step " + std::to_string(step);
        std::vector<Batch> micro(M);
        for (int m = 0; m < M; ++m)
          corpus.train_batch(step, share.first + m * (share.second / M), share.second / M, c.seq_len, micro[m]);
        const StepStats sa = a.forward_backward_accumulated(micro, valid, step);
        EXPECT_LE(relative_difference(sa.aux, su.aux), 1e-10) << at << ": aux " << sa.aux << " vs " << su.aux;
        EXPECT_LE(relative_difference(sa.z, su.z), 1e-10) << at << ": z " << sa.z << " vs " << su.z;
        if (share.second > 0) EXPECT_LE(relative_difference(sa.ce_sum, su.ce_sum), 1e-10) << at;
        EXPECT_EQ(sa.valid, su.valid) << at;
        EXPECT_EQ(sa.correct, su.correct) << at;
        expect_same_model_step(a, u, at, true, M == 1);
        opts[i]->step(1e-2, 1.0);
        expect_same_model_step(a, u, at, false, M == 1);
      }
    }
    // The memory of one micro-batch: Model::memory() as estimate_memory says it.
    for (std::size_t i = 0; i < Ms.size(); ++i) {
      const int M = Ms[i];
      const MemoryReport est = estimate_memory(c, pars[i], W, ep,
                                               static_cast<long long>(share.second / M) * c.seq_len, sizeof(double), M);
      const MemoryReport got = models[i]->memory();
      EXPECT_EQ(got.activations, est.activations) << mesh_name << ", M = " << M;
      EXPECT_EQ(got.grad_buffer, est.grad_buffer) << mesh_name << ", M = " << M;
      if (M > 1) EXPECT_GT(got.grad_buffer, u.memory().grad_buffer) << mesh_name << ": the accumulation buffer";
      if (M > 1 && share.second > 0) EXPECT_LT(got.activations, u.memory().activations) << mesh_name << ", M = " << M;
    }
  }
}

/// The micro-batches must be the step's in every layer: sums of another layer shape are refused.
TEST(ModelAccumulation, StepRouterSumsOfAnotherShapeAreRefused) {
  Mesh mesh(MPI_COMM_WORLD);
  Model<double> m(tiny_train_config().model, ParallelConfig(), mesh, 11);
  RouterSums sums;
  sums.assignments.assign(3, 1.0);
  sums.probabilities.assign(3, 1.0);
  try {
    m.moe(0).set_step_router_sums(sums);
    ADD_FAILURE() << "sums of 3 experts accepted by a layer of 4";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("examoe::MoELayer::set_step_router_sums"), std::string::npos) << e.what();
  }
  EXPECT_THROW(m.forward_backward_accumulated({}, 0, 0), Error);
}

}  // namespace
}  // namespace examoe::test
