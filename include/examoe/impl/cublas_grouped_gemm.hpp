// Grouped GEMMs through cuBLAS (cublas{S,D}gemmGroupedBatched): every group its own shape, all
// in ONE call on a CUDA stream. Plain C++ types only, so this interface, its translation unit
// (src/layer/cublas_grouped_gemm.cpp, which needs only the CUDA toolkit) and its device test
// (tests/device/grouped_gemm_check.cpp) build on every CUDA-toolkit machine, with or without a
// CUDA Kokkos; the layer reaches it through impl/grouped_gemm.hpp on CUDA builds.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace examoe::impl::cublas {

/// One GEMM of a group, ROW-MAJOR: C[m][n] = alpha op(A) op(B) + beta C, op(A) [m][k],
/// op(B) [k][n]; lda/ldb/ldc are row strides (elements). Device pointers.
struct GemmProblem {
  int m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int lda = 0;
  const void* B = nullptr;
  int ldb = 0;
  void* C = nullptr;
  int ldc = 0;
};

enum class Precision { f32, f64 };

/// Owns a cuBLAS handle and the pointer arrays cuBLAS reads on the device (a ring of
/// pinned-host/device pairs, so a call never waits for the upload of an earlier one).
class GroupedGemm {
 public:
  GroupedGemm();
  ~GroupedGemm();
  GroupedGemm(const GroupedGemm&) = delete;
  GroupedGemm& operator=(const GroupedGemm&) = delete;

  /// Runs every problem (all with the same transposes, alpha and beta) in one cuBLAS call on
  /// `stream` (a cudaStream_t). Problems with m == 0 or n == 0 are dropped; with k == 0, C is
  /// scaled by beta (cuBLAS's rule). `tf32` lets float GEMMs use TF32 tensor cores. Throws
  /// examoe::Error naming the cuBLAS or CUDA status on failure.
  void run(void* stream, Precision precision, bool trans_a, bool trans_b, double alpha, double beta,
           const std::vector<GemmProblem>& problems, bool tf32 = false);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace examoe::impl::cublas
