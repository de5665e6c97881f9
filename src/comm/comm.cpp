#include <examoe/comm.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/nccl_comm.hpp>
#include <examoe/impl/watchdog.hpp>

#include <climits>
#if defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h>
#endif

namespace examoe {

namespace {
MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case DataType::f32: return MPI_FLOAT;
    case DataType::f64: return MPI_DOUBLE;
    case DataType::i32: return MPI_INT32_T;
    case DataType::i64: return MPI_INT64_T;
    case DataType::bf16: return MPI_UINT16_T;  // moved as bits, never reduced
  }
  return MPI_DATATYPE_NULL;
}

void check(int rc, const char* where) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw Error(std::string("examoe::MpiCommunicator::") + where + ": " + std::string(msg, len));
  }
}
/// One collective: the blocking MPI call `op`, or (watchdog on) its non-blocking form `iop`
/// polled against the deadline.
template <class Blocking, class Start>
void collective(impl::WatchdogChannel& wd, const char* op, const char* iop, Blocking&& blocking,
                Start&& start) {
  if (wd.begin(iop)) {
    MPI_Request req = MPI_REQUEST_NULL;
    check(start(&req), iop);
    check(wd.wait(req), iop);
  } else {
    check(blocking(), op);
  }
}
}  // namespace

std::size_t size_of(DataType t) {
  switch (t) {
    case DataType::f32: return 4;
    case DataType::f64: return 8;
    case DataType::i32: return 4;
    case DataType::i64: return 8;
    case DataType::bf16: return 2;
  }
  return 0;
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool gpu_aware) : gpu_aware_(gpu_aware) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized)
    throw Error("examoe::MpiCommunicator: MPI is not initialized; call MPI_Init first");
  if (comm == MPI_COMM_NULL) throw Error("examoe::MpiCommunicator: communicator is MPI_COMM_NULL");
  check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  wd_ = std::make_unique<impl::WatchdogChannel>(comm_);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  wd_.reset();
  if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

MPI_Datatype MpiCommunicator::row_type(int row_elems, DataType type) {
  if (row_elems == 1) return mpi_type(type);  // single values (the plan's counts): no derived type
  if (row_type_ == MPI_DATATYPE_NULL || row_type_elems_ != row_elems || row_type_base_ != type) {
    if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
    check(MPI_Type_contiguous(row_elems, mpi_type(type), &row_type_), "MPI_Type_contiguous");
    check(MPI_Type_commit(&row_type_), "MPI_Type_commit");
    row_type_elems_ = row_elems;
    row_type_base_ = type;
  }
  return row_type_;
}

void MpiCommunicator::check_memory(Memory mem, const char* where) const {
  if (!accepts(mem))
    throw Error(std::string("examoe::MpiCommunicator::") + where +
                ": device buffers given to an MPI communicator that is not GPU-aware (stage them "
                "through host memory: impl::Collectives does)");
}

void MpiCommunicator::alltoall_int(const int* send, int* recv, int n) {
  collective(
      *wd_, "MPI_Alltoall", "MPI_Ialltoall",
      [&] { return MPI_Alltoall(send, n, MPI_INT, recv, n, MPI_INT, comm_); },
      [&](MPI_Request* r) { return MPI_Ialltoall(send, n, MPI_INT, recv, n, MPI_INT, comm_, r); });
}

void MpiCommunicator::alltoallv_rows(const void* send, const int* send_counts,
                                     const int* send_displs, void* recv, const int* recv_counts,
                                     const int* recv_displs, int row_elems, DataType type,
                                     Memory mem) {
  check_memory(mem, "alltoallv_rows");
  MPI_Datatype t = row_type(row_elems, type);
  collective(
      *wd_, "MPI_Alltoallv", "MPI_Ialltoallv",
      [&] {
        return MPI_Alltoallv(send, send_counts, send_displs, t, recv, recv_counts, recv_displs, t, comm_);
      },
      [&](MPI_Request* r) {
        return MPI_Ialltoallv(send, send_counts, send_displs, t, recv, recv_counts, recv_displs, t, comm_, r);
      });
}

void MpiCommunicator::start_alltoallv_rows(const void* send, const int* send_counts,
                                           const int* send_displs, void* recv, const int* recv_counts,
                                           const int* recv_displs, int row_elems, DataType type,
                                           Memory mem) {
  check_memory(mem, "start_alltoallv_rows");
  if (pending_ != MPI_REQUEST_NULL)
    throw Error("examoe::MpiCommunicator::start_alltoallv_rows: an exchange is already in flight "
                "(finish_alltoallv_rows first)");
  MPI_Datatype t = row_type(row_elems, type);
  pending_watched_ = wd_->begin("MPI_Ialltoallv");
  pending_label_ = impl::CollectiveLabel::current();
  check(MPI_Ialltoallv(send, send_counts, send_displs, t, recv, recv_counts, recv_displs, t, comm_, &pending_),
        "MPI_Ialltoallv");
}

