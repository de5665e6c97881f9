// The process-wide work counters of impl/host_sync.hpp.
#include <examoe/error.hpp>
#include <examoe/impl/host_sync.hpp>

#include <atomic>

namespace examoe::impl {
namespace {

std::atomic<std::int64_t> g_host_syncs{0};
std::atomic<std::int64_t> g_gemm_calls{0};
std::atomic<std::int64_t> g_kernel_launches{0};
std::atomic<bool> g_launch_counter_alive{false};

void count_launch(const char*, std::uint32_t, std::uint64_t*) {
  g_kernel_launches.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

WorkCounts work_counts() noexcept {
  WorkCounts c;
  c.host_syncs = g_host_syncs.load(std::memory_order_relaxed);
  c.gemm_calls = g_gemm_calls.load(std::memory_order_relaxed);
  c.kernel_launches = g_kernel_launches.load(std::memory_order_relaxed);
  return c;
}

WorkCounts operator-(const WorkCounts& a, const WorkCounts& b) noexcept {
  WorkCounts c;
  c.host_syncs = a.host_syncs - b.host_syncs;
  c.gemm_calls = a.gemm_calls - b.gemm_calls;
  c.kernel_launches = a.kernel_launches - b.kernel_launches;
  return c;
}

void count_host_sync() noexcept { g_host_syncs.fetch_add(1, std::memory_order_relaxed); }
void count_gemm_call() noexcept { g_gemm_calls.fetch_add(1, std::memory_order_relaxed); }

KernelLaunchCounter::KernelLaunchCounter() {
  if (g_launch_counter_alive.exchange(true))
    throw Error("examoe::impl::KernelLaunchCounter: another counter is already installed");
  Kokkos::Tools::Experimental::set_begin_parallel_for_callback(&count_launch);
  Kokkos::Tools::Experimental::set_begin_parallel_reduce_callback(&count_launch);
  Kokkos::Tools::Experimental::set_begin_parallel_scan_callback(&count_launch);
}

KernelLaunchCounter::~KernelLaunchCounter() {
  Kokkos::Tools::Experimental::set_begin_parallel_for_callback(nullptr);
  Kokkos::Tools::Experimental::set_begin_parallel_reduce_callback(nullptr);
  Kokkos::Tools::Experimental::set_begin_parallel_scan_callback(nullptr);
  g_launch_counter_alive.store(false);
}

}  // namespace examoe::impl
