// Host-side plan of a variable-size all-to-all done as point-to-point transfers: what the NCCL
// backend issues inside one ncclGroupStart/ncclGroupEnd. Pure host code without NCCL or CUDA,
// so it is tested on any machine.
#pragma once
#include <examoe/error.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace examoe::impl {

/// One transfer of an all-to-all. Offsets and counts are in elements (not rows) and size_t,
/// so row counts that fit int never overflow once multiplied by the row width.
struct P2POp {
  enum Kind { send, recv, copy };
  Kind kind = send;
  int peer = 0;                ///< destination (send), source (recv), this rank (copy)
  std::size_t offset = 0;      ///< into the send buffer (send, copy) or recv buffer (recv)
  std::size_t count = 0;       ///< elements
  std::size_t dst_offset = 0;  ///< copy only: into the recv buffer
};

/// The schedule of one alltoallv of rows on `rank` of `size`: counts and displacements in
/// rows of `row_elems` elements, as examoe::Communicator::alltoallv_rows takes them.
/// - Zero counts issue nothing (NCCL would otherwise post empty transfers).
/// - The rows a rank sends to itself become one local copy (no transport involved).
/// - Peers are visited in ring order starting at rank+1 (sends) and rank-1 (receives), so at
///   any point in the group different ranks target different peers.
/// Throws examoe::Error for negative counts or displacements, or when the counts to and from
/// this rank itself differ.
inline std::vector<P2POp> alltoallv_schedule(int rank, int size, const int* send_counts,
                                             const int* send_displs, const int* recv_counts,
                                             const int* recv_displs, int row_elems) {
  const char* where = "examoe::impl::alltoallv_schedule: ";
  if (size < 1 || rank < 0 || rank >= size || row_elems < 0)
    throw Error(std::string(where) + "bad rank " + std::to_string(rank) + " of " +
                std::to_string(size) + " or row width " + std::to_string(row_elems));
  for (int r = 0; r < size; ++r)
    if (send_counts[r] < 0 || recv_counts[r] < 0 || send_displs[r] < 0 || recv_displs[r] < 0)
      throw Error(std::string(where) + "negative count or displacement for peer " +
                  std::to_string(r));
  if (send_counts[rank] != recv_counts[rank])
    throw Error(std::string(where) + "rank " + std::to_string(rank) + " sends " +
                std::to_string(send_counts[rank]) + " rows to itself but expects " +
                std::to_string(recv_counts[rank]));
  const std::size_t w = static_cast<std::size_t>(row_elems);
  std::vector<P2POp> ops;
  if (w == 0) return ops;
  if (send_counts[rank] > 0) {
    P2POp c;
    c.kind = P2POp::copy;
    c.peer = rank;
    c.offset = static_cast<std::size_t>(send_displs[rank]) * w;
    c.dst_offset = static_cast<std::size_t>(recv_displs[rank]) * w;
    c.count = static_cast<std::size_t>(send_counts[rank]) * w;
    ops.push_back(c);
  }
  for (int i = 1; i < size; ++i) {
    const int to = (rank + i) % size, from = (rank - i + size) % size;
    if (send_counts[to] > 0) {
      P2POp s;
      s.kind = P2POp::send;
      s.peer = to;
      s.offset = static_cast<std::size_t>(send_displs[to]) * w;
      s.count = static_cast<std::size_t>(send_counts[to]) * w;
      ops.push_back(s);
    }
    if (recv_counts[from] > 0) {
      P2POp r;
      r.kind = P2POp::recv;
      r.peer = from;
      r.offset = static_cast<std::size_t>(recv_displs[from]) * w;
      r.count = static_cast<std::size_t>(recv_counts[from]) * w;
      ops.push_back(r);
    }
  }
  return ops;
}

}  // namespace examoe::impl
