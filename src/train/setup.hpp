#pragma once
// What a training run and an eval run both build from a config: the rank's share of a batch,
// the AdamW settings, and the optimizer's registration of the model's parameter table.
// Private to src/train.
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <algorithm>
#include <utility>
#include <vector>

namespace examoe::impl {

/// [first, first+count) of n items split as evenly as possible over `parts`.
inline std::pair<int, int> split(int n, int parts, int part) {
  const int base = n / parts, extra = n % parts;
  const int first = part * base + std::min(part, extra);
  return {first, base + (part < extra ? 1 : 0)};
}

/// AdamW settings of a training config.
inline AdamWConfig adamw_config(const TrainConfig& cfg) {
  AdamWConfig ac;
  ac.beta1 = cfg.train.beta1;
  ac.beta2 = cfg.train.beta2;
  ac.eps = cfg.train.eps;
  ac.weight_decay = cfg.train.weight_decay;
  return ac;
}

/// Registers every row of the model's parameter table with the optimizer (AdamW tensor i is
/// row i), also where this rank owns no expert. Returns the expert gradient views (for the
/// global norm), in table order.
template <class S>
std::vector<typename AdamW<S>::vector> register_parameters(Model<S>& model, AdamW<S>& opt) {
  std::vector<typename AdamW<S>::vector> expert_grads;
  const auto& table = model.param_table();
  for (int i = 0; i < static_cast<int>(table.size()); ++i) {
    opt.add(model.param_values(i), model.param_grads(i), model.param_decay_mask(i), table[i].decay);
    if (table[i].owner == ParamSlot::Owner::experts) expert_grads.push_back(model.param_grads(i));
  }
  return expert_grads;
}

}  // namespace examoe::impl
