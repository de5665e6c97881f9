// cuBLAS grouped GEMMs (impl/cublas_grouped_gemm.hpp) on a real GPU against a host reference:
// groups of ragged row counts (zero included), every transpose the experts use, float (with and
// without TF32) and double, accumulation (beta = 1). Without a GPU it says so and exits 77,
// which ctest reports as skipped (never as passed).
//   ./tests/grouped_gemm_check
#include <examoe/error.hpp>
#include <examoe/impl/cublas_grouped_gemm.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

using examoe::impl::cublas::GemmProblem;
using examoe::impl::cublas::GroupedGemm;
using examoe::impl::cublas::Precision;

int failures = 0;

template <class T>
struct DeviceArray {
  T* p = nullptr;
  std::size_t n = 0;
  explicit DeviceArray(const std::vector<T>& v) : n(v.size()) {
    if (cudaMalloc(reinterpret_cast<void**>(&p), std::max<std::size_t>(1, n) * sizeof(T)) != cudaSuccess)
      throw examoe::Error("grouped_gemm_check: cudaMalloc failed");
    cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DeviceArray() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> v(n);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
};

/// Row-major reference of C = alpha op(A) op(B) + beta C for one problem, in double.
template <class T>
void reference(const GemmProblem& p, bool ta, bool tb, double alpha, double beta, const T* A, const T* B, T* C) {
  for (int i = 0; i < p.m; ++i)
    for (int j = 0; j < p.n; ++j) {
      double s = 0;
      for (int l = 0; l < p.k; ++l) {
        const double a = ta ? A[l * p.lda + i] : A[i * p.lda + l];
        const double b = tb ? B[j * p.ldb + l] : B[l * p.ldb + j];
        s += a * b;
      }
      C[i * p.ldc + j] = static_cast<T>(alpha * s + beta * C[i * p.ldc + j]);
    }
}

/// The experts' three shapes over groups of `rows` rows: rows x W, rows x W^T, rows^T x rows.
template <class T>
void check(Precision prec, bool tf32, double tol, const char* name) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> u(-1, 1);
  const std::vector<int> rows = {5, 0, 17, 1, 0, 64, 3};
  const int G = static_cast<int>(rows.size()), d = 24, h = 40;
  int N = 0;
  std::vector<int> off(G + 1, 0);
  for (int g = 0; g < G; ++g) off[g + 1] = N += rows[g];
  auto fill = [&](std::size_t n) {
    std::vector<T> v(n);
    for (auto& a : v) a = static_cast<T>(u(rng));
    return v;
  };
  GroupedGemm gemm;
  for (int shape = 0; shape < 3; ++shape) {
    // 0: C[N][h] = X[N][d] W[g][d][h]; 1: C[N][h] = X[N][d] W[g][h][d]^T; 2: W[g][d][h] += X^T Y
    const bool ta = shape == 2, tb = shape == 1;
    const double alpha = 0.75, beta = shape == 2 ? 1.0 : 0.5;
    std::vector<T> X = fill(static_cast<std::size_t>(N) * d), Y = fill(static_cast<std::size_t>(N) * h);
    std::vector<T> W = fill(static_cast<std::size_t>(G) * d * h);
    std::vector<T> C = shape == 2 ? W : fill(static_cast<std::size_t>(N) * h);
    DeviceArray<T> dX(X), dY(Y), dW(W), dC(C);
    std::vector<GemmProblem> probs(G);
    for (int g = 0; g < G; ++g) {
      GemmProblem& p = probs[g];
      if (shape < 2) {
        p = {rows[g], h, d, dX.p + off[g] * d, d, dW.p + g * d * h, tb ? d : h, dC.p + off[g] * h, h};
      } else {
        p = {d, h, rows[g], dX.p + off[g] * d, d, dY.p + off[g] * h, h, dC.p + g * d * h, h};
      }
    }
    gemm.run(nullptr, prec, ta, tb, alpha, beta, probs, tf32);
    cudaDeviceSynchronize();
    const std::vector<T> got = dC.get();
    std::vector<T> want = C;
    for (int g = 0; g < G; ++g) {
      GemmProblem p = probs[g];
      if (shape < 2)
        reference(p, ta, tb, alpha, beta, X.data() + off[g] * d, W.data() + g * d * h, want.data() + off[g] * h);
      else
        reference(p, ta, tb, alpha, beta, X.data() + off[g] * d, Y.data() + off[g] * h, want.data() + g * d * h);
    }
    double worst = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
      worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - want[i]) / (1 + std::fabs(static_cast<double>(want[i]))));
    const bool ok = worst <= tol;
    if (!ok) ++failures;
    std::printf("grouped_gemm_check: %-12s shape %d: max rel. error %.3e (tolerance %.1e) %s\n", name, shape, worst,
                tol, ok ? "ok" : "FAILED");
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("grouped_gemm_check: no CUDA device here; skipped\n");
    return 77;
  }
  try {
    check<double>(Precision::f64, false, 1e-12, "double");
    check<float>(Precision::f32, false, 1e-5, "float");
    check<float>(Precision::f32, true, 5e-3, "float tf32");
  } catch (const examoe::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
