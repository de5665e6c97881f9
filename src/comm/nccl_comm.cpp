// The NCCL backend: data collectives on GPU memory, enqueued on the stream of the caller's
// Kokkos execution-space instance; control collectives and host data over MPI.
// Compiled only with ExaMoE_ENABLE_NCCL (needs nccl.h and the CUDA runtime, not nvcc).
#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/nccl_comm.hpp>
#include <examoe/impl/p2p_schedule.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

namespace examoe::impl {
namespace {

ncclDataType_t nccl_type(DataType t) {
  switch (t) {
    case DataType::f32: return ncclFloat32;
    case DataType::f64: return ncclFloat64;
    case DataType::i32: return ncclInt32;
    case DataType::i64: return ncclInt64;
    case DataType::bf16: return ncclBfloat16;
  }
  return ncclFloat32;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm comm, void* stream)
      : mpi_(comm), stream_(static_cast<cudaStream_t>(stream)) {
    // Every rank must have a GPU before anyone enters ncclCommInitRank (which would otherwise
    // wait forever for the rank that has none).
    std::string err;
    int ndev = 0;
    const cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev == 0)
      err = std::string("examoe::NcclCommunicator: no usable GPU on rank ") +
            std::to_string(mpi_.rank()) + " (cudaGetDeviceCount: " +
            (ce != cudaSuccess ? cudaGetErrorString(ce) : "0 devices") + ")";
    ncclUniqueId id{};
    if (err.empty() && mpi_.rank() == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess)
        err = std::string("examoe::NcclCommunicator: ncclGetUniqueId: ") + ncclGetErrorString(r);
    }
    throw_if_any(mpi_, err);
    mpi_.broadcast(&id, sizeof id, 0);
    const ncclResult_t r = ncclCommInitRank(&comm_, mpi_.size(), id, mpi_.rank());
    if (r != ncclSuccess) {
      err = std::string("examoe::NcclCommunicator: ncclCommInitRank: ") + ncclGetErrorString(r);
      comm_ = nullptr;
    }
    throw_if_any(mpi_, err);
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (xstream_ != nullptr) cudaStreamDestroy(xstream_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return mpi_.rank(); }
  int size() const override { return mpi_.size(); }
  std::string backend() const override { return "nccl"; }
  bool accepts(Memory) const override { return true; }
  bool stream_ordered() const override { return true; }

  void alltoall_int(const int* send, int* recv, int n) override { mpi_.alltoall_int(send, recv, n); }

