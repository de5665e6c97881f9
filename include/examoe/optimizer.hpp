#pragma once
#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace examoe {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

/// AdamW with decoupled weight decay over flat tensors this rank owns (FSDP shards, local
/// experts). State (m, v) exists only for what was added: optimizer memory is 2x the
/// rank's own parameters.
template <class S>
class AdamW {
 public:
  using execution_space = Kokkos::DefaultExecutionSpace;
  using memory_space = execution_space::memory_space;
  using vector = Kokkos::View<S*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  static_assert(Kokkos::SpaceAccessibility<execution_space, memory_space>::accessible,
                "examoe::AdamW: the tensors must be accessible from the execution space");

  /// `space`: the instance of the operations called without one.
  explicit AdamW(const AdamWConfig& cfg, const execution_space& space = execution_space())
      : cfg_(cfg), space_(space) {}

  /// Registers a parameter with its gradient (same size). `decay_mask` (same size, 1/0) or,
  /// when its extent is 0, `decay` applies to every element.
  void add(const vector& param, const vector& grad, const vector& decay_mask, bool decay);

  /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first
  /// (global-norm clipping). Increments the step count. Runs on `space` (and returns when it
  /// is done), or on the instance given at construction.
  void step(const execution_space& space, double lr, double grad_scale);
  void step(double lr, double grad_scale) { step(space_, lr, grad_scale); }

  /// Sum of squares of the registered gradients (for the global norm), on `space` or on the
  /// instance given at construction.
  double grad_sum_squares(const execution_space& space) const;
  double grad_sum_squares() const { return grad_sum_squares(space_); }
  const execution_space& space() const { return space_; }
  std::size_t state_bytes() const;
  std::int64_t steps() const { return t_; }
  /// Restores the step count (bias correction) from a checkpoint.
  void set_steps(std::int64_t t) { t_ = t; }
  int num_tensors() const { return static_cast<int>(tensors_.size()); }

  /// Points tensor i at new parameter/gradient memory with the given moments (after the
  /// experts it holds moved to other ranks).
  void rebind(int i, const vector& param, const vector& grad, const Kokkos::View<S*, memory_space>& m,
              const Kokkos::View<S*, memory_space>& v) {
    tensors_[i].p = param;
    tensors_[i].g = grad;
    tensors_[i].m = m;
    tensors_[i].v = v;
  }
  /// Moment views of tensor i (for checkpoints and tests).
  Kokkos::View<S*, memory_space> m(int i) const { return tensors_[i].m; }
  Kokkos::View<S*, memory_space> v(int i) const { return tensors_[i].v; }

 private:
  struct Tensor {
    Tensor() {}  // see Fsdp::Unit: never value-initialise an aggregate holding Views
    vector p, g, mask;
    bool decay;
    Kokkos::View<S*, memory_space> m, v;
  };
  AdamWConfig cfg_;
  execution_space space_;
  std::vector<Tensor> tensors_;
  std::int64_t t_ = 0;
};

/// Learning rate at `step` (0-based): linear warmup to `lr` over `warmup` steps, then cosine
/// decay to `min_lr` at `total`.
double lr_schedule(std::int64_t step, std::int64_t total, std::int64_t warmup, double lr, double min_lr);

/// Sum of squares of a flat view (deterministic reduction), on `space` ...
template <class ExecSpace, class V>
double sum_squares(const ExecSpace& space, const V& v);
/// ... or on a default instance of the view's execution space.
template <class V>
double sum_squares(const V& v) {
  return sum_squares(typename V::execution_space(), v);
}

extern template class AdamW<float>;
extern template class AdamW<double>;

}  // namespace examoe
