// The launch shape of the per-row kernels (docs/moe-layer.md, "How a step moves data"): one team
// per row, its threads over the row's elements, so that consecutive threads touch consecutive
// elements on a GPU. On host backends a team is one thread (Kokkos::AUTO) and a row is a
// unit-stride loop.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl {

/// `rows` teams for rows of `row_length` elements: on a GPU as many threads per team as the
/// row has elements, rounded up to a warp (32) and at most 256, so short rows (the router's E
/// experts) do not leave most of a large team idle.
template <class Space>
Kokkos::TeamPolicy<Space> row_policy(const Space& space, int rows, int row_length) {
  if constexpr (kc::device_memory_v<Space>) {
    int threads = 32;
    while (threads < row_length && threads < 256) threads *= 2;
    return Kokkos::TeamPolicy<Space>(space, rows, threads);
  } else {
    (void)row_length;
    return Kokkos::TeamPolicy<Space>(space, rows, Kokkos::AUTO);
  }
}

}  // namespace examoe::impl
