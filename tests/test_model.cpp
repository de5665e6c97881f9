// The model's parameter table (Model::param_table): one row per optimizer tensor, in the one
// order that optimizer registration, expert migration and checkpoint I/O share, with names,
// global shapes, owners and decay checked against the model's definition (docs/model.md), and
// the views of each row pointing at the storage they stand for, also after the experts move.
#include "test_util.hpp"

#include <examoe/error.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>

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

}  // namespace
}  // namespace examoe::test
