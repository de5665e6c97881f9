#pragma once
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>

namespace examoe {

namespace impl {
class WatchdogChannel;  // impl/watchdog.hpp
}

/// Element types the collectives move.
enum class DataType { f32, f64, i32, i64 };

template <class T>
constexpr DataType data_type_of();
template <>
constexpr DataType data_type_of<float>() { return DataType::f32; }
template <>
constexpr DataType data_type_of<double>() { return DataType::f64; }
template <>
constexpr DataType data_type_of<std::int32_t>() { return DataType::i32; }
template <>
constexpr DataType data_type_of<std::int64_t>() { return DataType::i64; }

std::size_t size_of(DataType t);

/// The collectives ExaMoE needs, behind one interface (MPI today; NCCL is the planned second
/// backend). Buffers are pointers into memory the backend can read: host memory for MPI
/// (GPU memory when MPI is GPU-aware). Counts of the row-wise all-to-all are in rows of
/// `row_elems` elements, so no count overflows int for any realistic row width.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  /// Every rank sends `n` ints to every rank: send[r*n .. r*n+n) goes to rank r.
  virtual void alltoall_int(const int* send, int* recv, int n) = 0;
  /// Variable-size all-to-all of rows; counts and displacements in rows.
  virtual void alltoallv_rows(const void* send, const int* send_counts, const int* send_displs,
                              void* recv, const int* recv_counts, const int* recv_displs,
                              int row_elems, DataType type) = 0;
  /// In-place sum over all ranks.
  virtual void allreduce_sum(void* buf, std::size_t count, DataType type) = 0;
  /// Every rank contributes `count` elements; recv holds size()*count, rank r's at r*count.
  virtual void allgather(const void* send, void* recv, std::size_t count, DataType type) = 0;
  /// Sums size()*count elements of `send` over ranks; rank r receives block r (count elements).
  virtual void reduce_scatter_sum(const void* send, void* recv, std::size_t count,
                                  DataType type) = 0;
  /// Logical AND of `ok` over all ranks (used to agree on errors before throwing).
  virtual bool all_ok(bool ok) = 0;
  /// Collective error agreement: returns "" when `local_error` is empty on every rank,
  /// otherwise the message of the lowest rank that reported one, prefixed with that rank,
  /// identical on every rank. Callers then throw on every rank, so no rank is left waiting.
  virtual std::string first_error(const std::string& local_error) = 0;
  virtual void broadcast(void* buf, std::size_t bytes, int root) = 0;
  /// Exclusive prefix sum of one value over ranks (rank 0 gets 0).
  virtual long long exscan_sum(long long v) = 0;
  virtual void barrier() = 0;

  /// The MPI communicator this one was built on (duplicated, owned by this object).
  virtual MPI_Comm mpi_comm() const = 0;
};

/// MPI backend. Duplicates the caller's communicator (never assumes MPI_COMM_WORLD) and frees
/// the duplicate on destruction. With a watchdog deadline set (impl/watchdog.hpp,
/// parallel.watchdog_seconds) every collective runs as its non-blocking form polled against
/// the deadline; a collective that misses it is reported and the job aborted.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  void alltoall_int(const int* send, int* recv, int n) override;
  void alltoallv_rows(const void* send, const int* send_counts, const int* send_displs, void* recv,
                      const int* recv_counts, const int* recv_displs, int row_elems,
                      DataType type) override;
  void allreduce_sum(void* buf, std::size_t count, DataType type) override;
  void allgather(const void* send, void* recv, std::size_t count, DataType type) override;
  void reduce_scatter_sum(const void* send, void* recv, std::size_t count, DataType type) override;
  bool all_ok(bool ok) override;
  std::string first_error(const std::string& local_error) override;
  void broadcast(void* buf, std::size_t bytes, int root) override;
  long long exscan_sum(long long v) override;
  void barrier() override;
  MPI_Comm mpi_comm() const override { return comm_; }

 private:
  MPI_Datatype row_type(int row_elems, DataType type);
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  // Cached contiguous row datatype (committed once per row width).
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
  int row_type_elems_ = 0;
  DataType row_type_base_ = DataType::f32;
  std::unique_ptr<impl::WatchdogChannel> wd_;  // call counter + watchdog messages
};

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);

/// Throws examoe::Error on every rank when any rank passes a non-empty message.
void throw_if_any(Communicator& comm, const std::string& local_error);

}  // namespace examoe
