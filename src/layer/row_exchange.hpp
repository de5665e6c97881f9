// The layout of one variable-size all-to-all of rows, and the data motion through it. Both
// plans of the layer own one: the dispatch plan (rows = token assignments, per step) and the
// migration plan (rows = expert blocks, per placement change).
#pragma once

#include <examoe/impl/collectives.hpp>

#include <vector>

namespace examoe::impl {

/// Counts and displacements, in rows, of one all-to-all over P ranks, from this rank's side.
/// Rows a rank keeps are copied, never sent: the self entries are 0.
struct RowExchange {
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  int rows_sent = 0, rows_received = 0;

  /// P ranks, every count and displacement 0.
  void reset(int P) {
    send_counts.assign(P, 0);
    send_displs.assign(P, 0);
    recv_counts.assign(P, 0);
    recv_displs.assign(P, 0);
    rows_sent = rows_received = 0;
  }
  /// Totals from the counts; the receive buffer packed in rank order (and the send buffer
  /// too with `pack_sends`; otherwise the caller has set send_displs).
  void finish(bool pack_sends) {
    rows_sent = rows_received = 0;
    for (std::size_t r = 0; r < send_counts.size(); ++r) {
      if (pack_sends) send_displs[r] = rows_sent;
      recv_displs[r] = rows_received;
      rows_sent += send_counts[r];
      rows_received += recv_counts[r];
    }
  }
};

/// Which way rows travel through a RowExchange: as laid out, or back (the same counts, send
/// and receive swapped: the combine of a dispatch).
enum class Direction { forward, reverse };

/// Starts ONE variable-size all-to-all of rows of `row_elems` elements through `x`; local work
/// may run until finish_exchange_rows (Collectives::start_alltoallv_rows: `x` must stay alive).
template <class Space, class T>
void start_exchange_rows(Collectives<Space>& coll, const RowExchange& x, Direction dir, const T* send,
                         T* recv, int row_elems) {
  if (dir == Direction::forward)
    coll.start_alltoallv_rows(send, x.send_counts.data(), x.send_displs.data(), recv,
                              x.recv_counts.data(), x.recv_displs.data(), row_elems);
  else
    coll.start_alltoallv_rows(send, x.recv_counts.data(), x.recv_displs.data(), recv,
                              x.send_counts.data(), x.send_displs.data(), row_elems);
}

/// Completes the exchange start_exchange_rows began: the received rows may be read after it.
template <class Space>
void finish_exchange_rows(Collectives<Space>& coll) {
  coll.finish_alltoallv_rows();
}

/// ONE variable-size all-to-all of rows, start to finish.
template <class Space, class T>
void exchange_rows(Collectives<Space>& coll, const RowExchange& x, Direction dir, const T* send,
                   T* recv, int row_elems) {
  start_exchange_rows(coll, x, dir, send, recv, row_elems);
  finish_exchange_rows(coll);
}

}  // namespace examoe::impl
