// The experts of one MoE layer on this rank: the local experts' weights W1, W2 (and W3 for
// SwiGLU) and their gradients, the expert rows of the current step (inputs, hidden
// activations, outputs and their gradients), and the per-expert GEMMs on contiguous row
// blocks. Equations: docs/moe-layer.md, "Experts".
#pragma once

#include "layer/dispatch_plan.hpp"
#include "layer/migration_plan.hpp"

#include <examoe/impl/collectives.hpp>
#include <examoe/impl/grouped_gemm.hpp>
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
  /// ye = expert(xe) for every local expert's block of the plan: hidden(all), activate(),
  /// output(all).
  void forward(const DispatchPlan& plan);
  /// The pieces of forward, so that the layer can run the kept rows while the others travel:
  /// h = xe W1 (and u = xe W3) on `which` rows ...
  void hidden(const DispatchPlan& plan, ExpertRows which);
  /// ... a = act(h[, u]) on every row ...
  void activate(const DispatchPlan& plan);
  /// ... ye = a W2 on `which` rows.
  void output(const DispatchPlan& plan, ExpertRows which);
  const matrix& outputs() const { return ye_; }
  /// dL/dye, reserved for `rows` rows for the combine^T to fill.
  matrix& output_grads(int rows);
  /// dW1, dW2 (dW3) += this step's part; dxe = dL/dxe: hidden_grad(all),
  /// activation_backward(), input_grad(all), weight_grads().
  void backward(const DispatchPlan& plan);
  /// The pieces of backward: da = dye W2^T on `which` rows ...
  void hidden_grad(const DispatchPlan& plan, ExpertRows which);
  /// ... dh = act'(h) da (and du) on every row, in place of da ...
  void activation_backward(const DispatchPlan& plan);
  /// ... dxe = dh W1^T (+ du W3^T) on `which` rows ...
  void input_grad(const DispatchPlan& plan, ExpertRows which);
  /// ... dW2 += a^T dye, dW1 += xe^T dh (dW3 += xe^T du), one grouped GEMM each over all rows.
  void weight_grads(const DispatchPlan& plan);
  const matrix& input_grads() const { return dxe_; }

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
  Space space_;
  int d_ = 0, h_ = 0, nloc_ = 0;
  bool swiglu_ = false;
  tensor3 W1_, W2_, W3_, dW1_, dW2_, dW3_;
  matrix xe_, ye_, hbuf_, ubuf_, abuf_, dabuf_, dubuf_, dye_, dxe_;
  Workspace ws_{"examoe::moe::"};
  GroupedGemm<Space> gemm_;  // one call per projection for all local experts
};

extern template class Experts<float>;
extern template class Experts<double>;

}  // namespace examoe::impl
