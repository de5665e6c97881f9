// The dispatch plan of one MoE layer step: where each of this step's T*k assignments goes,
// where its expert row lives on the owner, and where its result comes back. It is the
// position tracking of the layer (docs/moe-layer.md, "Dispatch plan").
//
// Built in two halves each forward, from this step's top-k choices alone:
//   sort()            local: keys (owner rank, local expert), stable counting sort -> perm,
//                     inv_perm and the assignments per key, all queued on the device;
//   fetch_counts()    the assignments per key to the host through the plan's readback: the
//                     one wait of the layer's forward (other units' values ride in the same
//                     copy: readback() takes their slots at set-up);
//   exchange_counts() collective: ONE all-to-all of the per-(rank, local expert) counts, then
//                     send/receive counts and displacements, the expert-row blocks and every
//                     assignment's return location (fetches first if nobody did).
// Every member a step reads is rewritten by these two calls, whatever T was the step
// before (T = 0 included), so nothing of an earlier step survives. Backward reuses the plan.
#pragma once

#include <examoe/comm.hpp>
#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/impl/grouped_gemm.hpp>
#include <examoe/impl/host_readback.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/placement.hpp>

#include "layer/row_exchange.hpp"

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace examoe::impl {

class DispatchPlan {
 public:
  using Space = Kokkos::DefaultExecutionSpace;
  using Mem = Space::memory_space;
  using IView1 = Kokkos::View<int*, Mem>;
  using TopkView = Kokkos::View<int**, Kokkos::LayoutRight, Mem>;
  using BlockView = Kokkos::View<RowBlock*, Mem>;
  static_assert(Kokkos::SpaceAccessibility<Space, Mem>::accessible,
                "examoe::impl::DispatchPlan: the plan's views must be accessible from its space");

  DispatchPlan();

  /// The expert table the keys follow; voids the current plan (a new step must sort again).
  void set_placement(const Space& space, const Placement& placement, int my_rank);

  /// Local half: sorts the assignments a = t*k + j of `topk` [T][k] (T may be 0) by key.
  void sort(const Space& space, const TopkView& topk);
  /// Drops the assignments a with keep[a] == 0 (keep: [>= A], after exchange_counts): they
  /// leave every run of the sort (their key is the dropped key E, past every rank's), so they
  /// are neither packed, sent nor computed, and their return location is kDroppedRow. Sorts
  /// again; fetch_counts and exchange_counts then lay out the exchange of the kept ones.
  void drop(const Space& space, const IView1& keep);
  /// The counts of the last sort to the host (one copy, one wait; no-op if already fetched).
  void fetch_counts(const Space& space);
  /// This rank's assignments to global expert e in the last sort (after fetch_counts).
  int assignments_to(int e) const;
  /// Over the last sort's tokens, the distinct ranks owning a token's k experts: their sum
  /// (max = false) or their maximum (after fetch_counts).
  long long destination_ranks(bool max) const;
  /// This rank's dropped assignments in the last sort (after fetch_counts; 0 until drop()).
  int dropped() const;
  /// First sorted slot of key `key` (expert key, or E: the dropped ones) after fetch_counts.
  int key_begin(int key) const;
  /// Assignments rank `src` sends to local expert lx (after exchange_counts).
  int recv_count(int src, int lx) const { return recv_mat_[static_cast<std::size_t>(src) * nloc_ + lx]; }
  const Placement& placement() const { return placement_; }
  /// The buffer the counts come down in; other units reserve their slots in it at set-up.
  HostReadback<Space>& readback() { return readback_; }

  /// Collective half over the expert-parallel communicator `comm` (same placement on
  /// every rank): exchanges the counts and lays out both directions of the exchange.
  void exchange_counts(const Space& space, Communicator& comm);

  bool complete() const { return complete_; }
  int tokens() const { return T_; }
  int assignments() const { return A_; }
  /// Sorted slot -> assignment, and its inverse.
  auto perm() const { return head(perm_, A_); }
  auto inv_perm() const { return head(inv_perm_, A_); }
  /// Return location of each assignment: >= 0 a row of this rank's expert rows, < 0
  /// (-1 - i) row i of the combine receive buffer, kDroppedRow: dropped (no row).
  auto return_location() const { return head(loc_, A_); }
  const BlockView& blocks() const { return blocks_; }
  int num_blocks() const { return nblocks_; }
  /// Rows of this rank's local experts (local expert lx: [expert_row_begin(lx), ..(lx+1))).
  int expert_rows() const { return nrows_; }
  int expert_row_begin(int lx) const { return expert_offset_[lx]; }
  /// All of them: [num_local() + 1], the groups of the experts' grouped GEMMs.
  const std::vector<int>& expert_row_offsets() const { return expert_offset_; }
  /// The row GEMMs' groups over `which` expert rows, one per non-empty (local expert, source
  /// rank) block: kept (source = this rank), received (the others) or all. Matrix index =
  /// local expert. The weight gradients group by expert_row_offsets(): one group per expert.
  const std::vector<RowGroup>& row_groups(ExpertRows which) const { return groups_[static_cast<int>(which)]; }
  /// For each group of row_groups(which): the row where its rows start on the wire, or -1 for
  /// kept rows. That is their row in the dispatch's receive buffer, and in the combine's send
  /// buffer, since a received block's rows go back in the layout they arrived in.
  const std::vector<int>& row_group_wire_row(ExpertRows which) const {
    return group_wire_row_[static_cast<int>(which)];
  }
  int num_local() const { return nloc_; }
  /// Sorted slots of the rows that stay on this rank: [self_begin, self_begin + self_count).
  int self_begin() const { return self_begin_; }
  int self_count() const { return self_count_; }
  int rows_sent() const { return exchange_.rows_sent; }
  int rows_received() const { return exchange_.rows_received; }
  /// The dispatch direction's all-to-all, in rows (combine runs it in Direction::reverse).
  const RowExchange& exchange() const { return exchange_; }
  const std::vector<int>& send_counts() const { return exchange_.send_counts; }
  const std::vector<int>& send_displs() const { return exchange_.send_displs; }
  const std::vector<int>& recv_counts() const { return exchange_.recv_counts; }
  const std::vector<int>& recv_displs() const { return exchange_.recv_displs; }
  std::int64_t workspace_allocations() const { return ws_.allocations(); }

 private:
  void sort_keys(const Space& space);
  void lay_out_expert_rows();
  void lay_out_row_groups();

  Placement placement_;
  int P_ = 1, me_ = 0, nloc_ = 0;
  int T_ = 0, A_ = 0, nblocks_ = 0, nrows_ = 0;
  int self_begin_ = 0, self_count_ = 0;
  bool sorted_ = false, complete_ = false;

  IView1 key_of_expert_;  // [E]
  IView1 owner_of_expert_;  // [E]
  HostReadback<Space>::Slot destinations_slot_;  // [2] sum and max of ranks per token
  IView1 keys_, perm_, inv_perm_, loc_, hist_;
  HostReadback<Space> readback_{"examoe::dispatch::readback"};
  HostReadback<Space>::Slot key_start_slot_;  // [E+1] start of each key's run of sorted slots
  std::uint64_t sorted_at_fetch_ = 0;         // readback_.fetches() when sort() queued its kernels
  HostReadback<Space>::DeviceSlot<int> key_start() const { return readback_.device<int>(key_start_slot_); }
  HostReadback<Space>::HostSlot<int> key_start_host() const { return readback_.host<int>(key_start_slot_); }
  BlockView blocks_;
  Kokkos::View<RowBlock*, kc::StagingSpace> blocks_h_;  // pinned on CUDA: the upload is asynchronous
  std::vector<int> send_keys_;            // [E] this rank's assignments per key
  std::vector<int> recv_mat_;             // [P][nloc] what each rank sends to my local experts
  RowExchange counts_exchange_;           // the counts all-to-all: num_local(r) ints to rank r
  std::vector<int> next_from_;            // [P] lay_out_expert_rows' running offsets
  RowExchange exchange_;
  std::vector<int> expert_offset_;        // [nloc + 1]
  std::vector<RowGroup> groups_[3];       // row_groups(all), (kept), (received)
  std::vector<int> group_wire_row_[3];    // row_group_wire_row(all), (kept), (received)
  Workspace ws_{"examoe::dispatch::"};
};

}  // namespace examoe::impl
