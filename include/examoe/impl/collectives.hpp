// The data collectives on Kokkos memory, for any backend: one call site in the layer, FSDP and
// the model whatever the communicator and the memory space.
//  - host memory (Serial/OpenMP): straight to the communicator;
//  - device memory and a backend that takes it (NCCL, GPU-aware MPI): straight too; NCCL is
//    ordered on the execution space's stream, MPI gets a fence first;
//  - device memory and plain MPI: staged through grow-only pinned host buffers, and only the
//    chunks that cross ranks (the all-to-all's own rows are copied on the device).
#pragma once
#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <vector>

namespace examoe::impl {

template <class ExecSpace>
class Collectives {
 public:
  using memory_space = typename ExecSpace::memory_space;
  static constexpr bool device = kc::device_memory_v<ExecSpace>;

  /// `always_stage` (tests) routes host data through the staging path too.
  Collectives(Communicator& comm, const ExecSpace& space, bool always_stage = false)
      : comm_(&comm), space_(space), always_stage_(always_stage) {}

  Communicator& comm() const { return *comm_; }
  /// True when this adapter stages through host memory (device data, backend cannot take it).
  bool staged() const { return always_stage_ || (device && !comm_->accepts(Memory::device)); }
  std::size_t staged_bytes() const { return staged_bytes_; }

  /// Variable-size all-to-all of rows (counts and displacements in rows of `row_elems`).
  template <class T>
  void alltoallv_rows(const T* send, const int* sc, const int* sd, T* recv, const int* rc,
                      const int* rd, int row_elems) {
    start_alltoallv_rows(send, sc, sd, recv, rc, rd, row_elems);
    finish_alltoallv_rows();
  }

  /// The same in two halves (Communicator::start_alltoallv_rows): local work runs between
  /// them while the rows travel. Until finish, `send` must not be written nor `recv` read;
  /// the counts and displacements are copied, the buffers must stay alive.
  template <class T>
  void start_alltoallv_rows(const T* send, const int* sc, const int* sd, T* recv, const int* rc,
                            const int* rd, int row_elems) {
    if (in_flight_)
      throw Error("examoe::impl::Collectives::start_alltoallv_rows: an exchange is already in flight "
                  "(finish_alltoallv_rows first)");
    if (!staged()) {
      ready();
      comm_->start_alltoallv_rows(send, sc, sd, recv, rc, rd, row_elems, data_type_of<T>(), mem());
      in_flight_ = true;
      return;
    }
    const int P = comm_->size(), me = comm_->rank();
    // Rows a rank keeps: device to device, never through the host.
    const std::size_t w = static_cast<std::size_t>(row_elems);
    if (sc[me] > 0)
      Kokkos::deep_copy(space_, dev(recv + static_cast<std::size_t>(rd[me]) * w, sc[me] * w),
                        dev(const_cast<T*>(send) + static_cast<std::size_t>(sd[me]) * w, sc[me] * w));
    // Remote rows into one packed host buffer per direction, counts in host order.
    hsc_.assign(sc, sc + P);
    hrc_.assign(rc, rc + P);
    hsc_[me] = hrc_[me] = 0;
    hsd_.assign(P, 0);
    hrd_.assign(P, 0);
    std::size_t ns = 0, nr = 0;
    for (int r = 0; r < P; ++r) {
      hsd_[r] = static_cast<int>(ns);
      hrd_[r] = static_cast<int>(nr);
      ns += static_cast<std::size_t>(hsc_[r]);
      nr += static_cast<std::size_t>(hrc_[r]);
    }
    T* hs = reserve<T>(xsend_host_, ns * w);
    T* hr = reserve<T>(xrecv_host_, nr * w);
    for (int r = 0; r < P; ++r)
      if (hsc_[r] > 0)
        Kokkos::deep_copy(space_, host(hs + hsd_[r] * w, hsc_[r] * w),
                          dev(const_cast<T*>(send) + static_cast<std::size_t>(sd[r]) * w, hsc_[r] * w));
    host_sync(space_);
    comm_->start_alltoallv_rows(hs, hsc_.data(), hsd_.data(), hr, hrc_.data(), hrd_.data(), row_elems,
                                data_type_of<T>(), Memory::host);
    // What finish copies back to the device.
    drd_.assign(rd, rd + P);
    unstage_ = [this, recv, P, w, hr] {
      for (int r = 0; r < P; ++r)
        if (hrc_[r] > 0)
          Kokkos::deep_copy(space_, dev(recv + static_cast<std::size_t>(drd_[r]) * w, hrc_[r] * w),
                            host(hr + hrd_[r] * w, hrc_[r] * w));
    };
    staged_bytes_ += (ns + nr) * w * sizeof(T);
    in_flight_ = true;
  }
  /// Lets the started exchange advance (see Communicator::progress_alltoallv_rows).
  void progress_alltoallv_rows() { comm_->progress_alltoallv_rows(); }
  /// Completes the started exchange: after it, `recv` may be read on this instance.
  void finish_alltoallv_rows() {
    if (!in_flight_) return;
    in_flight_ = false;
    comm_->finish_alltoallv_rows();
    if (unstage_) {
      unstage_();
      unstage_ = nullptr;
    }
  }

