// Grouped GEMMs of the local experts: ONE call per projection covers every local expert,
// whatever its row count (zero included). Letters of docs/moe-layer.md: the expert rows X
// [N][.] are grouped by local expert, group g being rows [o_g, o_{g+1}); W [G][.][.] holds one
// matrix per group.
//   grouped_gemm_rows:    C_g = alpha X_g op(W_g) + beta C_g    (expert forward, input gradients)
//   grouped_gemm_weights: W_g = alpha X_g^T Y_g + beta W_g      (expert weight gradients)
// On CUDA builds: one cuBLAS grouped batched GEMM on the instance's stream
// (impl/cublas_grouped_gemm.hpp), TF32 tensor cores for float when asked. Elsewhere: a loop of
// Kokkos Kernels GEMMs over the groups. Either way, one counted GEMM call (host_sync.hpp).
#pragma once

#include <examoe/config.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <memory>
#include <type_traits>
#include <vector>

#if defined(KOKKOS_ENABLE_CUDA)
#if !EXAMOE_ENABLE_CUBLAS
#error "ExaMoE on CUDA needs cuBLAS (the expert GEMMs): configure with the CUDA toolkit's cuBLAS"
#endif
#include <examoe/impl/cublas_grouped_gemm.hpp>
#endif

namespace examoe::impl {

/// The per-layer state of the grouped GEMMs: on CUDA the cuBLAS handle and pointer arrays,
/// elsewhere nothing. `tf32`: float GEMMs may use TF32 tensor cores (CUDA only).
template <class Space>
class GroupedGemm {
 public:
  explicit GroupedGemm(bool tf32 = false) : tf32_(tf32) {}
  bool tf32() const { return tf32_; }

#if defined(KOKKOS_ENABLE_CUDA)
  static constexpr bool uses_cublas = std::is_same_v<Space, Kokkos::Cuda>;
  cublas::GroupedGemm& cublas() {
    if (!cublas_) cublas_ = std::make_unique<cublas::GroupedGemm>();
    return *cublas_;
  }

 private:
  std::unique_ptr<cublas::GroupedGemm> cublas_;
#else
  static constexpr bool uses_cublas = false;

 private:
#endif
  bool tf32_ = false;
};

/// One group of a grouped GEMM over rows: rows [begin, end) of X and C, matrix w of W.
struct RowGroup {
  int begin = 0, end = 0, w = 0;
};

/// The groups of `offsets` (G + 1 values): group g = rows [o_g, o_{g+1}), matrix g.
inline std::vector<RowGroup> row_groups_of(const std::vector<int>& offsets) {
  std::vector<RowGroup> groups;
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g)
    groups.push_back({offsets[g], offsets[g + 1], static_cast<int>(g)});
  return groups;
}

namespace detail {
template <class V>
auto group_rows(const V& v, int b, int e) {
  return Kokkos::subview(v, Kokkos::make_pair(b, e), Kokkos::ALL);
}
template <class T3>
auto group_matrix(const T3& w, int g) {
  return Kokkos::subview(w, g, Kokkos::ALL, Kokkos::ALL);
}
#if defined(KOKKOS_ENABLE_CUDA)
template <class S>
constexpr cublas::Precision precision_of() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "float or double");
  return std::is_same_v<S, float> ? cublas::Precision::f32 : cublas::Precision::f64;
}
#endif
}  // namespace detail

