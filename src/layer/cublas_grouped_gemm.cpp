// cuBLAS grouped GEMMs: see impl/cublas_grouped_gemm.hpp. Row-major problems become cuBLAS's
// column-major ones by the usual identity C^T = op(B)^T op(A)^T: the operands swap, m and n
// swap, the transposes stay.
#include <examoe/error.hpp>
#include <examoe/impl/cublas_grouped_gemm.hpp>
#include <examoe/impl/host_sync.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

namespace examoe::impl::cublas {
namespace {

constexpr int kRing = 8;  // uploads in flight before a slot is reused

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(std::string("examoe::impl::cublas::GroupedGemm: ") + what + ": " + cudaGetErrorString(e));
}
void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("examoe::impl::cublas::GroupedGemm: ") + what + ": " + cublasGetStatusString(s));
}

/// The pointer arrays of one call: A, B, C pointers, pinned on the host and on the device.
struct Slot {
  void** host = nullptr;
  void** device = nullptr;
  std::size_t capacity = 0;  // problems
  cudaEvent_t uploaded = nullptr;
};

}  // namespace

struct GroupedGemm::State {
  cublasHandle_t handle = nullptr;
  Slot ring[kRing];
  int next = 0;
  // Per-problem host arrays cuBLAS takes by value (read before the call returns).
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha_f, beta_f;
  std::vector<double> alpha_d, beta_d;

  Slot& slot_for(std::size_t problems) {
    Slot& s = ring[next];
    next = (next + 1) % kRing;
    if (s.uploaded != nullptr && cudaEventQuery(s.uploaded) == cudaErrorNotReady) {
      count_host_sync();  // the slot's last upload is still queued: wait for it
      check_cuda(cudaEventSynchronize(s.uploaded), "cudaEventSynchronize");
    }
    if (s.capacity < problems) {
      if (s.host) cudaFreeHost(s.host);
      if (s.device) cudaFree(s.device);
      s.capacity = std::max<std::size_t>(problems, 2 * s.capacity);
      check_cuda(cudaMallocHost(reinterpret_cast<void**>(&s.host), 3 * s.capacity * sizeof(void*)), "cudaMallocHost");
      check_cuda(cudaMalloc(reinterpret_cast<void**>(&s.device), 3 * s.capacity * sizeof(void*)), "cudaMalloc");
    }
    if (s.uploaded == nullptr) check_cuda(cudaEventCreateWithFlags(&s.uploaded, cudaEventDisableTiming), "cudaEventCreate");
    return s;
  }
};

GroupedGemm::GroupedGemm() : state_(std::make_unique<State>()) {
  check_cublas(cublasCreate(&state_->handle), "cublasCreate");
}

GroupedGemm::~GroupedGemm() {
  for (Slot& s : state_->ring) {
    if (s.uploaded) {
      cudaEventSynchronize(s.uploaded);
      cudaEventDestroy(s.uploaded);
    }
    if (s.host) cudaFreeHost(s.host);
    if (s.device) cudaFree(s.device);
  }
  if (state_->handle) cublasDestroy(state_->handle);
}

void GroupedGemm::run(void* stream, Precision precision, bool trans_a, bool trans_b, double alpha,
                      double beta, const std::vector<GemmProblem>& problems, bool tf32) {
  State& st = *state_;
  std::vector<const GemmProblem*> live;
  for (const GemmProblem& p : problems)
    if (p.m > 0 && p.n > 0) live.push_back(&p);
  if (live.empty()) return;
  const int G = static_cast<int>(live.size());
  Slot& slot = st.slot_for(live.size());
  // Column-major view: C^T[n][m] = op(B)^T op(A)^T, so cuBLAS's "A" is our B and vice versa.
  const cublasOperation_t opa = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  st.ta.assign(G, opa);
  st.tb.assign(G, opb);
  st.m.resize(G), st.n.resize(G), st.k.resize(G), st.lda.resize(G), st.ldb.resize(G), st.ldc.resize(G);
  st.group_size.assign(G, 1);
  for (int g = 0; g < G; ++g) {
    const GemmProblem& p = *live[g];
    st.m[g] = p.n;
    st.n[g] = p.m;
    st.k[g] = p.k;
    st.lda[g] = p.ldb;
    st.ldb[g] = p.lda;
    st.ldc[g] = p.ldc;
    slot.host[g] = const_cast<void*>(p.B);
    slot.host[G + g] = const_cast<void*>(p.A);
    slot.host[2 * G + g] = p.C;
  }
  auto s = static_cast<cudaStream_t>(stream);
  check_cuda(cudaMemcpyAsync(slot.device, slot.host, 3 * G * sizeof(void*), cudaMemcpyHostToDevice, s),
             "cudaMemcpyAsync of the pointer arrays");
  check_cuda(cudaEventRecord(slot.uploaded, s), "cudaEventRecord");
  check_cublas(cublasSetStream(st.handle, s), "cublasSetStream");
  check_cublas(cublasSetMathMode(st.handle, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
               "cublasSetMathMode");
  if (precision == Precision::f32) {
    st.alpha_f.assign(G, static_cast<float>(alpha));
    st.beta_f.assign(G, static_cast<float>(beta));
    check_cublas(cublasSgemmGroupedBatched(
                     st.handle, st.ta.data(), st.tb.data(), st.m.data(), st.n.data(), st.k.data(), st.alpha_f.data(),
                     reinterpret_cast<const float* const*>(slot.device), st.lda.data(),
                     reinterpret_cast<const float* const*>(slot.device + G), st.ldb.data(), st.beta_f.data(),
                     reinterpret_cast<float* const*>(slot.device + 2 * G), st.ldc.data(), G, st.group_size.data()),
                 "cublasSgemmGroupedBatched");
  } else {
    st.alpha_d.assign(G, alpha);
    st.beta_d.assign(G, beta);
    check_cublas(cublasDgemmGroupedBatched(
                     st.handle, st.ta.data(), st.tb.data(), st.m.data(), st.n.data(), st.k.data(), st.alpha_d.data(),
                     reinterpret_cast<const double* const*>(slot.device), st.lda.data(),
                     reinterpret_cast<const double* const*>(slot.device + G), st.ldb.data(), st.beta_d.data(),
                     reinterpret_cast<double* const*>(slot.device + 2 * G), st.ldc.data(), G, st.group_size.data()),
                 "cublasDgemmGroupedBatched");
  }
}

}  // namespace examoe::impl::cublas
