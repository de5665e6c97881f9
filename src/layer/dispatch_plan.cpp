// The dispatch plan: see dispatch_plan.hpp. Kernels are free functions (nvcc does not allow
// device lambdas in private members).
#include "layer/dispatch_plan.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>

#include <algorithm>
#include <string>

namespace examoe::impl {
namespace {

constexpr int kSortChunk = 256;  // assignments per chunk of the counting sort

/// keys[a] = sort key (owner rank, local index) of assignment a = (token a/k, slot a%k).
template <class Space, class IV, class TV>
void assignment_keys(const Space& space, int A, int k, const IV& key_of_expert, const TV& topk,
                     const IV& keys) {
  Kokkos::parallel_for(
      "examoe::dispatch::keys", Kokkos::RangePolicy<Space>(space, 0, A),
      KOKKOS_LAMBDA(const int a) { keys(a) = key_of_expert(topk(a / k, a % k)); });
}

/// Where each assignment's expert output comes back: >= 0 a row of this rank's expert rows,
/// < 0 (-1 - i) row i of the combine receive buffer.
template <class Space, class IV, class SV, class BV>
void return_locations(const Space& space, int A, const IV& keys, const IV& inv_perm,
                      const SV& key_start, const BV& blocks, int my_first, int nloc, int P, int me,
                      int self_begin, int self_count, const IV& loc) {
  const int my_last = my_first + nloc;
  Kokkos::parallel_for(
      "examoe::dispatch::return_locations", Kokkos::RangePolicy<Space>(space, 0, A),
      KOKKOS_LAMBDA(const int a) {
        const int key = keys(a), s = inv_perm(a);
        if (key >= my_first && key < my_last) {
          const int lx = key - my_first;
          loc(a) = blocks(lx * P + me).dest + (s - key_start(key));
        } else {
          loc(a) = -1 - (s < self_begin ? s : s - self_count);
        }
      });
}

}  // namespace

DispatchPlan::DispatchPlan() = default;

void DispatchPlan::set_placement(const Space& space, const Placement& placement, int my_rank) {
  placement_ = placement;
  P_ = placement.num_ranks();
  me_ = my_rank;
  nloc_ = placement.num_local(me_);
  ml_ = std::max(1, placement.max_local());
  const int E = placement.num_experts();
  if (key_of_expert_.extent(0) != static_cast<std::size_t>(E))
    key_of_expert_ = IView1("examoe::dispatch::key_of_expert", E);
  auto koe = Kokkos::create_mirror_view(key_of_expert_);
  for (int e = 0; e < E; ++e) koe(e) = placement.key(e);
  Kokkos::deep_copy(space, key_of_expert_, koe);
  if (key_start_slot_.count != static_cast<std::size_t>(E) + 1) key_start_slot_ = readback_.reserve<int>(E + 1);
  const auto nb = static_cast<std::size_t>(std::max(1, nloc_ * P_));
  if (blocks_.extent(0) < nb) {
    blocks_ = BlockView("examoe::dispatch::blocks", nb);
    blocks_h_ = Kokkos::View<RowBlock*, kc::StagingSpace>("examoe::dispatch::blocks_host", nb);
  }
  send_mat_.assign(static_cast<std::size_t>(P_) * ml_, 0);
  recv_mat_.assign(static_cast<std::size_t>(P_) * ml_, 0);
  exchange_.reset(P_);
  expert_offset_.assign(nloc_ + 1, 0);
  host_sync(space);  // koe is a temporary host mirror
  sorted_ = complete_ = false;
}

void DispatchPlan::sort(const Space& space, const TopkView& topk) {
  kc::ScopedRegion region("examoe::DispatchPlan::sort");
  const int E = placement_.num_experts();
  T_ = static_cast<int>(topk.extent(0));
  const int k = static_cast<int>(topk.extent(1));
  A_ = T_ * k;
  ws_.reserve(keys_, "keys", A_);
  ws_.reserve(perm_, "perm", A_);
  ws_.reserve(inv_perm_, "inv_perm", A_);
  ws_.reserve(loc_, "loc", A_);
  const int C = (A_ + kSortChunk - 1) / kSortChunk;
  ws_.reserve(hist_, "hist", static_cast<std::size_t>(C) * E);
  assignment_keys(space, A_, k, key_of_expert_, topk, keys_);
  stable_counting_sort(space, head(keys_, A_), E, kSortChunk, hist_, head(perm_, A_),
                       head(inv_perm_, A_), key_start());
  sorted_at_fetch_ = readback_.fetches();
  sorted_ = true;
  complete_ = false;
}

void DispatchPlan::fetch_counts(const Space& space) {
  if (!sorted_) throw Error("examoe::DispatchPlan::fetch_counts: called before sort()");
  if (readback_.fetches() == sorted_at_fetch_) readback_.fetch(space);
}

int DispatchPlan::assignments_to(int e) const {
  if (!sorted_ || readback_.fetches() == sorted_at_fetch_)
    throw Error("examoe::DispatchPlan::assignments_to: the counts of the last sort are not on the host (fetch_counts)");
  const int key = placement_.key(e);
  const auto ks = key_start_host();
  return ks(key + 1) - ks(key);
}

void DispatchPlan::exchange_counts(const Space& space, Communicator& comm) {
  if (!sorted_) throw Error("examoe::DispatchPlan::exchange_counts: called before sort()");
  if (comm.size() != P_ || comm.rank() != me_)
    throw Error("examoe::DispatchPlan::exchange_counts: the communicator (rank " +
                std::to_string(comm.rank()) + " of " + std::to_string(comm.size()) +
                ") is not the one of the placement (rank " + std::to_string(me_) + " of " +
                std::to_string(P_) + ")");
  kc::ScopedRegion region("examoe::DispatchPlan::exchange_counts");
  fetch_counts(space);
  const auto ks = key_start_host();
  // This step's counts only: every entry is rewritten.
  for (int r = 0; r < P_; ++r)
    for (int lx = 0; lx < ml_; ++lx) {
      const int key = placement_.rank_offset(r) + lx;
      send_mat_[static_cast<std::size_t>(r) * ml_ + lx] =
          lx < placement_.num_local(r) ? ks(key + 1) - ks(key) : 0;
    }
  {
    CollectiveLabel label("moe.plan");
    comm.alltoall_int(send_mat_.data(), recv_mat_.data(), ml_);
  }
  self_begin_ = ks(placement_.rank_offset(me_));
  self_count_ = ks(placement_.rank_offset(me_) + nloc_) - self_begin_;
  for (int r = 0; r < P_; ++r) {
    int sr = 0, rr = 0;
    for (int lx = 0; lx < ml_; ++lx) {
      sr += send_mat_[static_cast<std::size_t>(r) * ml_ + lx];
      rr += recv_mat_[static_cast<std::size_t>(r) * ml_ + lx];
    }
    // Rows that stay on this rank are copied, never sent: the send buffer is the sorted
    // slots without this rank's own run.
    exchange_.send_counts[r] = r == me_ ? 0 : sr;
    exchange_.recv_counts[r] = r == me_ ? 0 : rr;
    exchange_.send_displs[r] = ks(placement_.rank_offset(r)) - (r > me_ ? self_count_ : 0);
  }
  exchange_.finish(false);
  lay_out_expert_rows();
  Kokkos::deep_copy(space, blocks_, blocks_h_);
  return_locations(space, A_, keys_, inv_perm_, key_start(), blocks_, placement_.rank_offset(me_),
                   nloc_, P_, me_, self_begin_, self_count_, loc_);
  complete_ = true;
}

/// Expert-row blocks in (local expert, source rank) order.
void DispatchPlan::lay_out_expert_rows() {
  const auto ks = key_start_host();
  nblocks_ = nloc_ * P_;
  int q = 0;
  for (int lx = 0; lx < nloc_; ++lx) {
    expert_offset_[lx] = q;
    for (int src = 0; src < P_; ++src) {
      RowBlock b;
      b.dest = q;
      b.count = recv_mat_[static_cast<std::size_t>(src) * ml_ + lx];
      b.local = src == me_ ? 1 : 0;
      if (src == me_) {
        b.from = ks(placement_.rank_offset(me_) + lx);
      } else {
        int off = exchange_.recv_displs[src];
        for (int l2 = 0; l2 < lx; ++l2) off += recv_mat_[static_cast<std::size_t>(src) * ml_ + l2];
        b.from = off;
      }
      blocks_h_(lx * P_ + src) = b;
      q += b.count;
    }
  }
  expert_offset_[nloc_] = q;
  nrows_ = q;
}

}  // namespace examoe::impl
