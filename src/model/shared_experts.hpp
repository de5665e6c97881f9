#pragma once
// The shared experts of one decoder block: dense expert MLPs every token passes through, their
// outputs added to the MoE layer's routed output (docs/model.md, "Shared experts"). Private to
// the library (src/model): Model and IncrementalDecoder drive it.
#include <examoe/fsdp.hpp>
#include <examoe/model.hpp>

#include <Kokkos_Core.hpp>

#include <array>
#include <cstdint>

namespace examoe::impl {

/// The N shared experts of a block, each of hidden width hs, computed as one MLP of width
/// N hs (their hidden columns side by side: expert s holds columns [s hs, (s+1) hs) of W1
/// and W3 and rows [s hs, (s+1) hs) of W2), so that
///   y = sum_s act_s(m) W2_s = act(m) W2,   act(m) = gelu(m W1) or silu(m W1) * (m W3),
/// the routed experts' equations (docs/moe-layer.md) with h = N hs. The weights are views of
/// FSDP-gathered parameters (and their gradients); this class holds only the scratch of one
/// backward, the saved activations live in a Saved per block.
template <class S>
class SharedExperts {
 public:
  using execution_space = Kokkos::DefaultExecutionSpace;
  using memory_space = execution_space::memory_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, memory_space>;
  using const_matrix = Kokkos::View<const S**, Kokkos::LayoutRight, memory_space>;
  using umatrix = typename Fsdp<S>::umatrix;

  /// W1 [d][N hs], W2 [N hs][d], and for SwiGLU W3 [d][N hs] (else left empty).
  struct Weights {
    umatrix w1, w2, w3;
  };
  /// What backward needs of a forward over n rows: the hidden pre-activations g (GELU:
  /// overwritten with gelu'(g)), u = m W3 (SwiGLU) and the activations a, [n][N hs] each.
  /// Grow-only buffers.
  struct Saved {
    Saved() {}  // never value-initialise a struct holding Views (see Fsdp::Unit)
    matrix g, u, a;
  };

  SharedExperts(Activation activation, int width) : swiglu_(activation == Activation::swiglu), width_(width) {}

  /// y = act(m) W2 for the n = m.extent(0) rows of m [n][d]; y [n][d] is overwritten. The
  /// activations go into `saved`.
  void forward(const execution_space& space, const const_matrix& m, const Weights& w, Saved& saved,
               const matrix& y);
  /// Backward of the last forward into `saved` (same m), for the output gradient dy [n][d]:
  /// dW2 += a^T dy, dW1 += m^T dg (dW3 += m^T du), and dm = dg W1^T (+ du W3^T) overwrites
  /// dm [n][d]. `saved` is left as it was.
  void backward(const execution_space& space, const const_matrix& m, const const_matrix& dy,
                const Weights& w, const Weights& dw, Saved& saved, const matrix& dm);

  /// The number of values saved per row (forward) and the scratch per row (backward).
  std::size_t saved_per_row() const { return static_cast<std::size_t>(swiglu_ ? 3 : 2) * width_; }
  std::size_t scratch_per_row() const { return static_cast<std::size_t>(swiglu_ ? 2 : 1) * width_; }
  /// Times a buffer (saved or scratch) grew.
  std::int64_t allocations() const { return allocations_; }

 private:
  void grow(matrix& v, const char* name, int rows);

  bool swiglu_ = false;
  int width_ = 0;  // N hs
  matrix da_, du_;  // backward scratch [n][N hs]
  std::int64_t allocations_ = 0;
};

/// Registers layer l's shared experts in FSDP unit `unit`: `block{l}.moe.shared.w1` [d][N hs],
/// `.w2` [N hs][d] and, for SwiGLU, `.w3` [d][N hs], initialised like the routed experts
/// (U(-1/sqrt d, 1/sqrt d), W2 U(-1/sqrt hs, 1/sqrt hs)). Returns their ids {w1, w2, w3}
/// (w3 = -1 for GELU). Called after every other dense parameter is registered, so those keep
/// their parameter numbers, hence their initial values, with shared experts or without.
template <class S>
std::array<int, 3> add_shared_expert_params(Fsdp<S>& fsdp, int unit, int layer, const ModelConfig& cfg);
/// The weights (`grads`: their gradients, inside the unit's backward) of parameter ids `ids`
/// of a gathered unit.
template <class S>
typename SharedExperts<S>::Weights shared_expert_weights(const Fsdp<S>& fsdp, const std::array<int, 3>& ids,
                                                         bool grads);

extern template class SharedExperts<float>;
extern template class SharedExperts<double>;

}  // namespace examoe::impl