/// C[b..e) = alpha X[b..e) op(W[w]) + beta C[b..e) for every group {b, e, w} of `groups`
/// (host values; groups without rows are skipped); op(W) = W^T when trans_w.
template <class Space, class XV, class W3, class CV>
void grouped_gemm_rows(const Space& space, [[maybe_unused]] GroupedGemm<Space>& state, bool trans_w,
                       typename CV::const_value_type alpha, const XV& X, const W3& W,
                       typename CV::const_value_type beta, const CV& C, const std::vector<RowGroup>& groups) {
  count_gemm_call();
  if constexpr (GroupedGemm<Space>::uses_cublas) {
#if defined(KOKKOS_ENABLE_CUDA)
    using S = typename CV::non_const_value_type;
    std::vector<cublas::GemmProblem> probs(groups.size());
    const int kdim = static_cast<int>(X.extent(1)), n = static_cast<int>(C.extent(1));
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const RowGroup& g = groups[i];
      auto& p = probs[i];
      p.m = g.end - g.begin;
      p.n = n;
      p.k = kdim;
      p.A = X.data() + static_cast<std::size_t>(g.begin) * X.stride(0);
      p.lda = static_cast<int>(X.stride(0));
      p.B = W.data() + static_cast<std::size_t>(g.w) * W.stride(0);
      p.ldb = static_cast<int>(W.stride(1));
      p.C = C.data() + static_cast<std::size_t>(g.begin) * C.stride(0);
      p.ldc = static_cast<int>(C.stride(0));
    }
    state.cublas().run(space.cuda_stream(), detail::precision_of<S>(), false, trans_w, alpha, beta, probs,
                       state.tf32());
#endif
  } else {
    for (const RowGroup& g : groups) {
      if (g.begin == g.end) continue;
      kc::gemm_uncounted(space, "N", trans_w ? "T" : "N", alpha, detail::group_rows(X, g.begin, g.end),
                         detail::group_matrix(W, g.w), beta, detail::group_rows(C, g.begin, g.end));
    }
  }
}

/// The same with group g = rows [o_g, o_{g+1}) and matrix g, for `offsets` (G + 1 host values).
template <class Space, class XV, class W3, class CV>
void grouped_gemm_rows(const Space& space, [[maybe_unused]] GroupedGemm<Space>& state, bool trans_w,
                       typename CV::const_value_type alpha, const XV& X, const W3& W,
                       typename CV::const_value_type beta, const CV& C, const std::vector<int>& offsets) {
  grouped_gemm_rows(space, state, trans_w, alpha, X, W, beta, C, row_groups_of(offsets));
}

/// W[g] = alpha X[o_g..o_{g+1})^T Y[o_g..o_{g+1}) + beta W[g] for every group g. beta must be 1
/// (accumulation, the only use): a group without rows then leaves W[g] as it is.
template <class Space, class XV, class YV, class W3>
void grouped_gemm_weights(const Space& space, [[maybe_unused]] GroupedGemm<Space>& state,
                          typename W3::const_value_type alpha, const XV& X, const YV& Y,
                          const W3& W, const std::vector<int>& offsets) {
  count_gemm_call();
  using S = typename W3::non_const_value_type;
  const int G = static_cast<int>(offsets.size()) - 1;
  if constexpr (GroupedGemm<Space>::uses_cublas) {
#if defined(KOKKOS_ENABLE_CUDA)
    std::vector<cublas::GemmProblem> probs;
    for (int g = 0; g < G; ++g) {
      const int b = offsets[g], rows = offsets[g + 1] - b;
      if (rows == 0) continue;
      cublas::GemmProblem p;
      p.m = static_cast<int>(W.extent(1));
      p.n = static_cast<int>(W.extent(2));
      p.k = rows;
      p.A = X.data() + static_cast<std::size_t>(b) * X.stride(0);
      p.lda = static_cast<int>(X.stride(0));
      p.B = Y.data() + static_cast<std::size_t>(b) * Y.stride(0);
      p.ldb = static_cast<int>(Y.stride(0));
      p.C = W.data() + static_cast<std::size_t>(g) * W.stride(0);
      p.ldc = static_cast<int>(W.stride(1));
      probs.push_back(p);
    }
    state.cublas().run(space.cuda_stream(), detail::precision_of<S>(), true, false, alpha, 1.0, probs,
                       state.tf32());
#endif
  } else {
    for (int g = 0; g < G; ++g) {
      if (offsets[g] == offsets[g + 1]) continue;
      kc::gemm_uncounted(space, "T", "N", alpha, detail::group_rows(X, offsets[g], offsets[g + 1]),
                         detail::group_rows(Y, offsets[g], offsets[g + 1]), S(1), detail::group_matrix(W, g));
    }
  }
}

}  // namespace examoe::impl
