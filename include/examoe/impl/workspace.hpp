// Grow-only buffers: a View is reallocated only when a step needs more rows than it has,
// so a steady-state step allocates nothing. Every (re)allocation is counted.
#pragma once
#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>

namespace examoe::impl {

class Workspace {
 public:
  explicit Workspace(std::string prefix) : prefix_(std::move(prefix)) {}

  /// Ensures `v` (rank 1) holds at least n entries. Contents are not preserved.
  template <class View>
  void reserve(View& v, const char* name, std::size_t n) {
    static_assert(View::rank == 1, "rank-1 view expected");
    if (v.data() != nullptr && v.extent(0) >= n) return;
    if (n == 0 && v.data() != nullptr) return;
    v = View(Kokkos::view_alloc(Kokkos::WithoutInitializing, prefix_ + name), grown(v.extent(0), n));
    ++allocations_;
  }
  /// Ensures `v` (rank 2) holds at least `rows` rows of exactly `cols` columns.
  template <class View>
  void reserve(View& v, const char* name, std::size_t rows, std::size_t cols) {
    static_assert(View::rank == 2, "rank-2 view expected");
    if (v.data() != nullptr && v.extent(0) >= rows && v.extent(1) == cols) return;
    const std::size_t old = v.extent(1) == cols ? v.extent(0) : 0;
    v = View(Kokkos::view_alloc(Kokkos::WithoutInitializing, prefix_ + name), grown(old, rows), cols);
    ++allocations_;
  }
  std::int64_t allocations() const { return allocations_; }

 private:
  // Grow by at least 25% so slowly growing token counts do not reallocate every step.
  static std::size_t grown(std::size_t old, std::size_t need) {
    if (need == 0) return 1;
    std::size_t g = old + old / 4;
    return need > g ? need : g;
  }
  std::string prefix_;
  std::int64_t allocations_ = 0;
};

/// First `rows` rows of a rank-2 buffer.
template <class View>
auto rows_of(const View& v, std::size_t rows) {
  return Kokkos::subview(v, Kokkos::make_pair(std::size_t(0), rows), Kokkos::ALL);
}
template <class View>
auto head(const View& v, std::size_t n) {
  return Kokkos::subview(v, Kokkos::make_pair(std::size_t(0), n));
}

}  // namespace examoe::impl