  void alltoallv_rows(const void* send, const int* send_counts, const int* send_displs, void* recv,
                      const int* recv_counts, const int* recv_displs, int row_elems, DataType type,
                      Memory mem) override {
    if (mem == Memory::host) {
      mpi_.alltoallv_rows(send, send_counts, send_displs, recv, recv_counts, recv_displs,
                          row_elems, type);
      return;
    }
    post_alltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, row_elems, type, stream_);
  }

  /// The exchange on a second stream: it starts when the caller's stream reaches this point
  /// (event `ready_`), and the caller's stream waits for its end (event `done_`) in finish;
  /// the host never waits. Host data: MPI's non-blocking form.
  void start_alltoallv_rows(const void* send, const int* send_counts, const int* send_displs, void* recv,
                            const int* recv_counts, const int* recv_displs, int row_elems, DataType type,
                            Memory mem) override {
    if (mem == Memory::host) {
      mpi_.start_alltoallv_rows(send, send_counts, send_displs, recv, recv_counts, recv_displs, row_elems, type);
      host_pending_ = true;
      return;
    }
    if (device_pending_)
      throw Error("examoe::NcclCommunicator::start_alltoallv_rows: an exchange is already in flight "
                  "(finish_alltoallv_rows first)");
    make_exchange_stream();
    cuda_check(cudaEventRecord(ready_, stream_), "cudaEventRecord");
    cuda_check(cudaStreamWaitEvent(xstream_, ready_, 0), "cudaStreamWaitEvent");
    post_alltoallv(send, send_counts, send_displs, recv, recv_counts, recv_displs, row_elems, type, xstream_);
    cuda_check(cudaEventRecord(done_, xstream_), "cudaEventRecord");
    device_pending_ = true;
  }
  void progress_alltoallv_rows() override {
    if (host_pending_) mpi_.progress_alltoallv_rows();
  }
  void finish_alltoallv_rows() override {
    if (host_pending_) {
      host_pending_ = false;
      mpi_.finish_alltoallv_rows();
    }
    if (device_pending_) {
      device_pending_ = false;
      cuda_check(cudaStreamWaitEvent(stream_, done_, 0), "cudaStreamWaitEvent");
    }
  }

  /// One grouped set of NCCL sends and receives (and device copies) on `stream`.
  void post_alltoallv(const void* send, const int* send_counts, const int* send_displs, void* recv,
                      const int* recv_counts, const int* recv_displs, int row_elems, DataType type,
                      cudaStream_t stream) {
    const auto ops = alltoallv_schedule(rank(), size(), send_counts, send_displs, recv_counts,
                                        recv_displs, row_elems);
    const std::size_t es = size_of(type);
    const char* s = static_cast<const char*>(send);
    char* d = static_cast<char*>(recv);
    check(ncclGroupStart(), "ncclGroupStart");
    for (const P2POp& op : ops) {
      switch (op.kind) {
        case P2POp::copy:
          if (cudaMemcpyAsync(d + op.dst_offset * es, s + op.offset * es, op.count * es,
                              cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
            throw Error("examoe::NcclCommunicator::alltoallv_rows: cudaMemcpyAsync failed");
          break;
        case P2POp::send:
          check(ncclSend(s + op.offset * es, op.count, nccl_type(type), op.peer, comm_, stream),
                "ncclSend");
          break;
        case P2POp::recv:
          check(ncclRecv(d + op.offset * es, op.count, nccl_type(type), op.peer, comm_, stream),
                "ncclRecv");
          break;
      }
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  void allreduce_sum(void* buf, std::size_t count, DataType type, Memory mem) override {
    if (mem == Memory::host) return mpi_.allreduce_sum(buf, count, type);
    check(ncclAllReduce(buf, buf, count, nccl_type(type), ncclSum, comm_, stream_),
          "ncclAllReduce");
  }
  void allgather(const void* send, void* recv, std::size_t count, DataType type,
                 Memory mem) override {
    if (mem == Memory::host) return mpi_.allgather(send, recv, count, type);
    check(ncclAllGather(send, recv, count, nccl_type(type), comm_, stream_), "ncclAllGather");
  }
  void reduce_scatter_sum(const void* send, void* recv, std::size_t count, DataType type,
                          Memory mem) override {
    if (mem == Memory::host) return mpi_.reduce_scatter_sum(send, recv, count, type);
    check(ncclReduceScatter(send, recv, count, nccl_type(type), ncclSum, comm_, stream_),
          "ncclReduceScatter");
  }

  std::string first_error(const std::string& e) override { return mpi_.first_error(e); }
  void broadcast(void* buf, std::size_t bytes, int root) override { mpi_.broadcast(buf, bytes, root); }
  long long exscan_sum(long long v) override { return mpi_.exscan_sum(v); }
  void barrier() override { mpi_.barrier(); }
  MPI_Comm mpi_comm() const override { return mpi_.mpi_comm(); }

 private:
  void check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess) return;
    std::string msg = std::string("examoe::NcclCommunicator: ") + what + ": " + ncclGetErrorString(r);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    if (const char* last = ncclGetLastError(comm_); last != nullptr && *last != '\0')
      msg += std::string(" (") + last + ")";
#endif
    throw Error(msg);
  }

  static void cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
      throw Error(std::string("examoe::NcclCommunicator: ") + what + ": " + cudaGetErrorString(e));
  }
  /// The exchange stream and its two events, made on first use.
  void make_exchange_stream() {
    if (xstream_ != nullptr) return;
    cuda_check(cudaStreamCreateWithFlags(&xstream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    cuda_check(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    cuda_check(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }

  MpiCommunicator mpi_;
  cudaStream_t stream_ = nullptr;   // the caller's execution-space instance
  cudaStream_t xstream_ = nullptr;  // the started exchanges
  cudaEvent_t ready_ = nullptr, done_ = nullptr;
  bool host_pending_ = false, device_pending_ = false;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, void* stream) {
  return std::make_unique<NcclCommunicator>(comm, stream);
}

}  // namespace examoe::impl
