// The experts of one MoE layer on this rank: the local experts' weights W1, W2 (and W3 for
// SwiGLU) and their gradients, the expert rows of the current step (inputs, hidden
// activations, outputs and their gradients), and the per-expert GEMMs on contiguous row
// blocks. Equations: docs/moe-layer.md, "Experts".
#pragma once

#include "layer/dispatch_plan.hpp"
#include "layer/migration_plan.hpp"

#include <examoe/impl/collectives.hpp>
#include <examoe/impl/grouped_gemm.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace examoe::impl {

template <class Scalar>
class Experts {
 public:
  using Space = Kokkos::DefaultExecutionSpace;
  using Mem = Space::memory_space;
  using matrix = Kokkos::View<Scalar**, Kokkos::LayoutRight, Mem>;
  using tensor3 = Kokkos::View<Scalar***, Kokkos::LayoutRight, Mem>;
  using flat_vector = Kokkos::View<Scalar*, Mem>;
  static_assert(Kokkos::SpaceAccessibility<Space, Mem>::accessible,
                "examoe::impl::Experts: the experts' views must be accessible from their space");

  /// `num_local` experts of `cfg`'s shape, zero weights and gradients.
  Experts(const MoEConfig& cfg, int num_local, const Space& space);

  /// Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), keyed by (seed, tensor, global expert id,
  /// element): an expert gets the same weights on whichever rank holds it.
  void init_weights(std::uint64_t seed, const Placement& placement, int my_rank);

  /// The expert input rows of this step ([rows][d], in the plan's per-expert blocks),
  /// reserved for `rows` rows for the dispatch to fill.
  matrix& inputs(int rows);
  const matrix& outputs() const { return ye_; }
  /// dL/dye, reserved for `rows` rows for the combine^T to fill.
  matrix& output_grads(int rows);
  const matrix& input_grads() const { return dxe_; }

  // ---- the experts' work in the layer's stages (docs/moe-layer.md, "Overlap"). Forward:
  // ye = a W2 with a = act(xe W1 [, xe W3]); backward: dh = act'(.) (dye W2^T), dxe = dh W1^T
  // (+ du W3^T), dW2 += a^T dye, dW1 += xe^T dh (dW3 += xe^T du). With overlap the kept rows
  // run while the dispatch travels and the received rows once they have arrived; without, every
  // row runs in the arrived stage. What runs in which stage is the experts' schedule
  // (MoEConfig::expert_schedule):
  //  - by projection (the GPU default): one grouped GEMM per projection over every local
  //    expert; the kept rows' first GEMM while the dispatch travels, their second while the
  //    combine does;
  //  - by expert (the host default): expert after expert in row chunks of about 1 MiB of
  //    activations (chunk_rows), a chunk's rows in cache from its first GEMM through the
  //    activation to its second, each expert's weight gradients after its last rows. The kept
  //    rows are done before the dispatch has arrived, except for small experts (one_visit:
  //    weights within 1 MiB), whose kept and received rows run together once it has, each
  //    expert's weights streamed into the cache first (stream_weights).
  // Rows are independent and the weight gradients are one GEMM per expert over all its rows
  // either way: the results are bitwise the same while no block of rows exceeds a chunk.
  bool by_expert() const { return by_expert_; }
  /// Forward, while the dispatch travels: the kept rows (or their first GEMM).
  void forward_kept(const DispatchPlan& plan);
  /// The exchange's buffers of the received rows, in the layout they travel in
  /// (DispatchPlan::row_group_wire_row): the dispatch's receive buffer (`arrived`) and the
  /// combine's send buffer (`send_back`). By expert, with them, each received block's input
  /// rows (xe forward, dye backward) are copied from `arrived` just before its GEMMs, which
  /// then read them from cache, and its results (ye forward, dxe backward) go straight into
  /// `send_back`. Without them, the layer has regrouped every row into inputs() or
  /// output_grads(), and the results are in outputs() or input_grads().
  struct WireRows {
    matrix arrived, send_back;
  };
  /// Forward of `which` rows (received, or all) once they have arrived; by expert, with
  /// `wire`, the received rows from and to the exchange's buffers.
  void forward_arrived(const DispatchPlan& plan, ExpertRows which, const WireRows* wire = nullptr);
  /// Forward, while the combine travels: what forward_kept left of the kept rows.
  void forward_kept_rest(const DispatchPlan& plan);
  /// Backward, while dye travels: the kept rows' dh and dxe (or their first GEMM).
  void backward_kept(const DispatchPlan& plan);
  /// Backward of `which` rows once their dye has arrived: dh and dxe (by expert, then each
  /// expert's weight gradients, while its last rows are in cache); `wire` as forward_arrived's.
  void backward_arrived(const DispatchPlan& plan, ExpertRows which, const WireRows* wire = nullptr);
  /// Backward, while dxe travels (overlap) or after: what is left (by projection: the kept
  /// rows' dxe, then the weight gradients over every row).
  void backward_rest(const DispatchPlan& plan, bool overlap);

  /// Moves the weights (and every tensor of `state`, in the layout of w1) through `plan`;
  /// the gradients are zeroed. Collective over `coll`'s communicator.
  void migrate(const MigrationPlan& plan, Collectives<Space>& coll, std::vector<flat_vector>& state);

  int num_local() const { return nloc_; }
  const tensor3& weights(ExpertTensor t) const;
  const tensor3& grads(ExpertTensor t) const;
  void zero_grad();
  std::int64_t workspace_allocations() const { return ws_.allocations(); }

 private:
  void allocate_grads();
  // By projection (GPUs): one grouped GEMM over `which` rows of every local expert.
  void hidden(const DispatchPlan& plan, ExpertRows which);       // h = xe W1 (u = xe W3)
  void activate(const DispatchPlan& plan);                       // a = act(h[, u]), every row
  void output(const DispatchPlan& plan, ExpertRows which);       // ye = a W2
  void hidden_grad(const DispatchPlan& plan, ExpertRows which);  // da = dye W2^T
  void activation_backward(const DispatchPlan& plan);            // dh (du) in place of da, every row
  void input_grad(const DispatchPlan& plan, ExpertRows which);   // dxe = dh W1^T (+ du W3^T)
  void weight_grads(const DispatchPlan& plan);                   // dW += over every row
  // By expert (host backends): the same per expert, in cache-sized row chunks.
  void reserve_forward(int rows);
  void reserve_backward(int rows);
  void forward_chunks(const DispatchPlan& plan, ExpertRows which, const WireRows* wire);
  void backward_chunks(const DispatchPlan& plan, ExpertRows which, bool weight_grads, const WireRows* wire);
  void expert_weight_grads(const DispatchPlan& plan, int l);
  int chunk_rows() const;
  void stream_weights(int l) const;
  bool weights_fit_in_cache() const;
  bool one_visit() const;
  Space space_;
  int d_ = 0, h_ = 0, nloc_ = 0;
  bool swiglu_ = false, by_expert_ = false;
  tensor3 W1_, W2_, W3_, dW1_, dW2_, dW3_;
  matrix xe_, ye_, hbuf_, ubuf_, abuf_, dabuf_, dubuf_, dye_, dxe_;
  Workspace ws_{"examoe::moe::"};
  GroupedGemm<Space> gemm_;  // one call per projection for all local experts
};

extern template class Experts<float>;
extern template class Experts<double>;

}  // namespace examoe::impl
