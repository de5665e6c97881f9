// Expert capacity and token dropping: see capacity.hpp.
#include "layer/capacity.hpp"

#include <examoe/impl/watchdog.hpp>

#include <algorithm>
#include <cmath>

namespace examoe::impl {

long long expert_capacity(double capacity_factor, int top_k, long long tokens, int num_experts) {
  if (!(capacity_factor > 0)) return 0;
  return static_cast<long long>(
      std::ceil(capacity_factor * static_cast<double>(top_k) * static_cast<double>(tokens) / num_experts));
}

void CapacitySelector::select_on_host(const Space& space, const DispatchPlan& plan, int T, int k,
                                      Communicator& comm, double capacity_factor) {
  const int P = comm.size(), me = comm.rank(), nloc = plan.num_local();
  const Placement& pl = plan.placement();
  A_ = plan.assignments();
  // The communicator's batch: T of every rank, for C and for the global token index.
  token_counts_.assign(P, 0);
  {
    CollectiveLabel label("moe.capacity");
    comm.allgather(&T, token_counts_.data(), 1, DataType::i32, Memory::host);
  }
  long long total = 0, offset = 0;
  for (int r = 0; r < P; ++r) {
    if (r < me) offset += token_counts_[r];
    total += token_counts_[r];
  }
  capacity_ = expert_capacity(capacity_factor, k, total, pl.num_experts());

  // 1. (gate, global token index) of every row this rank would send, in the send layout.
  const int self_begin = plan.self_begin(), self_count = plan.self_count();
  const int sent = plan.rows_sent(), received = plan.rows_received();
  send_meta_.resize(2 * static_cast<std::size_t>(sent));
  for (int p = 0; p < sent; ++p) {
    const int a = perm_[p < self_begin ? p : p + self_count];
    send_meta_[2 * p] = gates_[a];
    send_meta_[2 * p + 1] = static_cast<double>(offset + a / k);
  }
  recv_meta_.resize(2 * static_cast<std::size_t>(received));
  {
    CollectiveLabel label("moe.capacity");
    comm.alltoallv_rows(send_meta_.data(), plan.send_counts().data(), plan.send_displs().data(), recv_meta_.data(),
                        plan.recv_counts().data(), plan.recv_displs().data(), 2, DataType::f64, Memory::host);
  }

  // 2. The owner's choice, per local expert, over the candidates of every source rank (the
  // received ones in the order they arrived: by source rank, then local expert).
  recv_keep_.assign(received, 0);
  self_keep_.assign(self_count, 0);
  dropped_local_.assign(nloc, 0);
  next_from_.assign(plan.recv_displs().begin(), plan.recv_displs().end());
  for (int lx = 0; lx < nloc; ++lx) {
    cand_.clear();
    for (int src = 0; src < P; ++src) {
      const int n = plan.recv_count(src, lx);
      if (src == me) {
        const int first = plan.key_begin(pl.rank_offset(me) + lx);
        for (int i = 0; i < n; ++i) {
          const int a = perm_[first + i];
          cand_.push_back({gates_[a], offset + a / k, -1 - (first + i - self_begin)});
        }
      } else {
        for (int i = 0; i < n; ++i) {
          const int row = next_from_[src] + i;
          cand_.push_back({recv_meta_[2 * row], static_cast<long long>(recv_meta_[2 * row + 1]), row});
        }
        next_from_[src] += n;
      }
    }
    const long long n_keep = std::min<long long>(capacity_, static_cast<long long>(cand_.size()));
    choose(static_cast<int>(n_keep));
    for (std::size_t i = 0; i < cand_.size(); ++i) {
      const int kept = static_cast<long long>(i) < n_keep ? 1 : 0;
      const int w = cand_[i].where;
      if (w >= 0)
        recv_keep_[w] = kept;
      else
        self_keep_[-1 - w] = kept;
    }
    dropped_local_[lx] = static_cast<int>(cand_.size() - n_keep);
  }

  // 3. The decisions go back to the senders (the reverse layout).
  send_keep_.assign(sent, 0);
  {
    CollectiveLabel label("moe.capacity");
    comm.alltoallv_rows(recv_keep_.data(), plan.recv_counts().data(), plan.recv_displs().data(), send_keep_.data(),
                        plan.send_counts().data(), plan.send_displs().data(), 1, DataType::i32, Memory::host);
  }

  // 4. Per assignment, to the device.
  ws_.reserve(keep_, "keep", A_);
  ws_.reserve(keep_h_, "keep_host", A_);
  for (int s = 0; s < A_; ++s) {
    const bool self = s >= self_begin && s < self_begin + self_count;
    keep_h_(perm_[s]) = self ? self_keep_[s - self_begin] : send_keep_[s < self_begin ? s : s - self_count];
  }
  Kokkos::deep_copy(space, head(keep_, A_), head(keep_h_, A_));
}

/// Orders the candidates so that the n_keep kept ones come first: larger gate first, then
/// the lower global token index (unique per expert: a token picks an expert once). A NaN
/// gate ranks last.
void CapacitySelector::choose(int n_keep) {
  if (n_keep >= static_cast<int>(cand_.size())) return;
  auto rank_gate = [](double g) { return std::isnan(g) ? -INFINITY : g; };
  std::partial_sort(cand_.begin(), cand_.begin() + n_keep, cand_.end(), [&](const Candidate& a, const Candidate& b) {
    const double ga = rank_gate(a.gate), gb = rank_gate(b.gate);
    if (ga != gb) return ga > gb;
    return a.token < b.token;
  });
}

void CapacitySelector::reduce_dropped(const Placement& placement, int my_rank, Communicator& stats_comm,
                                      std::vector<std::int64_t>& per_expert) {
  const int E = placement.num_experts();
  dropped_sum_.assign(E, 0.0);
  for (int lx = 0; lx < static_cast<int>(dropped_local_.size()); ++lx)
    dropped_sum_[placement.global_expert(my_rank, lx)] = dropped_local_[lx];
  {
    CollectiveLabel label("moe.capacity");
    stats_comm.allreduce_sum(dropped_sum_.data(), dropped_sum_.size(), DataType::f64, Memory::host);
  }
  per_expert.assign(E, 0);
  for (int e = 0; e < E; ++e) per_expert[e] = static_cast<std::int64_t>(dropped_sum_[e]);
}

}  // namespace examoe::impl
