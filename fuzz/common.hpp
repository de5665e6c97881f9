// Shared by the fuzz targets and the seed generator.
#pragma once
#include <examoe/train.hpp>

namespace examoe::fuzz {

/// The small model of the pristine checkpoint (seed corpus and the edit mode of
/// fuzz_checkpoint) and of the resume check: one block, two experts, a few KiB of weights.
inline TrainConfig tiny() {
  TrainConfig c;
  c.model.d_model = 8;
  c.model.n_layers = 1;
  c.model.n_heads = 2;
  c.model.seq_len = 8;
  c.model.d_hidden = 8;
  c.model.num_experts = 2;
  c.model.top_k = 1;
  c.model.activation = Activation::swiglu;
  c.train.steps = 1;
  c.train.batch = 2;
  c.train.precision = "double";
  c.data.digits = 1;
  c.data.val_problems = 4;
  c.log.quiet = true;
  c.log.eval_interval = 1000;
  c.train.memory_limit = "256MiB";
  return c;
}

}  // namespace examoe::fuzz
