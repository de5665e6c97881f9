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
/// bf16: rows moved as bfloat16 bits (impl/bf16.hpp); moved, never reduced.
enum class DataType { f32, f64, i32, i64, bf16 };

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

/// Where the buffers of a data collective live.
enum class Memory { host, device };

/// The collectives ExaMoE needs, behind one interface, with two implementations: MPI
/// (`MpiCommunicator`) and NCCL (`make_communicator` with CommBackend::nccl, when built with
/// ExaMoE_ENABLE_NCCL).
///
/// Two tiers:
/// - the *data collectives* (alltoallv_rows, allreduce_sum, allgather, reduce_scatter_sum) move
///   tensors. Their buffers are in `mem`, which must be a memory the backend `accepts()`: host
///   memory always; device memory for NCCL, and for MPI only when it is GPU-aware. Callers with
///   Kokkos views use impl::Collectives, which stages device buffers through host mirrors when
///   the backend cannot take them.
/// - the *control collectives* (alltoall_int, first_error, broadcast, exscan_sum,
///   barrier) move a few host values (counts, flags, messages) and always run over MPI on the
///   host, whatever the backend. The dispatch counts are exchanged this way: the plan needs
///   them on the host anyway to size and post the grouped NCCL sends and receives.
///
/// Counts of the row-wise all-to-all are in rows of `row_elems` elements, so no count
/// overflows int for any realistic row width.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// "mpi" or "nccl".
  virtual std::string backend() const = 0;
  /// Whether the data collectives take buffers in `m`.
  virtual bool accepts(Memory m) const { return m == Memory::host; }
  /// True when device-memory collectives are enqueued on the stream of the execution-space
  /// instance the backend was built with (NCCL): kernels before and after them on that instance
  /// are ordered without a fence. False: the caller fences before the call, which returns
  /// complete (MPI).
  virtual bool stream_ordered() const { return false; }

  /// Every rank sends `n` ints to every rank: send[r*n .. r*n+n) goes to rank r. Host memory.
  virtual void alltoall_int(const int* send, int* recv, int n) = 0;
  /// Variable-size all-to-all of rows; counts and displacements in rows.
  virtual void alltoallv_rows(const void* send, const int* send_counts, const int* send_displs,
                              void* recv, const int* recv_counts, const int* recv_displs,
                              int row_elems, DataType type, Memory mem = Memory::host) = 0;
  /// alltoallv_rows split in two, so that local work runs while the rows are in flight:
  /// start returns as soon as the exchange is under way (MPI: MPI_Ialltoallv; NCCL: on the
  /// backend's exchange stream, after an event on the caller's); finish completes it (MPI: the
  /// wait, under the watchdog when it is on; NCCL: the caller's stream waits for an event, the
  /// host does not). Between the two, `send` must not be written nor `recv` read, and the
  /// buffers and counts must stay alive. One exchange in flight per communicator; other
  /// collectives may run meanwhile. The defaults make the blocking call in start.
  virtual void start_alltoallv_rows(const void* send, const int* send_counts, const int* send_displs,
                                    void* recv, const int* recv_counts, const int* recv_displs,
                                    int row_elems, DataType type, Memory mem = Memory::host) {
    alltoallv_rows(send, send_counts, send_displs, recv, recv_counts, recv_displs, row_elems, type, mem);
  }
  /// Lets a started exchange advance (MPI_Test: MPI moves data only inside MPI calls); callers
  /// call it between pieces of local work. No-op when nothing is in flight.
  virtual void progress_alltoallv_rows() {}
  /// Completes the started exchange (no-op when nothing is in flight).
  virtual void finish_alltoallv_rows() {}
  /// In-place sum over all ranks.
  virtual void allreduce_sum(void* buf, std::size_t count, DataType type,
                             Memory mem = Memory::host) = 0;
  /// Every rank contributes `count` elements; recv holds size()*count, rank r's at r*count.
  virtual void allgather(const void* send, void* recv, std::size_t count, DataType type,
                         Memory mem = Memory::host) = 0;
  /// Sums size()*count elements of `send` over ranks; rank r receives block r (count elements).
  virtual void reduce_scatter_sum(const void* send, void* recv, std::size_t count, DataType type,
                                  Memory mem = Memory::host) = 0;
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
/// the duplicate on destruction. With `gpu_aware` the data collectives also take device
/// memory (pointers go straight to MPI). With a watchdog deadline set (impl/watchdog.hpp,
/// parallel.watchdog_seconds) every collective runs as its non-blocking form polled against
/// the deadline; a collective that misses it is reported and the job aborted.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool gpu_aware = false);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  bool accepts(Memory m) const override { return m == Memory::host || gpu_aware_; }
  void alltoall_int(const int* send, int* recv, int n) override;
  void alltoallv_rows(const void* send, const int* send_counts, const int* send_displs, void* recv,
                      const int* recv_counts, const int* recv_displs, int row_elems,
                      DataType type, Memory mem = Memory::host) override;
  void start_alltoallv_rows(const void* send, const int* send_counts, const int* send_displs, void* recv,
                            const int* recv_counts, const int* recv_displs, int row_elems, DataType type,
                            Memory mem = Memory::host) override;
  void progress_alltoallv_rows() override;
  void finish_alltoallv_rows() override;
  void allreduce_sum(void* buf, std::size_t count, DataType type,
                     Memory mem = Memory::host) override;
  void allgather(const void* send, void* recv, std::size_t count, DataType type,
                 Memory mem = Memory::host) override;
  void reduce_scatter_sum(const void* send, void* recv, std::size_t count, DataType type,
                          Memory mem = Memory::host) override;
  std::string first_error(const std::string& local_error) override;
  void broadcast(void* buf, std::size_t bytes, int root) override;
  long long exscan_sum(long long v) override;
  void barrier() override;
  MPI_Comm mpi_comm() const override { return comm_; }

 private:
  MPI_Datatype row_type(int row_elems, DataType type);
  void check_memory(Memory mem, const char* where) const;
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool gpu_aware_ = false;
  int rank_ = 0, size_ = 1;
  // Cached contiguous row datatype (committed once per row width).
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
  int row_type_elems_ = 0;
  DataType row_type_base_ = DataType::f32;
  std::unique_ptr<impl::WatchdogChannel> wd_;  // call counter + watchdog messages
  // The exchange started and not finished: its request, and what the watchdog reports for it.
  MPI_Request pending_ = MPI_REQUEST_NULL;
  bool pending_watched_ = false;
  const char* pending_label_ = nullptr;
};

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);

