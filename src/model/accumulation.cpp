// Gradient accumulation: one optimizer step's forward and backward over several micro-batches
// of this rank's share, with the result of one step over their union (docs/model.md,
// "Gradient accumulation"). Pass 1 runs every micro-batch forward only and sums each layer's
// router statistics (the aux loss needs the whole step's f_e before any backward); pass 2
// runs each micro-batch forward and backward with those sums.
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/model.hpp>

#include <algorithm>
#include <string>

namespace examoe {

namespace {

/// The step's statistics of a layer before its first micro-batch: no rows, no time.
LayerStats empty_step_stats(const LayerStats& like) {
  LayerStats s;
  s.rows_per_local_expert.assign(like.rows_per_local_expert.size(), 0);
  s.tokens_per_expert.assign(like.tokens_per_expert.size(), 0);
  return s;
}

void add_seconds(LayerStats& step, const LayerStats& one) {
  for (int i = 0; i < kNumPhases; ++i) step.seconds[i] += one.seconds[i];
}

/// One micro-batch's forward counters added to the step's; the tokens per expert and the
/// imbalance are already the step's (the layer computes them from the step's sums).
void add_counters(LayerStats& step, const LayerStats& one) {
  const double before = static_cast<double>(step.tokens), now = static_cast<double>(one.tokens);
  step.ranks_per_token = before + now > 0
                             ? (step.ranks_per_token * before + one.ranks_per_token * now) / (before + now)
                             : 0.0;  // the mean over the step's tokens
  step.max_ranks_per_token = std::max(step.max_ranks_per_token, one.max_ranks_per_token);
  step.dropped_per_expert.resize(one.dropped_per_expert.size(), 0);
  for (std::size_t i = 0; i < one.dropped_per_expert.size(); ++i) step.dropped_per_expert[i] += one.dropped_per_expert[i];
  step.capacity = one.capacity;  // a capacity holds per micro-batch
  step.tokens += one.tokens;
  step.assignments += one.assignments;
  step.rows_local += one.rows_local;
  step.rows_sent += one.rows_sent;
  step.rows_received += one.rows_received;
  step.expert_rows += one.expert_rows;
  step.bytes_sent_dispatch += one.bytes_sent_dispatch;
  step.bytes_recv_dispatch += one.bytes_recv_dispatch;
  step.bytes_sent_combine += one.bytes_sent_combine;
  step.bytes_recv_combine += one.bytes_recv_combine;
  step.rows_per_local_expert.resize(one.rows_per_local_expert.size(), 0);
  for (std::size_t i = 0; i < one.rows_per_local_expert.size(); ++i)
    step.rows_per_local_expert[i] += one.rows_per_local_expert[i];
  step.tokens_per_expert = one.tokens_per_expert;
  step.imbalance = one.imbalance;
}

}  // namespace

template <class S>
StepStats Model<S>::forward_backward_accumulated(const std::vector<Batch>& micro, long long global_valid,
                                                 std::uint64_t step) {
  if (micro.empty()) throw Error("examoe::Model::forward_backward_accumulated: no micro-batch");
  if (micro.size() == 1) return forward_backward(micro[0], global_valid, step);
  // Whatever happens (an error agreed in a micro-batch), the layers, FSDP and the jitter keys
  // go back to single-batch steps.
  struct EndAccumulation {
    Model& m;
    ~EndAccumulation() { m.end_accumulation(); }
  } end{*this};
  phase_s_.fill(0.0);
  step_stats_valid_ = false;
  if (time_phases_) {
    impl::host_sync(space_);
    tick_ = std::chrono::steady_clock::now();
  }
  step_stats_.clear();
  for (const auto& m : moe_) step_stats_.push_back(empty_step_stats(m->stats()));
  const std::vector<std::int64_t> offsets = micro_batch_token_offsets(micro);
  const std::vector<RouterSums> sums = router_statistics_pass(micro, offsets, step);
  for (int l = 0; l < cfg_.n_layers; ++l) moe_[l]->set_step_router_sums(sums[l]);
  for (int l = 0; l < cfg_.n_layers; ++l) moe_[l]->zero_grad();
  StepStats st;
  for (std::size_t m = 0; m < micro.size(); ++m)
    micro_batch_forward_backward(micro[m], offsets[m], global_valid, step, m > 0, st);
  reduce_expert_grads();
  tick(StepPhase::expert_allreduce);
  impl::count_host_sync();
  Kokkos::fence();
  step_stats_valid_ = true;
  return st;
}

/// The global index of each micro-batch's first token in the whole step's batch (this rank's
/// share follows the lower ranks' shares; its micro-batches follow one another), so the jitter
/// noise of a token is the union's. -1 (the layers' own scan) without jitter.
template <class S>
std::vector<std::int64_t> Model<S>::micro_batch_token_offsets(const std::vector<Batch>& micro) {
  std::vector<std::int64_t> offsets(micro.size(), -1);
  if (!(cfg_.router.jitter > 0)) return offsets;
  long long rows = 0;
  for (const Batch& b : micro) rows += static_cast<long long>(b.batch) * cfg_.seq_len;
  long long first = 0;
  {
    impl::CollectiveLabel label("model.micro_batch_offsets");
    first = mesh_.world().exscan_sum(rows);
  }
  for (std::size_t m = 0; m < micro.size(); ++m) {
    offsets[m] = first;
    first += static_cast<long long>(micro[m].batch) * cfg_.seq_len;
  }
  return offsets;
}

template <class S>
void Model<S>::prepare_agreed(const Batch& b) {
  impl::CollectiveLabel label("model.check_batch");
  impl::agree(mesh_.world(), [&] { prepare(b); });
}

/// Pass 1: every micro-batch through the embedding and the blocks (training: the jitter of
/// the step), each layer's global router sums added up. Nothing of it is kept but the sums.
template <class S>
std::vector<RouterSums> Model<S>::router_statistics_pass(const std::vector<Batch>& micro,
                                                         const std::vector<std::int64_t>& offsets,
                                                         std::uint64_t step) {
  impl::kc::ScopedRegion region("examoe::model::router_statistics_pass");
  std::vector<RouterSums> sums(cfg_.n_layers);
  for (std::size_t m = 0; m < micro.size(); ++m) {
    prepare_agreed(micro[m]);
    tick(StepPhase::data);
    token_offset_ = offsets[m];
    StepStats ignored;  // the micro-batch's own losses: not the step's
    forward_blocks(true, step, ignored);
    for (int l = 0; l < cfg_.n_layers; ++l) {
      sums[l] += moe_[l]->router_sums();
      add_seconds(step_stats_[l], moe_[l]->stats());
    }
  }
  return sums;
}

/// Pass 2, one micro-batch: forward, loss (scaled by the step's targets), backward. The first
/// micro-batch writes the shard gradients, the others add to them; each adds its expert
/// gradients, and its own router gradient goes through its block's reduce-scatter.
template <class S>
void Model<S>::micro_batch_forward_backward(const Batch& b, std::int64_t offset, long long global_valid,
                                            std::uint64_t step, bool accumulate, StepStats& st) {
  prepare_agreed(b);
  tick(StepPhase::data);
  token_offset_ = offset;
  StepStats one;
  forward_blocks(true, step, one);
  head_forward_loss(global_valid, one, nullptr, nullptr);
  if (accumulate)
    for (int l = 0; l < cfg_.n_layers; ++l) Kokkos::deep_copy(space_, moe_[l]->router_grad(), S(0));
  fsdp_->set_grad_accumulation(accumulate);
  tick(StepPhase::moe);
  head_backward();
  for (int l = cfg_.n_layers - 1; l >= 0; --l) block_backward(l, step);
  embedding_backward();
  st.ce_sum += one.ce_sum;
  st.valid += one.valid;
  st.correct += one.correct;
  st.aux = one.aux;  // every micro-batch reports the step's losses
  st.z = one.z;
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const LayerStats& ls = moe_[l]->stats();
    add_counters(step_stats_[l], ls);
    add_seconds(step_stats_[l], ls);
  }
}

