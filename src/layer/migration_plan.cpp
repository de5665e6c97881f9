// The migration plan: see migration_plan.hpp.
#include "layer/migration_plan.hpp"

namespace examoe::impl {

MigrationPlan::MigrationPlan(const Placement& from, const Placement& to, int me) {
  const int P = from.num_ranks(), E = from.num_experts();
  old_local_ = from.num_local(me);
  new_local_ = to.num_local(me);
  exchange_.reset(P);
  for (int e = 0; e < E; ++e) {
    const int a = from.owner(e), b = to.owner(e);
    if (a == b) continue;
    if (a == me) ++exchange_.send_counts[b];
    if (b == me) ++exchange_.recv_counts[a];
  }
  exchange_.finish(true);
  send_blocks_.assign(exchange_.rows_sent, 0);
  recv_blocks_.assign(exchange_.rows_received, 0);
  std::vector<int> sent(P, 0), received(P, 0);
  for (int e = 0; e < E; ++e) {  // increasing global id on both sides
    const int a = from.owner(e), b = to.owner(e);
    if (a == me && b == me)
      kept_.emplace_back(from.local_index(e), to.local_index(e));
    else if (a == me)
      send_blocks_[exchange_.send_displs[b] + sent[b]++] = from.local_index(e);
    else if (b == me)
      recv_blocks_[exchange_.recv_displs[a] + received[a]++] = to.local_index(e);
  }
}

}  // namespace examoe::impl
