// NCCL backend on real GPUs: every data collective with device buffers against the same
// collective done by MPI on host copies. Needs one GPU per rank; without a GPU it says so and
// exits 77, which ctest reports as skipped (never as passed).
//   mpiexec -n 2 ./tests/nccl_check
#include <examoe/comm.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>

#include <cuda_runtime_api.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;
void expect(bool ok, const std::string& what, int rank) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "nccl_check: rank %d: FAILED %s\n", rank, what.c_str());
  }
}

struct DeviceBuffer {
  double* p = nullptr;
  explicit DeviceBuffer(std::size_t n) {
    if (cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(1, n) * sizeof(double)) != cudaSuccess)
      throw examoe::Error("cudaMalloc failed");
  }
  ~DeviceBuffer() { cudaFree(p); }
  void put(const std::vector<double>& v) { cudaMemcpy(p, v.data(), v.size() * sizeof(double), cudaMemcpyHostToDevice); }
  std::vector<double> get(std::size_t n) const {
    std::vector<double> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(double), cudaMemcpyDeviceToHost);
    return v;
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  int ndev = 0;
  const cudaError_t ce = cudaGetDeviceCount(&ndev);
  int have = ce == cudaSuccess && ndev > 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &have, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  if (!have) {
    if (rank == 0)
      std::printf("nccl_check: SKIPPED: needs a CUDA GPU on every rank (cudaGetDeviceCount: %s)\n",
                  ce == cudaSuccess ? "0 devices" : cudaGetErrorString(ce));
    MPI_Finalize();
    return 77;
  }
  int rc = 0;
  try {
    cudaSetDevice(examoe::device_for_rank(MPI_COMM_WORLD, ndev));
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    {
      examoe::CommOptions o;
      o.backend = examoe::CommBackend::nccl;
      auto nccl = examoe::make_communicator(MPI_COMM_WORLD, o, true, stream);
      auto mpi = examoe::make_mpi_communicator(MPI_COMM_WORLD);
      expect(nccl->backend() == "nccl" && nccl->stream_ordered(), "backend", rank);
      // All-to-all: rank s sends (s + 2 r) % 5 rows of w to rank r (self included).
      const int w = 33;
      std::vector<int> sc(P), sd(P), rc(P), rd(P);
      int ns = 0, nr = 0;
      for (int r = 0; r < P; ++r) {
        sc[r] = (rank + 2 * r) % 5; sd[r] = ns; ns += sc[r];
        rc[r] = (r + 2 * rank) % 5; rd[r] = nr; nr += rc[r];
      }
      std::vector<double> sv(static_cast<std::size_t>(ns) * w), want(static_cast<std::size_t>(nr) * w);
      for (std::size_t i = 0; i < sv.size(); ++i) sv[i] = 1e4 * rank + static_cast<double>(i);
      mpi->alltoallv_rows(sv.data(), sc.data(), sd.data(), want.data(), rc.data(), rd.data(), w,
                          examoe::DataType::f64);
      DeviceBuffer ds(sv.size()), dr(want.size());
      ds.put(sv);
      nccl->alltoallv_rows(ds.p, sc.data(), sd.data(), dr.p, rc.data(), rd.data(), w,
                           examoe::DataType::f64, examoe::Memory::device);
      cudaStreamSynchronize(stream);
      expect(dr.get(want.size()) == want, "alltoallv_rows", rank);
      // All-reduce, all-gather, reduce-scatter: 1000 elements per block.
      const std::size_t n = 1000;
      std::vector<double> a(n * P);
      for (std::size_t i = 0; i < a.size(); ++i) a[i] = (rank + 1) * 0.5 + static_cast<double>(i % 97);
      std::vector<double> ar = a, ag(n * P * P), rs(n);
      mpi->allreduce_sum(ar.data(), ar.size(), examoe::DataType::f64);
      mpi->allgather(a.data(), ag.data(), n * P, examoe::DataType::f64);
      mpi->reduce_scatter_sum(a.data(), rs.data(), n, examoe::DataType::f64);
      DeviceBuffer da(a.size()), dg(ag.size()), dsr(n);
      da.put(a);
      nccl->allgather(da.p, dg.p, n * P, examoe::DataType::f64, examoe::Memory::device);
      nccl->reduce_scatter_sum(da.p, dsr.p, n, examoe::DataType::f64, examoe::Memory::device);
      nccl->allreduce_sum(da.p, a.size(), examoe::DataType::f64, examoe::Memory::device);
      cudaStreamSynchronize(stream);
      expect(dg.get(ag.size()) == ag, "allgather", rank);
      expect(dsr.get(n) == rs, "reduce_scatter_sum", rank);  // sums of small integers and halves: exact
      expect(da.get(a.size()) == ar, "allreduce_sum", rank);
      // Host memory through the NCCL communicator goes over MPI.
      std::vector<double> h(3, rank + 1.0);
      nccl->allreduce_sum(h.data(), h.size(), examoe::DataType::f64);
      expect(h[0] == P * (P + 1) / 2.0, "host allreduce_sum", rank);
    }
    cudaStreamDestroy(stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_check: rank %d: %s\n", rank, e.what());
    ++failures;
  }
  MPI_Allreduce(MPI_IN_PLACE, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("nccl_check: %d ranks, %s\n", P, failures == 0 ? "PASS" : "FAIL");
  rc = failures == 0 ? 0 : 1;
  MPI_Finalize();
  return rc;
}
