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
/// < 0 (-1 - i) row i of the combine receive buffer, kDroppedRow for a dropped assignment
/// (key `dropped_key`).
template <class Space, class IV, class SV, class BV>
void return_locations(const Space& space, int A, const IV& keys, const IV& inv_perm,
                      const SV& key_start, const BV& blocks, int my_first, int nloc, int P, int me,
                      int self_begin, int self_count, int dropped_key, const IV& loc) {
  const int my_last = my_first + nloc;
  Kokkos::parallel_for(
      "examoe::dispatch::return_locations", Kokkos::RangePolicy<Space>(space, 0, A),
      KOKKOS_LAMBDA(const int a) {
        const int key = keys(a), s = inv_perm(a);
        if (key == dropped_key) {
          loc(a) = kDroppedRow;
        } else if (key >= my_first && key < my_last) {
          const int lx = key - my_first;
          loc(a) = blocks(lx * P + me).dest + (s - key_start(key));
        } else {
          loc(a) = -1 - (s < self_begin ? s : s - self_count);
        }
      });
}

/// Over tokens: out[0] = sum and out[1] = max of the number of distinct ranks that own a
/// token's k experts (its own rank included when it owns one of them).
template <class IV, class TV>
struct DestinationsFunctor {
  using value_type = long long[];
  using size_type = int;
  int value_count = 2;
  IV owner;  // [E] owner rank of each expert
  TV topk;
  DestinationsFunctor(const IV& o, const TV& t) : owner(o), topk(t) {}
  KOKKOS_INLINE_FUNCTION void operator()(const int t, value_type v) const {
    const int k = static_cast<int>(topk.extent(1));
    long long n = 0;
    for (int j = 0; j < k; ++j) {
      const int r = owner(topk(t, j));
      bool seen = false;
      for (int i = 0; i < j; ++i) seen = seen || owner(topk(t, i)) == r;
      n += seen ? 0 : 1;
    }
    v[0] += n;
    v[1] = n > v[1] ? n : v[1];
  }
  KOKKOS_INLINE_FUNCTION void join(value_type dst, const value_type src) const {
    dst[0] += src[0];
    dst[1] = src[1] > dst[1] ? src[1] : dst[1];
  }
#if !EXAMOE_KOKKOS4
  KOKKOS_INLINE_FUNCTION void join(volatile value_type dst, const volatile value_type src) const {
    dst[0] += src[0];
    dst[1] = src[1] > dst[1] ? src[1] : dst[1];
  }
#endif
  KOKKOS_INLINE_FUNCTION void init(value_type v) const { v[0] = v[1] = 0; }
};

/// keys[a] = dropped_key where keep[a] == 0 (the assignment leaves every run of the sort).
template <class Space, class IV>
void drop_keys(const Space& space, int A, const IV& keep, int dropped_key, const IV& keys) {
  Kokkos::parallel_for(
      "examoe::dispatch::drop_keys", Kokkos::RangePolicy<Space>(space, 0, A),
      KOKKOS_LAMBDA(const int a) {
        if (keep(a) == 0) keys(a) = dropped_key;
      });
}

}  // namespace

DispatchPlan::DispatchPlan() = default;

