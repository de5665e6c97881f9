#pragma once
#include <examoe/comm.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace examoe {
namespace impl {
template <class ExecSpace>
class Collectives;
}

/// How a parameter starts. Values depend only on (seed, parameter id, element index), so
/// the same model comes out at any number of ranks.
struct ParamInit {
  enum Kind { uniform, constant } kind = uniform;
  double value = 0.0;  ///< half-width of U(-value, value), or the constant
};

/// Fully sharded data parallelism for the dense (non-expert) parameters.
///
/// Parameters are grouped into flat units. Each unit is padded to a multiple of the world
/// size and every rank stores one contiguous shard (and the optimizer keeps state for that
/// shard only). Before use a unit is all-gathered; with `reshard_after_forward` every gather
/// lands in one shared buffer sized for the largest unit (so at most one unit is gathered at
/// a time), otherwise each unit keeps its own gathered copy from forward to backward. The
/// gradient of a unit is accumulated in one shared full-size buffer and reduce-scattered
/// (summed over all ranks) into the shard gradient.
template <class S>
class Fsdp {
 public:
  using execution_space = Kokkos::DefaultExecutionSpace;
  using memory_space = execution_space::memory_space;
  using vector = Kokkos::View<S*, memory_space>;
  using uvector = Kokkos::View<S*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  using umatrix =
      Kokkos::View<S**, Kokkos::LayoutRight, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  static_assert(Kokkos::SpaceAccessibility<execution_space, memory_space>::accessible,
                "examoe::Fsdp: the shards must be accessible from the execution space");

  /// The gathers and reduce-scatters run on `space` (the instance of the communicator adapter).
  Fsdp(Communicator& world, bool reshard_after_forward,
       const execution_space& space = execution_space());
  ~Fsdp();
  Fsdp(const Fsdp&) = delete;
  Fsdp& operator=(const Fsdp&) = delete;

  int add_unit(const std::string& name);
  /// Adds a parameter of shape [n] or [n][m] to a unit; returns its id.
  int add_param(int unit, const std::string& name, const std::vector<int>& shape, ParamInit init,
                bool weight_decay);
  /// Lays out the units, allocates the shards and fills them from `seed`.
  void finalize(std::uint64_t seed);

  void gather(int unit);
  void release(int unit);
  bool is_gathered(int unit) const { return units_[unit].gathered; }

  /// Views of a parameter inside its gathered unit (valid while it is gathered).
  uvector param1(int p) const;
  umatrix param2(int p) const;
  /// Starts the backward of a unit: zeroes the shared gradient buffer (on `space`) and binds it.
  void begin_grad(const execution_space& space, int unit);
  /// The same on the instance given at construction.
  void begin_grad(int unit) { begin_grad(space_, unit); }
  const execution_space& space() const { return space_; }
  uvector grad1(int p) const;
  umatrix grad2(int p) const;
  /// Sums the unit's full gradient over all ranks into this rank's shard gradient (=, or +=
  /// with gradient accumulation on).
  void reduce_scatter_grad(int unit);
  /// Gradient accumulation over micro-batches: while on, reduce_scatter_grad adds the summed
  /// gradient into the shard gradient (through a buffer of one shard of the largest unit,
  /// allocated the first time) instead of writing it; no full-size gradient outlives its
  /// unit's backward either way.
  void set_grad_accumulation(bool on) { accumulate_ = on; }

  int num_units() const { return static_cast<int>(units_.size()); }
  const std::string& unit_name(int u) const { return units_[u].name; }
  int num_params() const { return static_cast<int>(params_.size()); }
  const std::string& param_name(int p) const { return params_[p].name; }
  int param_unit(int p) const { return params_[p].unit; }
  const std::vector<int>& param_shape(int p) const { return params_[p].shape; }
  std::size_t param_offset(int p) const { return params_[p].offset; }
  std::size_t unit_numel(int u) const { return units_[u].numel; }
  std::size_t shard_numel(int u) const { return units_[u].shard; }
  vector shard(int u) const { return units_[u].shard_param; }
  vector shard_grad(int u) const { return units_[u].shard_grad; }
  /// 1 where the shard element gets weight decay, 0 elsewhere (and in the padding).
  vector shard_decay_mask(int u) const { return units_[u].decay_mask; }

  /// Total parameters (unpadded), bytes of this rank's shards, and the largest gathered
  /// footprint seen so far (bytes of gathered units alive at once).
  std::size_t total_numel() const;
  std::size_t shard_bytes() const;
  std::size_t gathered_bytes_peak() const { return peak_gathered_; }
  std::size_t gathered_bytes_max_unit() const;
  /// The full-size gradient buffer of one unit, and the accumulation buffer once allocated.
  std::size_t grad_buffer_bytes() const { return (gbuf_.size() + acc_.size()) * sizeof(S); }
  bool reshard_after_forward() const { return reshard_; }

 private:
  struct Param {
    std::string name;
    int unit;
    std::vector<int> shape;
    std::size_t offset = 0, numel = 0;
    ParamInit init;
    bool decay;
  };
  // Structs holding Views get a user-provided constructor: value-initialising an aggregate
  // that holds a View (Unit{}) zero-fills the View's tracker with the mdspan-based View of
  // Kokkos develop (4.6.99), which then crashes on copy.
  struct Unit {
    Unit() {}
    std::string name;
    std::vector<int> params;
    std::size_t numel = 0, padded = 0, shard = 0;
    vector shard_param, shard_grad, decay_mask, full;  // full: own gathered copy (keep mode)
    bool gathered = false;
  };
  S* unit_data(int u) const;
  void account();

  Communicator& world_;
  bool reshard_;
  execution_space space_;
  std::unique_ptr<impl::Collectives<execution_space>> coll_;  // world_ on Kokkos memory
  std::vector<Param> params_;
  std::vector<Unit> units_;
  vector pool_, gbuf_;
  vector acc_;  // set_grad_accumulation: one shard of the largest unit
  bool accumulate_ = false;
  int pool_unit_ = -1, grad_unit_ = -1;
  bool finalized_ = false;
  std::size_t peak_gathered_ = 0;
};

extern template class Fsdp<float>;
extern template class Fsdp<double>;

}  // namespace examoe
