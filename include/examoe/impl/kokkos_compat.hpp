// The one place where differences between Kokkos 3.4 (Debian/Trilinos 13.2) and
// Kokkos >= 4.7 (upstream, Spack) are absorbed. Everything else in ExaMoE calls these.
#pragma once

#include <Kokkos_Core.hpp>
#include <KokkosBlas3_gemm.hpp>

#include <examoe/impl/host_sync.hpp>

#include <cmath>
#include <string>
#include <type_traits>

#if KOKKOS_VERSION >= 40000
#define EXAMOE_KOKKOS4 1
#else
#define EXAMOE_KOKKOS4 0
#endif

namespace examoe::impl::kc {

// ---- math functions: Kokkos::Experimental:: in 3.x, Kokkos:: in 4.x ----
#if EXAMOE_KOKKOS4
using Kokkos::cos;
using Kokkos::erf;
using Kokkos::exp;
using Kokkos::fabs;
using Kokkos::fma;
using Kokkos::isfinite;
using Kokkos::log;
using Kokkos::sqrt;
using Kokkos::tanh;
#else
using Kokkos::Experimental::cos;
using Kokkos::Experimental::erf;
using Kokkos::Experimental::exp;
using Kokkos::Experimental::fabs;
using Kokkos::Experimental::isfinite;
using Kokkos::Experimental::log;
using Kokkos::Experimental::sqrt;
using Kokkos::Experimental::tanh;
/// a b + c, rounded once (Kokkos 3.4 has no fma; its builds here are host-only).
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline double fma(double a, double b, double c) { return std::fma(a, b, c); }
#endif

// ---- min/max: Kokkos::Experimental::min in 3.x (partially), Kokkos::min in 4.x ----
template <class T>
KOKKOS_INLINE_FUNCTION constexpr const T& min(const T& a, const T& b) {
  return b < a ? b : a;
}
template <class T>
KOKKOS_INLINE_FUNCTION constexpr const T& max(const T& a, const T& b) {
  return a < b ? b : a;
}

// ---- initialization: InitArguments (3.x) vs InitializationSettings (4.x) ----
/// Initializes Kokkos unless the host code already did. Returns true when this call
/// initialized it (and the caller then owns finalize).
inline bool initialize_if_needed(int num_threads = -1, int device_id = -1) {
  if (Kokkos::is_initialized()) return false;
#if EXAMOE_KOKKOS4
  Kokkos::InitializationSettings s;
  if (num_threads > 0) s.set_num_threads(num_threads);
  if (device_id >= 0) s.set_device_id(device_id);
  Kokkos::initialize(s);
#else
  Kokkos::InitArguments a;
  a.num_threads = num_threads;
  a.device_id = device_id;
  Kokkos::initialize(a);
#endif
  return true;
}

/// GPUs Kokkos can use before it is initialized (-1: no GPU backend in this Kokkos).
inline int num_devices() {
#if KOKKOS_VERSION >= 40100
  return Kokkos::num_devices();
#else
  return -1;  // Kokkos 3.4 here is Serial only
#endif
}

// ---- device backends: native stream and host staging memory ----
/// Whether the execution space's memory is not readable from the host (a GPU's).
template <class ExecSpace>
inline constexpr bool device_memory_v =
    !Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible;

/// The native stream of an execution-space instance (cudaStream_t for Kokkos::Cuda), as the
/// void* that examoe::make_communicator takes; nullptr for host spaces.
template <class ExecSpace>
void* native_stream(const ExecSpace& space) {
#if defined(KOKKOS_ENABLE_CUDA)
  if constexpr (std::is_same_v<ExecSpace, Kokkos::Cuda>) return static_cast<void*>(space.cuda_stream());
#endif
  (void)space;
  return nullptr;
}

/// Host memory for staging device buffers through MPI: pinned where the backend has it.
#if defined(KOKKOS_ENABLE_CUDA)
using StagingSpace = Kokkos::CudaHostPinnedSpace;
#else
using StagingSpace = Kokkos::HostSpace;
#endif

// ---- profiling regions ----
inline void push_region(const std::string& name) { Kokkos::Profiling::pushRegion(name); }
inline void pop_region() { Kokkos::Profiling::popRegion(); }

/// RAII profiling region, visible to Kokkos Tools (e.g. the space-time stack).
class ScopedRegion {
 public:
  explicit ScopedRegion(const std::string& name) { push_region(name); }
  ~ScopedRegion() { pop_region(); }
  ScopedRegion(const ScopedRegion&) = delete;
  ScopedRegion& operator=(const ScopedRegion&) = delete;
};

// ---- GEMM on an execution-space instance ----
// Kokkos Kernels 4.x takes the instance as first argument; 3.4 runs on the default
// instance of the views' space, so we fence the caller's instance first (Kokkos 3.4 builds are
// host-only: that fence costs nothing and is not counted as a host synchronisation).
// Every call is counted (work_counts().gemm_calls).
/// One GEMM, not counted: the building block of the counted interfaces (gemm below and
/// impl/grouped_gemm.hpp).
template <class ExecSpace, class A, class B, class C>
void gemm_uncounted(const ExecSpace& space, const char* ta, const char* tb,
                    typename C::const_value_type alpha, const A& a, const B& b,
                    typename C::const_value_type beta, const C& c) {
  if (c.extent(0) == 0 || c.extent(1) == 0) return;
#if EXAMOE_KOKKOS4
  KokkosBlas::gemm(space, ta, tb, alpha, a, b, beta, c);
#else
  space.fence();
  KokkosBlas::gemm(ta, tb, alpha, a, b, beta, c);
#endif
}

/// c = alpha op(a) op(b) + beta c on the instance `space`; one counted GEMM call.
template <class ExecSpace, class A, class B, class C>
void gemm(const ExecSpace& space, const char* ta, const char* tb,
          typename C::const_value_type alpha, const A& a, const B& b,
          typename C::const_value_type beta, const C& c) {
  count_gemm_call();
  gemm_uncounted(space, ta, tb, alpha, a, b, beta, c);
}

}  // namespace examoe::impl::kc