void DispatchPlan::set_placement(const Space& space, const Placement& placement, int my_rank) {
  placement_ = placement;
  P_ = placement.num_ranks();
  me_ = my_rank;
  nloc_ = placement.num_local(me_);
  const int E = placement.num_experts();
  if (key_of_expert_.extent(0) != static_cast<std::size_t>(E))
    key_of_expert_ = IView1("examoe::dispatch::key_of_expert", E);
  if (owner_of_expert_.extent(0) != static_cast<std::size_t>(E))
    owner_of_expert_ = IView1("examoe::dispatch::owner_of_expert", E);
  auto koe = Kokkos::create_mirror_view(key_of_expert_);
  auto ooe = Kokkos::create_mirror_view(owner_of_expert_);
  for (int e = 0; e < E; ++e) {
    koe(e) = placement.key(e);
    ooe(e) = placement.owner(e);
  }
  Kokkos::deep_copy(space, key_of_expert_, koe);
  Kokkos::deep_copy(space, owner_of_expert_, ooe);
  // E keys of experts, then the dropped assignments' key E (empty without a capacity).
  if (key_start_slot_.count != static_cast<std::size_t>(E) + 2) key_start_slot_ = readback_.reserve<int>(E + 2);
  if (destinations_slot_.count != 2) destinations_slot_ = readback_.reserve<long long>(2);
  const auto nb = static_cast<std::size_t>(std::max(1, nloc_ * P_));
  if (blocks_.extent(0) < nb) {
    blocks_ = BlockView("examoe::dispatch::blocks", nb);
    blocks_h_ = Kokkos::View<RowBlock*, kc::StagingSpace>("examoe::dispatch::blocks_host", nb);
  }
  // The counts exchange: rank r gets the counts of its own experts' keys, num_local(r) ints.
  send_keys_.assign(E, 0);
  recv_mat_.assign(static_cast<std::size_t>(P_) * nloc_, 0);
  counts_exchange_.reset(P_);
  for (int r = 0; r < P_; ++r) {
    counts_exchange_.send_counts[r] = placement.num_local(r);
    counts_exchange_.send_displs[r] = placement.rank_offset(r);
    counts_exchange_.recv_counts[r] = nloc_;
  }
  counts_exchange_.finish(false);
  exchange_.reset(P_);
  expert_offset_.assign(nloc_ + 1, 0);
  host_sync(space);  // koe and ooe are temporary host mirrors
  sorted_ = complete_ = false;
}

void DispatchPlan::sort(const Space& space, const TopkView& topk) {
  kc::ScopedRegion region("examoe::DispatchPlan::sort");
  T_ = static_cast<int>(topk.extent(0));
  const int k = static_cast<int>(topk.extent(1));
  A_ = T_ * k;
  ws_.reserve(keys_, "keys", A_);
  ws_.reserve(perm_, "perm", A_);
  ws_.reserve(inv_perm_, "inv_perm", A_);
  ws_.reserve(loc_, "loc", A_);
  assignment_keys(space, A_, k, key_of_expert_, topk, keys_);
  // Ranks per token of the router's choices (sum, max), for the statistics; rides in the
  // same readback (drop() leaves it as it is).
  const auto dest = readback_.device<long long>(destinations_slot_);
  if (T_ > 0)
    Kokkos::parallel_reduce("examoe::dispatch::destinations", Kokkos::RangePolicy<Space>(space, 0, T_),
                            DestinationsFunctor<IView1, TopkView>(owner_of_expert_, topk), dest);
  else
    Kokkos::deep_copy(space, dest, 0LL);
  sort_keys(space);
}

void DispatchPlan::drop(const Space& space, const IView1& keep) {
  if (!complete_) throw Error("examoe::DispatchPlan::drop: called before exchange_counts()");
  kc::ScopedRegion region("examoe::DispatchPlan::drop");
  drop_keys(space, A_, keep, placement_.num_experts(), keys_);
  sort_keys(space);
}

/// The counting sort of keys_ over the E expert keys and the dropped key E.
void DispatchPlan::sort_keys(const Space& space) {
  const int K = placement_.num_experts() + 1;
  const int C = (A_ + kSortChunk - 1) / kSortChunk;
  ws_.reserve(hist_, "hist", static_cast<std::size_t>(C) * K);
  stable_counting_sort(space, head(keys_, A_), K, kSortChunk, hist_, head(perm_, A_),
                       head(inv_perm_, A_), key_start());
  sorted_at_fetch_ = readback_.fetches();
  sorted_ = true;
  complete_ = false;
}

int DispatchPlan::dropped() const {
  const int E = placement_.num_experts();
  const auto ks = key_start_host();
  return ks(E + 1) - ks(E);
}

int DispatchPlan::key_begin(int key) const { return key_start_host()(key); }

void DispatchPlan::fetch_counts(const Space& space) {
  if (!sorted_) throw Error("examoe::DispatchPlan::fetch_counts: called before sort()");
  if (readback_.fetches() == sorted_at_fetch_) readback_.fetch(space);
}

