// The router of one MoE layer: its weight Wr[d][E] (replicated) and gradient, and its state
// of the last forward: logits turned probabilities, top-k choices, gates, the global
// statistics (aux and z losses and their coefficients for backward). Equations:
// docs/moe-layer.md, "Router".
#pragma once

#include "layer/dispatch_plan.hpp"

#include <examoe/comm.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/host_readback.hpp>
#include <examoe/impl/router_kernels.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/metrics.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/moe_layer.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace examoe::impl {

template <class Scalar>
class Router {
 public:
  using Space = Kokkos::DefaultExecutionSpace;
  using Mem = Space::memory_space;
  using matrix = Kokkos::View<Scalar**, Kokkos::LayoutRight, Mem>;
  using const_matrix = Kokkos::View<const Scalar**, Kokkos::LayoutRight, Mem>;
  using IView2 = Kokkos::View<int**, Kokkos::LayoutRight, Mem>;
  static_assert(Kokkos::SpaceAccessibility<Space, Mem>::accessible,
                "examoe::impl::Router: the router's views must be accessible from its space");

  /// The router's statistics come down in `readback` (the plan's), where it takes a slot.
  /// `ranks`: the expert-parallel ranks (the number of groups when router.groups is 0).
  Router(const MoEConfig& cfg, int ranks, const Space& space, HostReadback<Space>& readback);

  /// Wr ~ U(-1/sqrt(d), 1/sqrt(d)), keyed by (seed, element).
  void init_weights(std::uint64_t seed);
  /// The step that keys the jitter noise of the next forward (else each forward adds one).
  void set_step(std::uint64_t step);
  /// The global index of this rank's first token in the next forward (its jitter keys),
  /// instead of the exclusive scan of T over the statistics communicator.
  void set_token_offset(std::int64_t first) {
    token_offset_ = first;
    token_offset_set_ = true;
  }

  /// Local half of forward for x[T][d]: logits x Wr, softmax, top-k and gates, and this
  /// rank's probability and lse^2 sums into its readback slot (queued; nothing waits). With
  /// jitter (training) the noise is keyed by the step and the global token index (an
  /// exclusive scan of T over `stats_comm`).
  void forward(const const_matrix& x, bool training, Communicator& stats_comm);
  /// Global half, after the readback's fetch: ONE allreduce over `stats_comm` of
  /// [assignments per expert (from `plan`) |
  /// probability sums | lse^2 sum | T | 0], which is also the agreement that every rank got
  /// here; then the losses, backward's coefficients, tokens per expert and the imbalance
  /// of expert rows per rank under `placement`.
  void reduce_statistics(const DispatchPlan& plan, const Placement& placement,
                         Communicator& stats_comm, LayerStats& stats);

  int tokens() const { return T_; }
  /// The last forward's choices [T][k] and gates [T][k].
  auto topk() const { return rows_of(topk_, T_); }
  auto gates() const { return rows_of(gates_, T_); }
  RouterLosses losses() const { return losses_; }
  /// The last forward's own global sums (reduce_statistics).
  const RouterSums& sums() const { return sums_; }
  /// Gradient accumulation: the step's sums (null: none) replace each forward's own in the
  /// losses, backward's coefficients, tokens per expert and imbalance.
  void set_step_sums(const RouterSums* step_sums) {
    use_step_sums_ = step_sums != nullptr;
    if (step_sums) step_sums_ = *step_sums;
  }

  /// dL/dgate [T][k] of the current backward, for the combine^T to fill.
  auto gate_grads();
  /// Router backward from the gate gradients: dWr += x^T dz (the step's part summed over
  /// `reduce` first when given), and dx = dz Wr^T (=, the caller adds the expert part).
  void backward(const const_matrix& x, Collectives<Space>* reduce, const matrix& dx);

  /// The selection bias b[E] (all 0 unless router.bias_rate > 0), identical on every rank.
  const std::vector<double>& bias() const { return bias_h_; }
  /// Replaces b (a checkpoint's); `b` must have E entries. Ignored with the bias off. One
  /// host wait (the upload's staging buffer is reused).
  void set_bias(const std::vector<double>& b);
  /// b_e += bias_rate * sign(mean_e' c_e' - c_e) for the global assignment counts c of the
  /// training forwards since the last update; then forgets them. No-op when the bias is off.
  void update_bias();
  void discard_loads() { counts_since_update_.assign(E_, 0.0); }
  /// The number of groups tokens choose among (0 when routing is not group-limited).
  int groups() const { return params_.topk_groups > 0 ? params_.groups : 0; }

  const matrix& weight() const { return Wr_; }
  const matrix& grad() const { return dWr_; }
  void zero_grad() { Kokkos::deep_copy(space_, dWr_, Scalar(0)); }
  std::int64_t workspace_allocations() const { return ws_.allocations(); }

 private:
  using SView1 = Kokkos::View<Scalar*, Mem>;
  using DView1 = Kokkos::View<double*, Mem>;
  void reserve_mode_views();
  /// After the statistics allreduce: keeps red_'s sums in sums_ and, with step sums set,
  /// writes those into red_ in their place.
  void adopt_step_sums();
  Space space_;
  int E_ = 0, k_ = 1, d_ = 0, T_ = 0;
  double alpha_ = 0, beta_ = 0;  // aux and z loss coefficients
  double jitter_ = 0;            // the config's jitter (training forwards only)
  matrix Wr_, dWr_, dWr_step_;
  matrix probs_, dz_, gates_, dgate_, q_;
  SView1 lse_, inv_sum_;
  IView2 topk_, chosen_;
  DView1 aux_coef_;  // [E]: alpha E f_e / T_g
  Kokkos::View<double*, kc::StagingSpace> aux_coef_h_;  // pinned on CUDA: the upload is asynchronous
  HostReadback<Space>& readback_;
  HostReadback<Space>::Slot sums_slot_;  // [E+1]: sum_t p[t][e], then sum_t lse[t]^2
  double zcoef_ = 0;  // 2 beta / T_g
  RouterLosses losses_;
  RouterParams params_;
  RouterModeViews<Scalar, Mem> modes_;  // bias, and the sigmoid's and groups' per-token views
  SView1 bias_;                         // [E] the device copy of bias_h_ (selection only)
  Kokkos::View<Scalar*, kc::StagingSpace> bias_staging_;
  std::vector<double> bias_h_;          // [E] b, in double: what checkpoints keep
  std::vector<double> counts_since_update_;  // [E] global assignments of training forwards
  double bias_rate_ = 0;
  bool training_ = false;
  std::uint64_t step_ = 0;
  bool step_set_ = false;
  std::vector<double> red_;  // statistics allreduce buffer
  std::int64_t token_offset_ = 0;  // set_token_offset, for the next forward only
  bool token_offset_set_ = false;
  RouterSums sums_, step_sums_;  // the last forward's global sums; the step's (accumulation)
  bool use_step_sums_ = false;
  Workspace ws_{"examoe::moe::"};
};

template <class Scalar>
auto Router<Scalar>::gate_grads() {
  ws_.reserve(dgate_, "dgate", T_, k_);
  return rows_of(dgate_, T_);
}

extern template class Router<float>;
extern template class Router<double>;

}  // namespace examoe::impl