void MpiCommunicator::progress_alltoallv_rows() {
  if (pending_ == MPI_REQUEST_NULL) return;
  int done = 0;
  check(MPI_Test(&pending_, &done, MPI_STATUS_IGNORE), "MPI_Test");
}

void MpiCommunicator::finish_alltoallv_rows() {
  if (pending_ == MPI_REQUEST_NULL) return;  // never started, or progress saw it complete
  if (pending_watched_)
    check(wd_->wait_started(pending_, "MPI_Ialltoallv", pending_label_), "MPI_Ialltoallv");
  else
    check(MPI_Wait(&pending_, MPI_STATUS_IGNORE), "MPI_Ialltoallv");
  pending_ = MPI_REQUEST_NULL;
}

void MpiCommunicator::allreduce_sum(void* buf, std::size_t count, DataType type, Memory mem) {
  check_memory(mem, "allreduce_sum");
  if (type == DataType::bf16) throw Error("examoe::MpiCommunicator::allreduce_sum: bf16 rows are moved, never reduced");
  // Chunk so that no count overflows int.
  const std::size_t chunk = static_cast<std::size_t>(INT_MAX / 2);
  char* p = static_cast<char*>(buf);
  for (std::size_t off = 0; off < count; off += chunk) {
    const int n = static_cast<int>(std::min(chunk, count - off));
    void* b = p + off * size_of(type);
    collective(
        *wd_, "MPI_Allreduce", "MPI_Iallreduce",
        [&] { return MPI_Allreduce(MPI_IN_PLACE, b, n, mpi_type(type), MPI_SUM, comm_); },
        [&](MPI_Request* r) { return MPI_Iallreduce(MPI_IN_PLACE, b, n, mpi_type(type), MPI_SUM, comm_, r); });
  }
}

void MpiCommunicator::allgather(const void* send, void* recv, std::size_t count, DataType type,
                                Memory mem) {
  check_memory(mem, "allgather");
  if (count > static_cast<std::size_t>(INT_MAX))
    throw Error("examoe::MpiCommunicator::allgather: block of " + std::to_string(count) +
                " elements exceeds INT_MAX");
  const int n = static_cast<int>(count);
  collective(
      *wd_, "MPI_Allgather", "MPI_Iallgather",
      [&] { return MPI_Allgather(send, n, mpi_type(type), recv, n, mpi_type(type), comm_); },
      [&](MPI_Request* r) { return MPI_Iallgather(send, n, mpi_type(type), recv, n, mpi_type(type), comm_, r); });
}

void MpiCommunicator::reduce_scatter_sum(const void* send, void* recv, std::size_t count,
                                         DataType type, Memory mem) {
  check_memory(mem, "reduce_scatter_sum");
  if (type == DataType::bf16) throw Error("examoe::MpiCommunicator::reduce_scatter_sum: bf16 rows are moved, never reduced");
  if (count > static_cast<std::size_t>(INT_MAX))
    throw Error("examoe::MpiCommunicator::reduce_scatter_sum: block of " + std::to_string(count) +
                " elements exceeds INT_MAX");
  const int n = static_cast<int>(count);
  collective(
      *wd_, "MPI_Reduce_scatter_block", "MPI_Ireduce_scatter_block",
      [&] { return MPI_Reduce_scatter_block(send, recv, n, mpi_type(type), MPI_SUM, comm_); },
      [&](MPI_Request* r) {
        return MPI_Ireduce_scatter_block(send, recv, n, mpi_type(type), MPI_SUM, comm_, r);
      });
}

std::string MpiCommunicator::first_error(const std::string& local_error) {
  int bad = local_error.empty() ? size_ : rank_;
  collective(
      *wd_, "MPI_Allreduce", "MPI_Iallreduce",
      [&] { return MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MIN, comm_); },
      [&](MPI_Request* r) { return MPI_Iallreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MIN, comm_, r); });
  if (bad == size_) return {};
  std::string msg = rank_ == bad ? local_error : std::string();
  impl::broadcast_string(*this, msg, bad);
  if (size_ > 1) msg += " [reported by rank " + std::to_string(bad) + "]";
  return msg;
}

void throw_if_any(Communicator& comm, const std::string& local_error) {
  std::string msg = comm.first_error(local_error);
  if (!msg.empty()) throw Error(msg);
}

void MpiCommunicator::broadcast(void* buf, std::size_t bytes, int root) {
  const int n = static_cast<int>(bytes);
  collective(
      *wd_, "MPI_Bcast", "MPI_Ibcast", [&] { return MPI_Bcast(buf, n, MPI_BYTE, root, comm_); },
      [&](MPI_Request* r) { return MPI_Ibcast(buf, n, MPI_BYTE, root, comm_, r); });
}

