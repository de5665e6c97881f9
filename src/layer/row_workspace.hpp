// The persistent row buffers of one MoE layer's two all-to-alls: grow-only, reused by every
// step (and by backward, which runs the same exchanges with the same plan). W is the type rows
// travel in: the layer's scalar, or impl::bf16 (half the bytes).
#pragma once

#include "layer/dispatch_plan.hpp"

#include <examoe/impl/workspace.hpp>

#include <Kokkos_Core.hpp>

namespace examoe::impl {

template <class W>
struct RowWorkspace {
  using matrix = Kokkos::View<W**, Kokkos::LayoutRight, DispatchPlan::Mem>;
  RowWorkspace() {}  // see Fsdp::Unit: never value-initialise an aggregate holding Views

  /// Dispatch direction: rows this rank sends (in sorted-slot order) and receives.
  matrix send, recv;
  /// Combine direction: expert outputs going home, and this rank's returning rows.
  matrix back_send, back_recv;
  Workspace ws{"examoe::moe::"};

  /// Room for the plan's rows of `d` elements in the dispatch direction ...
  void reserve_dispatch(const DispatchPlan& plan, int d) {
    ws.reserve(send, "send_buf", plan.rows_sent(), d);
    ws.reserve(recv, "recv_buf", plan.rows_received(), d);
  }
  /// ... and in the combine direction.
  void reserve_combine(const DispatchPlan& plan, int d) {
    ws.reserve(back_send, "back_send", plan.rows_received(), d);
    ws.reserve(back_recv, "back_recv", plan.rows_sent(), d);
  }
};

}  // namespace examoe::impl
