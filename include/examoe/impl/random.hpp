// Counter-based random numbers: a value depends only on its key, never on thread order or
// rank count, so noise and initial weights are identical at any parallel decomposition.
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

#include <cstdint>

namespace examoe::impl {

KOKKOS_INLINE_FUNCTION std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
KOKKOS_INLINE_FUNCTION std::uint64_t hash_key(std::uint64_t a, std::uint64_t b, std::uint64_t c,
                                              std::uint64_t d) {
  return splitmix64(splitmix64(splitmix64(splitmix64(a) ^ b) ^ c) ^ d);
}
/// Uniform in (0, 1), 53 random bits.
KOKKOS_INLINE_FUNCTION double uniform01(std::uint64_t h) {
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
/// Standard normal by Box-Muller from two hashes of the key.
KOKKOS_INLINE_FUNCTION double normal(std::uint64_t h) {
  const double u1 = uniform01(h);
  const double u2 = uniform01(splitmix64(h ^ 0xD1B54A32D192ED03ull));
  return kc::sqrt(-2.0 * kc::log(u1)) * kc::cos(6.283185307179586 * u2);
}

}  // namespace examoe::impl
