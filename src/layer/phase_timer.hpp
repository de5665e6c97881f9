// Wall time of the layer's phases without stalling the device. On host execution spaces a
// kernel is done when its launch returns, so a steady clock read between phases measures them.
// On CUDA, events are recorded on the instance's stream between phases and resolved when the
// times are read (one wait, counted by host_sync.hpp), never in the middle of a step.
#pragma once

#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/metrics.hpp>

#include <chrono>
#include <cstddef>
#include <type_traits>
#include <vector>

#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace examoe::impl {

template <class Space>
class PhaseTimer {
#if defined(KOKKOS_ENABLE_CUDA)
  static constexpr bool uses_events = std::is_same_v<Space, Kokkos::Cuda>;
#else
  static constexpr bool uses_events = false;
#endif

 public:
  explicit PhaseTimer(const Space& space) : space_(space) {}
  ~PhaseTimer() {
#if defined(KOKKOS_ENABLE_CUDA)
    for (void* e : events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
#endif
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  /// Forgets what was marked and not collected.
  void clear() {
    phases_.clear();
    host_marks_.clear();
  }
  /// The start of a timed stretch (a forward or a backward).
  void start() { record(-1); }
  /// The end of phase `ph`: its time runs from the previous mark.
  void mark(Phase ph) { record(static_cast<int>(ph)); }
  /// Adds the time of every phase marked since the last collect into seconds[phase].
  void collect(double* seconds) {
    if (phases_.empty()) return;
    if constexpr (uses_events) {
#if defined(KOKKOS_ENABLE_CUDA)
      count_host_sync();
      cudaEventSynchronize(event(phases_.size() - 1));
      for (std::size_t i = 1; i < phases_.size(); ++i) {
        float ms = 0;
        cudaEventElapsedTime(&ms, event(i - 1), event(i));
        if (phases_[i] >= 0) seconds[phases_[i]] += 1e-3 * ms;
      }
#endif
    } else {
      for (std::size_t i = 1; i < phases_.size(); ++i)
        if (phases_[i] >= 0)
          seconds[phases_[i]] += std::chrono::duration<double>(host_marks_[i] - host_marks_[i - 1]).count();
    }
    clear();
  }

 private:
  void record(int phase) {
    phases_.push_back(phase);
    if constexpr (uses_events) {
#if defined(KOKKOS_ENABLE_CUDA)
      cudaEventRecord(event(phases_.size() - 1), space_.cuda_stream());
#endif
    } else {
      host_marks_.push_back(std::chrono::steady_clock::now());
    }
  }
#if defined(KOKKOS_ENABLE_CUDA)
  cudaEvent_t event(std::size_t i) {
    while (events_.size() <= i) {
      cudaEvent_t e;
      cudaEventCreate(&e);
      events_.push_back(static_cast<void*>(e));
    }
    return static_cast<cudaEvent_t>(events_[i]);
  }
#endif

  Space space_;
  std::vector<int> phases_;  // -1: a start, else the phase that ends at this mark
  std::vector<std::chrono::steady_clock::time_point> host_marks_;
  std::vector<void*> events_;  // cudaEvent_t, created on first use and reused
};

}  // namespace examoe::impl
