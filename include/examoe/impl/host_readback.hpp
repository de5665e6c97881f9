// The values the host reads back from the device in one step, in one buffer: whoever produced
// them (the dispatch plan's counts, the router's statistics, the finite checks), they come down
// in ONE copy and ONE counted synchronisation (host_sync.hpp).
//
// Units reserve typed slots at set-up; kernels write a slot through device(slot); after
// fetch(), the host reads it through host(slot). The host side is pinned memory on CUDA, so the
// copy is a true asynchronous copy on the instance's stream and the fence is the only wait.
#pragma once

#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace examoe::impl {

template <class Space>
class HostReadback {
 public:
  using Mem = typename Space::memory_space;
  template <class T>
  using DeviceSlot = Kokkos::View<T*, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  template <class T>
  using HostSlot = Kokkos::View<T*, kc::StagingSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

  /// `count` values of type T, at an 8-byte aligned offset of the buffer.
  struct Slot {
    std::size_t offset = 0, count = 0;
  };

  explicit HostReadback(std::string label) : label_(std::move(label)) {}

  /// A new slot of n values of T. Reallocates the buffer (contents are not kept): reserve every
  /// slot at set-up, before the first kernel writes one.
  template <class T>
  Slot reserve(std::size_t n) {
    static_assert(alignof(T) <= 8, "examoe::impl::HostReadback: values aligned to at most 8 bytes");
    const Slot s{bytes_, n};
    bytes_ += (n * sizeof(T) + 7) / 8 * 8;
    device_ = Kokkos::View<char*, Mem>(label_, bytes_);
    host_ = Kokkos::View<char*, kc::StagingSpace>(label_ + "_host", bytes_);
    return s;
  }

  template <class T>
  DeviceSlot<T> device(const Slot& s) const {
    return DeviceSlot<T>(reinterpret_cast<T*>(device_.data() + s.offset), s.count);
  }
  /// The values of the last fetch().
  template <class T>
  HostSlot<T> host(const Slot& s) const {
    return HostSlot<T>(reinterpret_cast<T*>(host_.data() + s.offset), s.count);
  }

  /// Every slot to the host, after every kernel queued on `space`: one copy, one wait.
  void fetch(const Space& space) {
    if (bytes_ > 0) Kokkos::deep_copy(space, host_, device_);
    host_sync(space);
    ++fetches_;
  }
  /// How many fetches so far: a reader compares it with the value it saw when it queued its
  /// kernels, to know the host copy holds them.
  std::uint64_t fetches() const { return fetches_; }

 private:
  std::string label_;
  std::size_t bytes_ = 0;
  Kokkos::View<char*, Mem> device_;
  Kokkos::View<char*, kc::StagingSpace> host_;
  std::uint64_t fetches_ = 0;
};

}  // namespace examoe::impl
