#pragma once
#include <examoe/comm.hpp>
#include <examoe/metrics.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <functional>
#include <memory>
#include <vector>

namespace examoe {

/// Losses of the router, global over the communicator (identical on every rank).
struct RouterLosses {
  double aux = 0.0;  ///< alpha * E * sum_i f_i P_i
  double z = 0.0;    ///< beta * mean_t logsumexp(u_t)^2
};

/// The router's global sums (over the statistics communicator) that its losses, their
/// backward coefficients and the tokens per expert come from: of one forward, or added over
/// the micro-batches of one optimizer step (gradient accumulation, docs/model.md).
struct RouterSums {
  std::vector<double> assignments;    ///< [E]: top-k assignments per expert
  std::vector<double> probabilities;  ///< [E]: sum over tokens of p[t][e]
  double lse_squares = 0;             ///< sum over tokens of logsumexp(u_t)^2
  double tokens = 0;                  ///< T_g
  /// Adds `o` (an empty *this takes o's shape).
  RouterSums& operator+=(const RouterSums& o);
};

/// How a MoELayer is connected: its communicators and its execution-space instance.
///
/// The layer needs a communicator for dispatch and combine, given either as an MPI
/// communicator (`comm`, duplicated by the layer, backend chosen by `comm_options`) or as one
/// the caller built (`shared_comm`, e.g. examoe::Mesh's, shared by every layer of a model so
/// a model has one NCCL communicator, not one per layer). The router statistics (aux and z
/// losses, their gradients, token counts, error agreement in forward/backward) are reduced
/// over the statistics communicator (`stats_comm` or `shared_stats_comm`; neither: the
/// dispatch communicator). It must contain the dispatch communicator: with data-parallel
/// replicas of the expert-parallel group, pass the world so the losses are those of the
/// global batch at any dp x ep split.
struct MoELayerOptions {
  using execution_space = Kokkos::DefaultExecutionSpace;
  MPI_Comm comm = MPI_COMM_NULL;           ///< dispatch and combine (duplicated)
  /// The backend of `comm` (auto takes NCCL when this build has it and the views live in
  /// GPU memory).
  CommOptions comm_options;
  MPI_Comm stats_comm = MPI_COMM_NULL;     ///< router statistics (duplicated, MPI)
  std::shared_ptr<Communicator> shared_comm;        ///< instead of `comm`
  std::shared_ptr<Communicator> shared_stats_comm;  ///< instead of `stats_comm`
  /// Every kernel of the layer runs on this instance; a device backend in `shared_comm` must
  /// have been built for its stream.
  execution_space space;
};

/// One expert-parallel Mixture-of-Experts layer.
///
/// Each rank passes its own tokens x[T][d] (T may differ between ranks and may be 0) and gets
/// out[T][d] = sum_j gate[t][j] * expert_{e_j}(x[t]). Experts are spread over the ranks of
/// the communicator by a Placement; the router weight is replicated. Forward runs ONE
/// variable-size all-to-all per direction, and so does backward. Parameter gradients
/// accumulate (+=) until zero_grad(). Equations: docs/moe-layer.md.
///
/// All Kokkos work runs on the execution-space instance of the options. Views are
/// LayoutRight in the default execution space's memory space. `x` must stay unchanged
/// between forward() and the matching backward().
template <class Scalar>
class MoELayer {
 public:
  using scalar_type = Scalar;
  using execution_space = Kokkos::DefaultExecutionSpace;
  using memory_space = execution_space::memory_space;
  using matrix = Kokkos::View<Scalar**, Kokkos::LayoutRight, memory_space>;
  using const_matrix = Kokkos::View<const Scalar**, Kokkos::LayoutRight, memory_space>;
  using tensor3 = Kokkos::View<Scalar***, Kokkos::LayoutRight, memory_space>;
  static_assert(Kokkos::SpaceAccessibility<execution_space, memory_space>::accessible,
                "examoe::MoELayer: the layer's views must be accessible from its execution space");

  /// Builds the layer as `options` say. Collective over the statistics communicator: every
  /// rank must pass an identical config; a difference, or an invalid config on any rank,
  /// throws examoe::Error on every rank. Options without a communicator, or with both
  /// `comm` and `shared_comm`, throw examoe::Error.
  MoELayer(const MoEConfig& config, const MoELayerOptions& options);
  /// The common case: on a duplicate of `comm` (default backend, default instance), which
  /// also carries the router statistics.
  MoELayer(const MoEConfig& config, MPI_Comm comm);
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;
  MoELayer(MoELayer&&) noexcept;
  MoELayer& operator=(MoELayer&&) noexcept;

  /// Deterministic init from a seed, by global expert id: the same model at any rank count.
  /// Router and expert weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  void init_parameters(std::uint64_t seed);

