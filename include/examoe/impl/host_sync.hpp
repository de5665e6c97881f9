// Every point where the host waits for the device goes through this header, so that the
// project can count them: a fence of an execution-space instance, or a blocking copy of device
// data to the host. The counters are process-wide and cheap (relaxed atomics); `examoe bench`
// prints them per step and tests/test_host_syncs.cpp asserts them for the layer.
//
// What is counted is what a device build does. A host execution space (Serial, OpenMP)
// finishes its kernels before returning, so its fences cost nothing, but they are counted all
// the same: on this machine the count is the one a CUDA build of the same code path makes.
// The one fence NOT counted is Kokkos 3.4's compatibility fence before a GEMM
// (kokkos_compat.hpp): Kokkos 3.4 builds are host-only, and Kokkos 4 builds do not make it.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>

namespace examoe::impl {

/// Snapshot of the process-wide counters. Subtract two snapshots to count a region.
struct WorkCounts {
  std::int64_t host_syncs = 0;       ///< fences and blocking device-to-host copies
  std::int64_t gemm_calls = 0;       ///< GEMM calls of the project's GEMM interfaces
  std::int64_t kernel_launches = 0;  ///< parallel_for/reduce/scan, while a KernelLaunchCounter lives
};
WorkCounts work_counts() noexcept;
WorkCounts operator-(const WorkCounts& a, const WorkCounts& b) noexcept;

void count_host_sync() noexcept;
void count_gemm_call() noexcept;

/// The host waits for every kernel and copy queued on `space`: one counted synchronisation.
template <class Space>
void host_sync(const Space& space) {
  count_host_sync();
  space.fence();
}

/// Copies device view `src` into host view `dst` and waits for it: one counted synchronisation.
template <class Space, class Dst, class Src>
void copy_to_host(const Space& space, const Dst& dst, const Src& src) {
  Kokkos::deep_copy(space, dst, src);
  host_sync(space);
}

/// A host copy of device view `v` (the blocking Kokkos::create_mirror_view_and_copy), counted.
template <class V>
auto host_copy_of(const V& v) {
  count_host_sync();
  return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
}

/// Counts every Kokkos kernel launch (parallel_for, parallel_reduce, parallel_scan) of the
/// process while it lives, through the Kokkos Tools callbacks. One at a time; it restores no
/// earlier callbacks (ExaMoE sets no others of these three).
class KernelLaunchCounter {
 public:
  KernelLaunchCounter();
  ~KernelLaunchCounter();
  KernelLaunchCounter(const KernelLaunchCounter&) = delete;
  KernelLaunchCounter& operator=(const KernelLaunchCounter&) = delete;
};

}  // namespace examoe::impl
