// Batched GEMMs of equal shapes on blocks of 2D views: C_i = alpha op(A_i) op(B_i) + beta C_i
// for i in [0, count), each block a rectangle of a LayoutRight view (a row range and a column
// range, so a block keeps the view's row stride). Attention runs its per-(sequence, head)
// products through it: q k^T, p v and their gradients (docs/model.md).
// On CUDA builds: ONE cuBLAS grouped batched GEMM on the instance's stream (every block the
// same shape; impl/cublas_grouped_gemm.hpp). Elsewhere: a loop of Kokkos Kernels GEMMs over the
// blocks. Either way, one counted GEMM call (host_sync.hpp).
#pragma once

#include <examoe/impl/grouped_gemm.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <utility>
#include <vector>

namespace examoe::impl {

/// Where block i of an operand starts: its first row and first column in the view.
struct BlockCorner {
  int row = 0, col = 0;
};

/// The shape of every product: op(A_i) is [m][k], op(B_i) [k][n], C_i [m][n].
struct BatchShape {
  int count = 0, m = 0, n = 0, k = 0;
};

/// C_i = alpha op(A_i) op(B_i) + beta C_i for every i of `shape.count`; op(X) = X^T when its
/// transpose flag is "T". corner_a(i), corner_b(i), corner_c(i) give each block's BlockCorner;
/// a block's extent follows from the shape and the transpose (A_i is [k][m] stored when
/// transposed). `state`: the cuBLAS handle on CUDA builds (unused elsewhere).
template <class Space, class AV, class BV, class CV, class FA, class FB, class FC>
void batched_gemm(const Space& space, GroupedGemm<Space>& state, const char* ta, const char* tb,
                  typename CV::const_value_type alpha, const AV& A, const BV& B,
                  typename CV::const_value_type beta, const CV& C, const BatchShape& shape,
                  const FA& corner_a, const FB& corner_b, const FC& corner_c) {
  count_gemm_call();
  if (shape.count <= 0 || shape.m <= 0 || shape.n <= 0) return;
  const bool trans_a = ta[0] == 'T', trans_b = tb[0] == 'T';
  const int ar = trans_a ? shape.k : shape.m, ac = trans_a ? shape.m : shape.k;
  const int br = trans_b ? shape.n : shape.k, bc = trans_b ? shape.k : shape.n;
  if constexpr (GroupedGemm<Space>::uses_cublas) {
#if defined(KOKKOS_ENABLE_CUDA)
    using S = typename CV::non_const_value_type;
    std::vector<cublas::GemmProblem> probs(static_cast<std::size_t>(shape.count));
    for (int i = 0; i < shape.count; ++i) {
      const BlockCorner a = corner_a(i), b = corner_b(i), c = corner_c(i);
      auto& p = probs[static_cast<std::size_t>(i)];
      p.m = shape.m;
      p.n = shape.n;
      p.k = shape.k;
      p.A = A.data() + static_cast<std::size_t>(a.row) * A.stride(0) + a.col;
      p.lda = static_cast<int>(A.stride(0));
      p.B = B.data() + static_cast<std::size_t>(b.row) * B.stride(0) + b.col;
      p.ldb = static_cast<int>(B.stride(0));
      p.C = C.data() + static_cast<std::size_t>(c.row) * C.stride(0) + c.col;
      p.ldc = static_cast<int>(C.stride(0));
    }
    state.cublas().run(space.cuda_stream(), detail::precision_of<S>(), trans_a, trans_b, alpha, beta, probs,
                       state.tf32());
#endif
  } else {
    (void)state;
    for (int i = 0; i < shape.count; ++i) {
      const BlockCorner a = corner_a(i), b = corner_b(i), c = corner_c(i);
      auto block = [](const auto& v, BlockCorner o, int r, int cols) {
        return Kokkos::subview(v, std::make_pair(o.row, o.row + r), std::make_pair(o.col, o.col + cols));
      };
      kc::gemm_uncounted(space, ta, tb, alpha, block(A, a, ar, ac), block(B, b, br, bc), beta,
                         block(C, c, shape.m, shape.n));
    }
  }
}

}  // namespace examoe::impl