/// The collectives backend (`parallel.comm`). automatic: NCCL when this build has it and the
/// data lives in device memory, MPI otherwise.
enum class CommBackend { automatic, mpi, nccl };
/// Whether MPI may be handed device buffers (`parallel.gpu_aware_mpi`). automatic asks the MPI
/// library (MPIX_Query_cuda_support, MPICH and Open MPI); no: device buffers are staged through
/// host memory (only the rows that leave the rank).
enum class GpuAwareMpi { automatic, yes, no };

/// The config spellings: "auto", "mpi", "nccl".
std::string to_string(CommBackend b);
/// The config spellings: "auto", "true", "false".
std::string to_string(GpuAwareMpi g);
/// Parses a config spelling; throws examoe::Error (not collective) for any other text.
CommBackend comm_backend_from_string(const std::string& s);
GpuAwareMpi gpu_aware_mpi_from_string(const std::string& s);

/// How to build a communicator (`parallel.comm`, `parallel.gpu_aware_mpi`): one options struct,
/// parsed once where the config is read.
struct CommOptions {
  CommBackend backend = CommBackend::automatic;
  GpuAwareMpi gpu_aware_mpi = GpuAwareMpi::automatic;
};

/// Whether this build of ExaMoE has the NCCL backend (ExaMoE_ENABLE_NCCL).
bool have_nccl();
/// Whether the MPI library reports CUDA-aware support at run time (false when it cannot tell).
bool mpi_reports_cuda_support();
/// The backend `opts.backend` resolves to ("mpi" or "nccl") for data in device memory or not.
/// Throws examoe::Error (not collective) for nccl without NCCL or without device data.
std::string resolve_backend(const CommOptions& opts, bool device_data);

/// Builds a communicator over a duplicate of `comm`. `stream` is the native stream of the
/// execution-space instance the device collectives must be ordered on (cudaStream_t for CUDA,
/// nullptr elsewhere); `device_data` tells whether the caller's views live in device memory.
/// Collective over `comm`: errors (nccl where it cannot run, ranks that chose different
/// backends, NCCL init failure) are thrown on every rank.
std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, const CommOptions& opts,
                                                bool device_data, void* stream = nullptr);

/// Throws examoe::Error on every rank when any rank passes a non-empty message.
void throw_if_any(Communicator& comm, const std::string& local_error);

}  // namespace examoe
