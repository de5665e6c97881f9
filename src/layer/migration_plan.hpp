// The migration plan: how the experts' blocks move when the layer changes placement (the
// dynamic rebalancer). Like the dispatch plan it is a RowExchange (rows = expert blocks) plus
// where each row comes from and goes to; built on every rank from the two placements alone,
// without talking, and used for every per-expert tensor (weights, optimizer moments).
#pragma once

#include <examoe/impl/collectives.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/placement.hpp>

#include "layer/row_exchange.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace examoe::impl {

class MigrationPlan {
 public:
  /// From placement `from` to placement `to` (same experts and ranks), seen from `my_rank`.
  /// Blocks travel in increasing global expert id per (source, destination) pair.
  MigrationPlan(const Placement& from, const Placement& to, int my_rank);

  /// The all-to-all of the blocks that change rank; counts in blocks.
  const RowExchange& exchange() const { return exchange_; }
  /// Old local index of the block in send slot i (i < exchange().rows_sent).
  const std::vector<int>& send_blocks() const { return send_blocks_; }
  /// New local index of the block in receive slot i (i < exchange().rows_received).
  const std::vector<int>& recv_blocks() const { return recv_blocks_; }
  /// (old local index, new local index) of the blocks that stay on this rank.
  const std::vector<std::pair<int, int>>& kept_blocks() const { return kept_; }
  int old_local() const { return old_local_; }
  int new_local() const { return new_local_; }

 private:
  RowExchange exchange_;
  std::vector<int> send_blocks_, recv_blocks_;
  std::vector<std::pair<int, int>> kept_;
  int old_local_ = 0, new_local_ = 0;
};

/// Moves `t` (this rank's blocks of `block` elements, in the old local order) through `plan`
/// with one all-to-all; returns the new local tensor, in the new local order. Collective.
template <class Space, class S>
Kokkos::View<S*, typename Space::memory_space> migrate_blocks(const Space& space,
                                                              Collectives<Space>& coll,
                                                              const MigrationPlan& plan,
                                                              const S* t, std::size_t block) {
  using Mem = typename Space::memory_space;
  static_assert(Kokkos::SpaceAccessibility<Space, Mem>::accessible,
                "examoe::impl::migrate_blocks: the blocks must be accessible from the space");
  using View = Kokkos::View<S*, Mem>;
  const RowExchange& x = plan.exchange();
  const std::size_t ns = static_cast<std::size_t>(x.rows_sent), nr = static_cast<std::size_t>(x.rows_received);
  View out("examoe::moe::migrated", static_cast<std::size_t>(plan.new_local()) * block);
  View sendb("examoe::moe::migrate_send", std::max<std::size_t>(1, ns * block));
  View recvb("examoe::moe::migrate_recv", std::max<std::size_t>(1, nr * block));
  using U = Kokkos::View<const S*, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const U old(t, static_cast<std::size_t>(plan.old_local()) * block);
  auto blk = [block](const auto& v, std::size_t i) {
    return Kokkos::subview(v, Kokkos::make_pair(i * block, (i + 1) * block));
  };
  for (std::size_t i = 0; i < ns; ++i)
    Kokkos::deep_copy(space, blk(sendb, i), blk(old, static_cast<std::size_t>(plan.send_blocks()[i])));
  {
    CollectiveLabel label("moe.migrate");
    exchange_rows(coll, x, Direction::forward, sendb.data(), recvb.data(), static_cast<int>(block));
  }
  for (const auto& kept : plan.kept_blocks())
    Kokkos::deep_copy(space, blk(out, static_cast<std::size_t>(kept.second)),
                      blk(old, static_cast<std::size_t>(kept.first)));
  for (std::size_t i = 0; i < nr; ++i)
    Kokkos::deep_copy(space, blk(out, static_cast<std::size_t>(plan.recv_blocks()[i])), blk(recvb, i));
  host_sync(space);
  return out;
}

}  // namespace examoe::impl