template <class S>
void Model<S>::end_accumulation() {
  for (auto& m : moe_) m->clear_step_router_sums();
  fsdp_->set_grad_accumulation(false);
  token_offset_ = -1;
}

template <class S>
const LayerStats& Model<S>::layer_stats(int l) const {
  return step_stats_valid_ ? step_stats_[l] : moe_[l]->stats();
}

// This file's members of Model<S> (model.cpp instantiates the rest; model.hpp's extern
// template stops implicit instantiation).
#define EXAMOE_INSTANTIATE_ACCUMULATION(S)                                                                     \
  template StepStats Model<S>::forward_backward_accumulated(const std::vector<Batch>&, long long, std::uint64_t); \
  template const LayerStats& Model<S>::layer_stats(int) const;                                                 \
  template std::vector<std::int64_t> Model<S>::micro_batch_token_offsets(const std::vector<Batch>&);            \
  template void Model<S>::prepare_agreed(const Batch&);                                                           \
  template std::vector<RouterSums> Model<S>::router_statistics_pass(                                              \
      const std::vector<Batch>&, const std::vector<std::int64_t>&, std::uint64_t);                                \
  template void Model<S>::micro_batch_forward_backward(const Batch&, std::int64_t, long long, std::uint64_t, bool, \
                                                       StepStats&);                                               \
  template void Model<S>::end_accumulation();
EXAMOE_INSTANTIATE_ACCUMULATION(float)
EXAMOE_INSTANTIATE_ACCUMULATION(double)
#undef EXAMOE_INSTANTIATE_ACCUMULATION

}  // namespace examoe
