// bfloat16 rows on the wire: the layer's exchanges may move rows as bf16 (the top 16 bits of
// an IEEE float, rounded to nearest even), halving the bytes, while every computation stays in
// the layer's scalar. Rounding a double goes through float: bf16(x) = bf16(float(x)).
#pragma once

#include <examoe/comm.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>

namespace examoe::impl {

/// A bfloat16 value as it travels: its bits. Only converted, never computed with.
struct bf16 {
  std::uint16_t bits;
};

KOKKOS_INLINE_FUNCTION std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

/// Round to nearest even; NaN stays a (quiet) NaN, infinities stay infinities.
KOKKOS_INLINE_FUNCTION bf16 to_bf16(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  return bf16{static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

KOKKOS_INLINE_FUNCTION float from_bf16(bf16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace examoe::impl

namespace examoe {
template <>
constexpr DataType data_type_of<impl::bf16>() { return DataType::bf16; }
}  // namespace examoe

namespace examoe::impl {

/// A row element as the wire type W stores it, and back: the identity for W = S.
template <class W, class S>
KOKKOS_INLINE_FUNCTION W to_wire(const S& x) {
  if constexpr (std::is_same_v<W, bf16>)
    return to_bf16(static_cast<float>(x));
  else
    return static_cast<W>(x);
}
template <class S, class W>
KOKKOS_INLINE_FUNCTION S from_wire(const W& w) {
  if constexpr (std::is_same_v<W, bf16>)
    return static_cast<S>(from_bf16(w));
  else
    return static_cast<S>(w);
}

}  // namespace examoe::impl
