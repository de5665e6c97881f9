#pragma once
#include <string>
#include <vector>

namespace examoe {

/// Expert -> (owner rank, local index) map of the expert-parallel communicator.
///
/// Local indices on a rank follow increasing global expert id. The "key" of an expert is
/// its position in (owner rank, local index) order; dispatch sorts assignments by key so
/// that rows bound for one rank, and within it for one expert, are contiguous.
/// Every rank computes the same Placement without communication.
class Placement {
 public:
  Placement() = default;

  /// Balanced contiguous blocks: the first E % P ranks own ceil(E/P) experts, the rest
  /// floor(E/P). Requires E >= P (every rank owns at least one expert).
  static Placement balanced(int num_experts, int num_ranks);

  /// Greedy LPT: experts in decreasing load (ties: lower id) go to the rank with the least
  /// load so far (ties: lower rank). Minimises the maximum per-rank load to within 4/3 of the
  /// optimum; ranks may get different numbers of experts (at least one each while E >= P).
  /// Deterministic: every rank computes the same table from the same loads.
  static Placement rebalance_lpt(const std::vector<double>& load, int num_ranks);
  /// max over ranks / mean of the summed load of the experts each rank owns.
  double imbalance(const std::vector<double>& load) const;

  /// Any explicit owner table (owner[e] in [0, P)); ranks may own zero experts.
  static Placement from_owners(const std::vector<int>& owner, int num_ranks);

  int num_experts() const { return static_cast<int>(owner_.size()); }
  int num_ranks() const { return static_cast<int>(rank_offset_.size()) - 1; }
  int owner(int e) const { return owner_[e]; }
  int local_index(int e) const { return local_[e]; }
  int num_local(int rank) const { return rank_offset_[rank + 1] - rank_offset_[rank]; }
  int max_local() const { return max_local_; }
  /// First key (in [0, E)) of the experts owned by `rank`.
  int rank_offset(int rank) const { return rank_offset_[rank]; }
  /// Key of expert e: rank_offset(owner(e)) + local_index(e).
  int key(int e) const { return rank_offset_[owner_[e]] + local_[e]; }
  /// Global expert id that has local index `l` on `rank`.
  int global_expert(int rank, int l) const { return by_key_[rank_offset_[rank] + l]; }

  const std::vector<int>& owners() const { return owner_; }
  /// Global expert ids in key order.
  const std::vector<int>& experts_by_key() const { return by_key_; }

  bool operator==(const Placement& o) const { return owner_ == o.owner_ && num_ranks() == o.num_ranks(); }
  bool operator!=(const Placement& o) const { return !(*this == o); }
  std::string to_string() const;

 private:
  std::vector<int> owner_, local_, rank_offset_, by_key_;
  int max_local_ = 0;
};

}  // namespace examoe