long long DispatchPlan::destination_ranks(bool max) const {
  if (!sorted_ || readback_.fetches() == sorted_at_fetch_)
    throw Error("examoe::DispatchPlan::destination_ranks: called before fetch_counts()");
  return readback_.host<long long>(destinations_slot_)(max ? 1 : 0);
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
  // This step's counts only: every entry is rewritten. The keys are in (rank, local expert)
  // order, so the counts per key are already laid out by destination rank.
  const int E = placement_.num_experts();
  for (int key = 0; key < E; ++key) send_keys_[key] = ks(key + 1) - ks(key);
  {
    CollectiveLabel label("moe.plan");
    const RowExchange& c = counts_exchange_;
    comm.alltoallv_rows(send_keys_.data(), c.send_counts.data(), c.send_displs.data(), recv_mat_.data(),
                        c.recv_counts.data(), c.recv_displs.data(), 1, DataType::i32, Memory::host);
  }
  self_begin_ = ks(placement_.rank_offset(me_));
  self_count_ = ks(placement_.rank_offset(me_) + nloc_) - self_begin_;
  for (int r = 0; r < P_; ++r) {
    const int sr = ks(placement_.rank_offset(r) + placement_.num_local(r)) - ks(placement_.rank_offset(r));
    int rr = 0;
    for (int lx = 0; lx < nloc_; ++lx) rr += recv_mat_[static_cast<std::size_t>(r) * nloc_ + lx];
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
                   nloc_, P_, me_, self_begin_, self_count_, E, loc_);
  complete_ = true;
}

/// Expert-row blocks in (local expert, source rank) order: O(nloc x P).
void DispatchPlan::lay_out_expert_rows() {
  const auto ks = key_start_host();
  nblocks_ = nloc_ * P_;
  // Where each source rank's rows for the next local expert start in the receive buffer.
  next_from_.assign(exchange_.recv_displs.begin(), exchange_.recv_displs.end());
  int q = 0;
  for (int lx = 0; lx < nloc_; ++lx) {
    expert_offset_[lx] = q;
    for (int src = 0; src < P_; ++src) {
      RowBlock b;
      b.dest = q;
      b.count = recv_mat_[static_cast<std::size_t>(src) * nloc_ + lx];
      b.local = src == me_ ? 1 : 0;
      if (src == me_) {
        b.from = ks(placement_.rank_offset(me_) + lx);
      } else {
        b.from = next_from_[src];
        next_from_[src] += b.count;
      }
      blocks_h_(lx * P_ + src) = b;
      q += b.count;
    }
  }
  expert_offset_[nloc_] = q;
  nrows_ = q;
  lay_out_row_groups();
}

/// The grouped GEMMs' groups of all, kept and received rows (row_groups()): one group per
/// (local expert, source rank) block. BLAS rounds a row differently in a GEMM of another
/// height, so a row's result must not depend on which other rows share its GEMM: with the
/// block as the unit it depends on neither the overlap (kept and received rows in one call or
/// two) nor the placement (which rank's block is the kept one). Both stay bitwise invariant.
void DispatchPlan::lay_out_row_groups() {
  for (auto& g : groups_) g.clear();
  for (auto& g : group_wire_row_) g.clear();
  auto add = [&](ExpertRows which, const RowGroup& g, int wire_row) {
    groups_[static_cast<int>(which)].push_back(g);
    group_wire_row_[static_cast<int>(which)].push_back(wire_row);
  };
  for (int lx = 0; lx < nloc_; ++lx)
    for (int src = 0; src < P_; ++src) {
      const RowBlock& b = blocks_h_(lx * P_ + src);
      if (b.count == 0) continue;
      const RowGroup g{b.dest, b.dest + b.count, lx};
      const int wire_row = src == me_ ? -1 : b.from;
      add(ExpertRows::all, g, wire_row);
      add(src == me_ ? ExpertRows::kept : ExpertRows::received, g, wire_row);
    }
}

}  // namespace examoe::impl