  /// The caller's work that needs nothing of this layer (e.g. a model's shared experts),
  /// given to forward or backward to run while the layer's first row exchange travels when
  /// the layer overlaps its exchanges (MoEConfig::overlap_exchange, more than one rank), else
  /// at the end of that call; either way exactly once, on the layer's instance. It must not
  /// use the layer; the layer's results do not depend on it, nor its on where it ran.
  using AlongsideWork = std::function<void()>;
  /// Forward. x: [T][d] (T >= 0), out: [T][d]. `training` enables the jitter noise.
  /// Collective over the communicator.
  void forward(const const_matrix& x, const matrix& out, bool training = true,
               const AlongsideWork& alongside = {});
  /// Backward of the last forward, for loss L = L_outer(out) + aux + z: given dL/dout, writes
  /// dL/dx into dx and accumulates the router and expert weight gradients. Collective.
  void backward(const const_matrix& dout, const matrix& dx, const AlongsideWork& alongside = {});
  void zero_grad();
  /// Sets the step that keys the jitter noise of the next forward (by default every forward
  /// advances it by one). Recomputing a forward (activation checkpointing) with the same
  /// step reproduces it exactly.
  void set_step(std::uint64_t step);
  /// Sets the global index of this rank's first token in the next forward, which keys its
  /// jitter noise (by default an exclusive scan of T over the statistics communicator): a
  /// micro-batch keys its tokens as they are keyed in the whole step's batch. Set on every
  /// rank or on none.
  void set_token_offset(std::int64_t first);

  /// The global router sums of the last forward (its own, also while step sums are set).
  const RouterSums& router_sums() const;
  /// Gradient accumulation: until clear_step_router_sums(), every forward takes its aux and
  /// z losses, their backward coefficients (alpha E f_e / T_g, 2 beta / T_g), tokens per
  /// expert and imbalance from `sums` (the whole optimizer step's) instead of its own.
  void set_step_router_sums(const RouterSums& sums);
  void clear_step_router_sums();

  /// Aux-loss-free balancing (router.bias_rate > 0): moves each expert's selection bias by
  /// bias_rate * sign(mean load - its load), the loads being the global assignment counts of
  /// the training forwards since the last call. Call it after each optimizer step; it is the
  /// same on every rank. No-op with the bias off.
  void update_router_bias();
  /// Forgets the loads counted since the last update (a step whose update was skipped).
  void discard_router_loads();
  /// The selection bias b[E] (zeros with the bias off) and its replacement (checkpoints;
  /// ignored with the bias off).
  const std::vector<double>& router_bias() const;
  void set_router_bias(const std::vector<double>& bias);

  RouterLosses losses() const;
  const LayerStats& stats() const;
  const Placement& placement() const;
  const MoEConfig& config() const;
  Communicator& communicator();
  const execution_space& space() const;

  /// Replicated router weight Wr[d][E] and its gradient.
  matrix router_weight() const;
  matrix router_grad() const;
  /// Local expert weights, first index = local expert (see placement().global_expert()).
  /// w1: [n_local][d][h], w3 (SwiGLU only, else extent 0): [n_local][d][h], w2: [n_local][h][d].
  tensor3 w1() const;
  tensor3 w2() const;
  tensor3 w3() const;
  tensor3 w1_grad() const;
  tensor3 w2_grad() const;
  tensor3 w3_grad() const;
  /// The same by name: weights(ExpertTensor::w1) is w1(), weight_grads(...) its gradient.
  tensor3 weights(ExpertTensor t) const;
  tensor3 weight_grads(ExpertTensor t) const;
  /// The tensors this layer's experts hold: w1, w2 and, for SwiGLU, w3.
  std::vector<ExpertTensor> expert_tensors() const;
  int num_local_experts() const;

  /// Router decisions of the last forward: expert ids [T][k] and gates [T][k].
  Kokkos::View<int**, Kokkos::LayoutRight, memory_space> topk_experts() const;
  matrix gates() const;

  using flat_vector = Kokkos::View<Scalar*, memory_space>;
  /// Moves the experts to a new placement (collective; the dynamic rebalancer calls it).
  /// Expert weights travel to their new owners; gradients are zeroed. `state` holds further
  /// per-expert tensors in the layout of w1 (local experts x d x h, e.g. optimizer moments):
  /// each is migrated the same way and replaced by the new local tensor. Outputs do not depend
  /// on the placement.
  void set_placement(const Placement& placement, std::vector<flat_vector>& state);
  void set_placement(const Placement& placement);

  /// Number of times the layer's workspace grew (a steady-state step adds none).
  std::int64_t workspace_allocations() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

extern template class MoELayer<float>;
extern template class MoELayer<double>;

}  // namespace examoe
