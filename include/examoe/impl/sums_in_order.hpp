// Several sums in order at once, for the host paths of per-row reductions (the router's softmax
// sums and its backward's dot products, the gate gradients). A sum in order is a chain of
// dependent adds: one add per add latency (3-4 cycles), the adder mostly idle. Eight
// independent chains keep it busy, and each sum still adds its terms from the first to the
// last: bitwise what one loop per sum gives, and what a team's reduction gives on a host
// backend (one thread per team).
#pragma once

namespace examoe::impl {

/// How many sums sums_in_order interleaves.
inline constexpr int kSumsInOrder = 8;

/// out[j] = term(j, 0) + term(j, 1) + ... + term(j, n - 1), added in that order from 0, for
/// j in [0, m) with 0 <= m <= kSumsInOrder. term is called only for those j.
template <class R, class F>
inline void sums_in_order(int m, int n, const F& term, R* out) {
  R acc[kSumsInOrder];
  for (int j = 0; j < kSumsInOrder; ++j) acc[j] = R(0);
  if (m == kSumsInOrder) {  // the common case, with a trip count the compiler unrolls
    for (int c = 0; c < n; ++c)
      for (int j = 0; j < kSumsInOrder; ++j) acc[j] += term(j, c);
  } else {
    for (int c = 0; c < n; ++c)
      for (int j = 0; j < m; ++j) acc[j] += term(j, c);
  }
  for (int j = 0; j < m; ++j) out[j] = acc[j];
}

}  // namespace examoe::impl