  /// In-place sum over ranks.
  template <class T>
  void allreduce_sum(T* buf, std::size_t n) {
    if (n == 0 && !staged()) return;
    if (!staged()) {
      ready();
      comm_->allreduce_sum(buf, n, data_type_of<T>(), mem());
      return;
    }
    T* h = reserve<T>(send_host_, n);
    Kokkos::deep_copy(space_, host(h, n), dev(buf, n));
    host_sync(space_);
    comm_->allreduce_sum(h, n, data_type_of<T>(), Memory::host);
    Kokkos::deep_copy(space_, dev(buf, n), host(h, n));
    staged_bytes_ += 2 * n * sizeof(T);
  }

  /// recv[r*n .. r*n+n) = rank r's send[0..n).
  template <class T>
  void allgather(const T* send, T* recv, std::size_t n) {
    if (!staged()) {
      ready();
      comm_->allgather(send, recv, n, data_type_of<T>(), mem());
      return;
    }
    const std::size_t all = n * static_cast<std::size_t>(comm_->size());
    T* hs = reserve<T>(send_host_, n);
    T* hr = reserve<T>(recv_host_, all);
    Kokkos::deep_copy(space_, host(hs, n), dev(const_cast<T*>(send), n));
    host_sync(space_);
    comm_->allgather(hs, hr, n, data_type_of<T>(), Memory::host);
    Kokkos::deep_copy(space_, dev(recv, all), host(hr, all));
    staged_bytes_ += (n + all) * sizeof(T);
  }

  /// recv[0..n) = sum over ranks of their send[me*n .. me*n+n).
  template <class T>
  void reduce_scatter_sum(const T* send, T* recv, std::size_t n) {
    if (!staged()) {
      ready();
      comm_->reduce_scatter_sum(send, recv, n, data_type_of<T>(), mem());
      return;
    }
    const std::size_t all = n * static_cast<std::size_t>(comm_->size());
    T* hs = reserve<T>(send_host_, all);
    T* hr = reserve<T>(recv_host_, n);
    Kokkos::deep_copy(space_, host(hs, all), dev(const_cast<T*>(send), all));
    host_sync(space_);
    comm_->reduce_scatter_sum(hs, hr, n, data_type_of<T>(), Memory::host);
    Kokkos::deep_copy(space_, dev(recv, n), host(hr, n));
    staged_bytes_ += (n + all) * sizeof(T);
  }

 private:
  template <class T>
  using Dev = Kokkos::View<T*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  template <class T>
  using Host = Kokkos::View<T*, kc::StagingSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  template <class T>
  static Dev<T> dev(T* p, std::size_t n) { return Dev<T>(p, n); }
  template <class T>
  static Host<T> host(T* p, std::size_t n) { return Host<T>(p, n); }

  Memory mem() const { return device ? Memory::device : Memory::host; }
  /// Kernels that produced the send data must be done before a backend that is not ordered on
  /// the execution space's stream reads it. A stream-ordered backend (NCCL) waits for them on
  /// the stream itself: no host synchronisation. (Host execution spaces finish their kernels
  /// before returning, so for them only the count differs.)
  void ready() {
    if (!comm_->stream_ordered()) host_sync(space_);
  }
  template <class T>
  T* reserve(Kokkos::View<char*, kc::StagingSpace>& buf, std::size_t n) {
    const std::size_t bytes = std::max<std::size_t>(1, n * sizeof(T));
    if (buf.extent(0) < bytes)
      buf = Kokkos::View<char*, kc::StagingSpace>(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, "examoe::comm::staging"), bytes);
    return reinterpret_cast<T*>(buf.data());
  }

  Communicator* comm_;
  ExecSpace space_;
  bool always_stage_ = false;
  Kokkos::View<char*, kc::StagingSpace> send_host_, recv_host_;    // the other collectives
  Kokkos::View<char*, kc::StagingSpace> xsend_host_, xrecv_host_;  // the row exchange in flight
  std::vector<int> hsc_, hsd_, hrc_, hrd_, drd_;
  std::function<void()> unstage_;  // a staged exchange's copy back, run by finish
  bool in_flight_ = false;         // started, not finished
  std::size_t staged_bytes_ = 0;
};

}  // namespace examoe::impl
