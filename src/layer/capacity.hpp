// Expert capacity and token dropping (MoEConfig::capacity_factor; docs/moe-layer.md,
// "Capacity and token dropping"): which of a step's assignments each expert keeps.
//
// After the first half of the dispatch plan (every assignment sorted by its expert, the counts
// exchanged), the owner of each expert chooses from all the assignments it is sent:
//   1. every rank sends, for each row it would send, (gate, global token index): 16 bytes
//      per assignment instead of a row, in the dispatch layout (one all-to-all);
//   2. the owner keeps, per local expert, the C candidates with the largest gates (ties: the
//      lower global token index), C = ceil(capacity_factor * k * T / E), T the tokens of the
//      communicator's batch; the rows that stay on their rank are candidates too;
//   3. the keep decisions go back (one all-to-all of ints, the reverse layout);
//   4. keep() [A] holds them per assignment, for DispatchPlan::drop.
// The choice depends on the gates and the global token order only, not on which rank holds a
// token or an expert, so it is the same at any expert-parallel degree. It runs on the host:
// the gates and the permutation come down in one copy each (two waits on a GPU).
#pragma once

#include "layer/dispatch_plan.hpp"

#include <examoe/comm.hpp>
#include <examoe/impl/host_sync.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace examoe::impl {

/// C = ceil(capacity_factor * top_k * tokens / num_experts), in double as written; 0 (no
/// limit) when capacity_factor is 0.
long long expert_capacity(double capacity_factor, int top_k, long long tokens, int num_experts);

class CapacitySelector {
 public:
  using Space = DispatchPlan::Space;
  using IView1 = DispatchPlan::IView1;

  /// Chooses the kept assignments of `plan` (sorted and with its counts exchanged over
  /// `comm`, the plan's communicator) from the router's gates [T][k]. Collective over `comm`.
  template <class GView>
  void select(const Space& space, const DispatchPlan& plan, const GView& gates, Communicator& comm,
              double capacity_factor) {
    const auto g = host_copy_of(gates);
    const auto perm = host_copy_of(plan.perm());
    const int T = static_cast<int>(gates.extent(0)), k = static_cast<int>(gates.extent(1));
    gates_.resize(static_cast<std::size_t>(T) * k);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < k; ++j) gates_[static_cast<std::size_t>(t) * k + j] = static_cast<double>(g(t, j));
    perm_.resize(plan.assignments());
    for (int s = 0; s < plan.assignments(); ++s) perm_[s] = perm(s);
    select_on_host(space, plan, T, k, comm, capacity_factor);
  }

  /// keep[a] = 1 if assignment a is kept, 0 if dropped (device; after select its first A
  /// entries are this step's).
  const IView1& keep() const { return keep_; }
  /// This step's C (0: no limit).
  long long capacity() const { return capacity_; }
  /// Assignments this rank's local experts dropped this step (the owner's count).
  const std::vector<int>& dropped_per_local_expert() const { return dropped_local_; }
  /// Dropped assignments per global expert, summed over `stats_comm` (which holds the plan's
  /// communicator: with data-parallel replicas, over every replica's batch).
  void reduce_dropped(const Placement& placement, int my_rank, Communicator& stats_comm,
                      std::vector<std::int64_t>& per_expert);
  std::int64_t workspace_allocations() const { return ws_.allocations(); }

 private:
  /// One candidate of a local expert: its gate, global token index, and where its decision
  /// goes (>= 0: a row of the metadata receive buffer; < 0: -1 - its slot in the self run).
  struct Candidate {
    double gate;
    long long token;
    int where;
  };
  void select_on_host(const Space& space, const DispatchPlan& plan, int T, int k, Communicator& comm,
                      double capacity_factor);
  void choose(int n_keep);

  int A_ = 0;
  long long capacity_ = 0;
  std::vector<double> gates_;            // [T*k] this step's gates, on the host
  std::vector<int> perm_;                // [A] sorted slot -> assignment
  std::vector<int> token_counts_;        // [P] T of every rank of the communicator
  std::vector<double> send_meta_, recv_meta_;  // (gate, global token) per row, dispatch layout
  std::vector<int> recv_keep_, send_keep_, self_keep_;
  std::vector<int> dropped_local_;       // [nloc]
  std::vector<int> next_from_;           // [P]
  std::vector<Candidate> cand_;
  std::vector<double> dropped_sum_;      // [E] the stats reduction
  IView1 keep_;
  Kokkos::View<int*, kc::StagingSpace> keep_h_;  // pinned on CUDA: the upload is asynchronous
  Workspace ws_{"examoe::capacity::"};
};

}  // namespace examoe::impl