long long MpiCommunicator::exscan_sum(long long v) {
  long long out = 0;
  collective(
      *wd_, "MPI_Exscan", "MPI_Iexscan",
      [&] { return MPI_Exscan(&v, &out, 1, MPI_LONG_LONG, MPI_SUM, comm_); },
      [&](MPI_Request* r) { return MPI_Iexscan(&v, &out, 1, MPI_LONG_LONG, MPI_SUM, comm_, r); });
  return rank_ == 0 ? 0 : out;
}

void MpiCommunicator::barrier() {
  collective(
      *wd_, "MPI_Barrier", "MPI_Ibarrier", [&] { return MPI_Barrier(comm_); },
      [&](MPI_Request* r) { return MPI_Ibarrier(comm_, r); });
}

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm);
}

bool have_nccl() { return EXAMOE_ENABLE_NCCL != 0; }

bool mpi_reports_cuda_support() {
#if defined(MPICH_NUMVERSION) && MPICH_NUMVERSION >= 40000000
  return MPIX_Query_cuda_support() != 0;
#elif defined(OPEN_MPI) && OPEN_MPI && defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  return MPIX_Query_cuda_support() != 0;
#else
  return false;
#endif
}

std::string to_string(CommBackend b) {
  switch (b) {
    case CommBackend::mpi: return "mpi";
    case CommBackend::nccl: return "nccl";
    case CommBackend::automatic: break;
  }
  return "auto";
}

std::string to_string(GpuAwareMpi g) {
  switch (g) {
    case GpuAwareMpi::yes: return "true";
    case GpuAwareMpi::no: return "false";
    case GpuAwareMpi::automatic: break;
  }
  return "auto";
}

CommBackend comm_backend_from_string(const std::string& s) {
  for (CommBackend b : {CommBackend::automatic, CommBackend::mpi, CommBackend::nccl})
    if (s == to_string(b)) return b;
  throw Error("examoe::comm_backend_from_string: unknown communication backend '" + clip_for_message(s) +
              "' (expected auto, mpi or nccl)");
}

GpuAwareMpi gpu_aware_mpi_from_string(const std::string& s) {
  for (GpuAwareMpi g : {GpuAwareMpi::automatic, GpuAwareMpi::yes, GpuAwareMpi::no})
    if (s == to_string(g)) return g;
  throw Error("examoe::gpu_aware_mpi_from_string: gpu_aware_mpi must be auto, true or false, not '" +
              clip_for_message(s) + "'");
}

std::string resolve_backend(const CommOptions& opts, bool device_data) {
  switch (opts.backend) {
    case CommBackend::mpi: return "mpi";
    case CommBackend::automatic: return have_nccl() && device_data ? "nccl" : "mpi";
    case CommBackend::nccl: break;
  }
  if (!have_nccl())
    throw Error("examoe: the nccl backend was requested but this ExaMoE was built without NCCL "
                "(configure with -DExaMoE_ENABLE_NCCL=ON and a CUDA-enabled Kokkos)");
  if (!device_data)
    throw Error("examoe: the nccl backend needs data in GPU memory, but this build's Kokkos "
                "execution space keeps it in host memory (use --parallel.comm mpi)");
  return "nccl";
}

namespace {
bool resolve_gpu_aware(GpuAwareMpi g) {
  if (g == GpuAwareMpi::automatic) return mpi_reports_cuda_support();
  return g == GpuAwareMpi::yes;
}
}  // namespace

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, const CommOptions& opts,
                                                bool device_data, void* stream) {
  // Resolve locally, then agree, so a bad option (or one that differs between ranks) is an
  // error on every rank before any backend is built.
  auto mpi = std::make_unique<MpiCommunicator>(comm);
  const std::string backend = impl::agree(*mpi, [&] { return resolve_backend(opts, device_data); });
  const bool gpu_aware = device_data && resolve_gpu_aware(opts.gpu_aware_mpi);
  std::string err;
  // Every rank must pick the same backend (NCCL and MPI ranks would wait on each other).
  const int mine = backend == "nccl" ? 1 : 0;
  int sum = 0;
  {
    std::int32_t v = mine;
    mpi->allreduce_sum(&v, 1, DataType::i32);
    sum = v;
  }
  if (sum != 0 && sum != mpi->size())
    err = "examoe: ranks disagree on the communication backend (" + std::to_string(sum) + " of " +
          std::to_string(mpi->size()) + " chose nccl; this rank chose " + backend + ")";
  throw_if_any(*mpi, err);
  if (backend == "nccl") return impl::make_nccl_communicator(comm, stream);
  if (!gpu_aware) return mpi;
  return std::make_unique<MpiCommunicator>(comm, true);
}

}  // namespace examoe

#if !EXAMOE_ENABLE_NCCL
namespace examoe::impl {
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm, void*) {
  throw Error("examoe: this ExaMoE was built without NCCL (ExaMoE_ENABLE_NCCL=OFF)");
}
}  // namespace examoe::impl
#endif
