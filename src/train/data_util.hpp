#pragma once
// What the corpora share (data.cpp, token_corpus.cpp, token_file.cpp): the counter-based hash
// steps of the sampling contract, batch set-up, the validation split, and the refusal of data
// paths that are not regular files. Private to src/train.
#include <examoe/data.hpp>
#include <examoe/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace examoe::impl::data {

/// The seed tag of the file corpora's training windows (FileCorpus and TokenCorpus share it,
/// so the same tokens give the same windows whichever reader holds them).
constexpr std::uint64_t kTagFile = 0x46696C65436F7270ull;  // "FileCorp"

/// Counter-based hash step: key' = H(key, value). Order-sensitive, no state.
inline std::uint64_t mix(std::uint64_t key, std::uint64_t value) noexcept {
  return splitmix64(key ^ splitmix64(value ^ 0xD1B54A32D192ED03ull));
}

__extension__ typedef unsigned __int128 u128;  // GCC, Clang and icpx all have it

/// Uniform integer in [0, n) from a 64-bit hash (multiply-high, no modulo bias to speak of).
inline std::uint64_t below(std::uint64_t h, std::uint64_t n) noexcept {
  return static_cast<std::uint64_t>((static_cast<u128>(h) * n) >> 64);
}

/// Entropy (nats) of a histogram; 0 for an empty or single-symbol one.
template <class Counts>
double entropy_of(const Counts& counts) {
  double total = 0;
  for (auto c : counts) total += static_cast<double>(c);
  if (total == 0) return 0.0;
  double h = 0.0;
  for (auto c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / total;
    h -= p * std::log(p);
  }
  return h <= 0.0 ? 0.0 : h;  // -0.0 / rounding below 0 for a single symbol
}

inline void reset_batch(Batch& out, int count, int seq_len, int fill_token) {
  out.batch = count;
  out.seq_len = seq_len;
  const std::size_t n = static_cast<std::size_t>(count) * static_cast<std::size_t>(seq_len);
  out.tokens.assign(n, fill_token);
  out.targets.assign(n, -1);
  out.sample_of_row.assign(n, -1);
}

/// ceil(size * val_fraction), at least 1 and at most size: the validation part of a file.
template <class N>
N val_part_of(N size, double val_fraction) {
  // The relative epsilon keeps e.g. 10 * 0.3 = 3.0000000000000004 at 3 bytes, not 4.
  const double x = static_cast<double>(size) * val_fraction;
  const double v = std::ceil(x - 1e-12 * std::max(1.0, x));
  return std::min(size, static_cast<N>(std::max(v, 1.0)));
}

inline void check_range(const char* fn, int first, int count) {
  if (first < 0 || count < 0) {
    std::ostringstream os;
    os << fn << ": first (" << first << ") and count (" << count << ") must be >= 0";
    throw Error(os.str());
  }
}

/// Opens `path` for reading when it is a non-empty regular file, and returns the descriptor
/// and its size. stat() comes first, so a FIFO, a device or a directory is refused without
/// being opened; the open is non-blocking and what it opened is checked again with fstat()
/// (the path may have been replaced in between), so not even that race can block on a FIFO.
/// Errors are prefixed `fn`; `key` is the config key the path came from (for the message).
int open_regular_file(const char* fn, const std::string& path, std::size_t& size,
                      const char* key = "data.path");

}  // namespace examoe::impl::data
