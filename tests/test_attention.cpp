// The attention core as batched GEMMs per (sequence, head) (dense::attention_core_forward_gemm /
// _backward_gemm) against the row kernels it replaced (attention_core_forward_rows / _backward_rows)
// and a host reference, in float and double, at shapes with one position, odd lengths, one head
// and eight: the same p, o, dq, dk, dv; exact zeros above the diagonal; one counted GEMM call per
// product; and which of the two the model's attention_core_forward takes.
#include <examoe/impl/dense_kernels.hpp>
#include <examoe/impl/host_sync.hpp>

#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

namespace dense = examoe::impl::dense;
using Space = Kokkos::DefaultExecutionSpace;
using Mem = Space::memory_space;
template <class S>
using Mat = Kokkos::View<S**, Kokkos::LayoutRight, Mem>;
using Vd = std::vector<double>;

struct Shape {
  int B, T, H, d;
};

Vd random_vec(std::uint64_t seed, std::size_t n) {
  Vd v(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 77;
  for (auto& e : v) {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    e = 2.0 * static_cast<double>((z ^ (z >> 31)) >> 11) / 9007199254740992.0 - 1.0;
  }
  return v;
}
template <class S>
Mat<S> upload(const char* name, int r, int c, const Vd& vals) {
  Mat<S> m(std::string(name), r, c);
  auto h = Kokkos::create_mirror_view(m);
  for (std::size_t i = 0; i < vals.size(); ++i) h.data()[i] = static_cast<S>(vals[i]);
  Kokkos::deep_copy(m, h);
  return m;
}
template <class V>
Vd download(const V& m) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m);
  return Vd(h.data(), h.data() + h.span());
}
/// max |a - b| / max(max |b|, 0.01): the gradients of a single position are exactly 0 in exact
/// arithmetic (a softmax over one score is constant), and both implementations give rounding
/// noise there, so the scale has a floor (every input is of order 1).
double rel_err(const Vd& a, const Vd& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0, s = 0.01;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]));
    s = std::max(s, std::fabs(b[i]));
  }
  return m / s;
}

/// Host reference of the forward core in double: p and o, layouts as the kernels'.
void reference_forward(const Shape& sh, const Vd& q, const Vd& k, const Vd& v, Vd& p, Vd& o) {
  const int T = sh.T, d = sh.d, dh = d / sh.H;
  p.assign(static_cast<std::size_t>(sh.B) * sh.H * T * T, 0.0);
  o.assign(static_cast<std::size_t>(sh.B) * T * d, 0.0);
  for (int b = 0; b < sh.B; ++b)
    for (int h = 0; h < sh.H; ++h)
      for (int i = 0; i < T; ++i) {
        const std::size_t row = (static_cast<std::size_t>(b) * sh.H + h) * T + i;
        std::vector<double> s(i + 1);
        double m = -1e300, sum = 0;
        for (int j = 0; j <= i; ++j) {
          double dotp = 0;
          for (int c = 0; c < dh; ++c) dotp += q[(b * T + i) * d + h * dh + c] * k[(b * T + j) * d + h * dh + c];
          s[j] = dotp / std::sqrt(static_cast<double>(dh));
          m = std::max(m, s[j]);
        }
        for (int j = 0; j <= i; ++j) sum += std::exp(s[j] - m);
        for (int j = 0; j <= i; ++j) {
          p[row * T + j] = std::exp(s[j] - m) / sum;
          for (int c = 0; c < dh; ++c) o[(b * T + i) * d + h * dh + c] += p[row * T + j] * v[(b * T + j) * d + h * dh + c];
        }
      }
}

template <class S>
void check_shape(const Shape& sh, double tol) {
  SCOPED_TRACE(::testing::Message() << (sizeof(S) == 4 ? "float" : "double") << " B=" << sh.B << " T=" << sh.T
                                    << " H=" << sh.H << " d=" << sh.d);
  const int N = sh.B * sh.T, R = sh.B * sh.H * sh.T;
  const Vd q = random_vec(1, N * sh.d), k = random_vec(2, N * sh.d), v = random_vec(3, N * sh.d),
           dO = random_vec(4, N * sh.d);
  const Vd nan_nd(static_cast<std::size_t>(N) * sh.d, std::nan("")), nan_p(static_cast<std::size_t>(R) * sh.T, std::nan(""));
  dense::AttentionShape a;
  a.batch = sh.B;
  a.seq = sh.T;
  a.heads = sh.H;
  Space space;
  auto Q = upload<S>("q", N, sh.d, q), K = upload<S>("k", N, sh.d, k), V = upload<S>("v", N, sh.d, v),
       DO = upload<S>("dO", N, sh.d, dO);
  // The batched-GEMM path; every output starts as NaN (all of it must be written).
  auto P = upload<S>("p", R, sh.T, nan_p), O = upload<S>("o", N, sh.d, nan_nd), DS = upload<S>("ds", R, sh.T, nan_p);
  auto DQ = upload<S>("dq", N, sh.d, nan_nd), DK = upload<S>("dk", N, sh.d, nan_nd), DV = upload<S>("dv", N, sh.d, nan_nd);
  examoe::impl::GroupedGemm<Space> gemm;
  const auto c0 = examoe::impl::work_counts();
  dense::attention_core_forward_gemm(space, gemm, a, Q, K, V, P, O);
  const auto c1 = examoe::impl::work_counts();
  dense::attention_core_backward_gemm(space, gemm, a, Q, K, V, P, O, DO, DQ, DK, DV, DS);
  const auto c2 = examoe::impl::work_counts();
  space.fence();
  EXPECT_EQ((c1 - c0).gemm_calls, 2) << "q k^T and p v: one batched call each";
  EXPECT_EQ((c2 - c1).gemm_calls, 4) << "p^T dO, dO v^T, ds k, ds^T q: one batched call each";
  // The row kernels of before.
  auto P0 = upload<S>("p0", R, sh.T, nan_p), O0 = upload<S>("o0", N, sh.d, nan_nd);
  auto DQ0 = upload<S>("dq0", N, sh.d, nan_nd), DK0 = upload<S>("dk0", N, sh.d, nan_nd), DV0 = upload<S>("dv0", N, sh.d, nan_nd);
  dense::attention_core_forward_rows(space, a, Q, K, V, P0, O0);
  dense::attention_core_backward_rows(space, a, Q, K, V, P0, O0, DO, DQ0, DK0, DV0);
  space.fence();

  const Vd p = download(P), o = download(O), ds = download(DS);
  EXPECT_LT(rel_err(p, download(P0)), tol);
  EXPECT_LT(rel_err(o, download(O0)), tol);
  EXPECT_LT(rel_err(download(DQ), download(DQ0)), tol);
  EXPECT_LT(rel_err(download(DK), download(DK0)), tol);
  EXPECT_LT(rel_err(download(DV), download(DV0)), tol);
  Vd pr, orf;
  reference_forward(sh, q, k, v, pr, orf);
  EXPECT_LT(rel_err(p, pr), tol);
  EXPECT_LT(rel_err(o, orf), tol);
  for (int t = 0; t < R; ++t) {
    const int i = t % sh.T;
    double sum = 0;
    for (int j = 0; j < sh.T; ++j) {
      const std::size_t at = static_cast<std::size_t>(t) * sh.T + j;
      if (j > i) {
        ASSERT_EQ(p[at], 0.0) << "p row " << t << " column " << j << " above the diagonal";
        ASSERT_EQ(ds[at], 0.0) << "ds row " << t << " column " << j << " above the diagonal";
      }
      sum += p[at];
    }
    EXPECT_NEAR(sum, 1.0, 10 * tol);
  }
  // Deterministic: a second run gives the same bits.
  dense::attention_core_forward_gemm(space, gemm, a, Q, K, V, P, O);
  dense::attention_core_backward_gemm(space, gemm, a, Q, K, V, P, O, DO, DQ, DK, DV, DS);
  space.fence();
  EXPECT_EQ(download(O), o);
  EXPECT_EQ(download(DS), ds);
}

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {1, 1, 1, 4},     // one position, one head
      {3, 1, 8, 16},    // one position, eight heads
      {2, 7, 1, 6},     // an odd length, one head
      {2, 13, 8, 40},   // an odd length, eight heads of 5
      {1, 32, 4, 64},   // the default model's shape, one sequence
      {2, 48, 8, 64}};  // longer sequences, eight heads of 8
  return s;
}

TEST(Attention, BatchedGemmsMatchScalarLoopsDouble) {
  for (const Shape& sh : shapes()) check_shape<double>(sh, 1e-12);
}

TEST(Attention, BatchedGemmsMatchScalarLoopsFloat) {
  for (const Shape& sh : shapes()) check_shape<float>(sh, 2e-5);
}

/// attention_core_forward / _backward take the GEMMs on a device, and on a host from
/// kAttentionGemmMinSeqOnHost positions on (the row kernels below): bitwise the kernel chosen.
template <class S>
void check_dispatch(int T) {
  const Shape sh{2, T, 4, 32};
  const int N = sh.B * sh.T, R = sh.B * sh.H * sh.T;
  dense::AttentionShape a;
  a.batch = sh.B;
  a.seq = sh.T;
  a.heads = sh.H;
  const bool gemms = dense::attention_core_uses_gemms<Space>(a);
  EXPECT_EQ(gemms, examoe::impl::kc::device_memory_v<Space> || T >= dense::kAttentionGemmMinSeqOnHost);
  Space space;
  auto Q = upload<S>("q", N, sh.d, random_vec(5, N * sh.d)), K = upload<S>("k", N, sh.d, random_vec(6, N * sh.d)),
       V = upload<S>("v", N, sh.d, random_vec(7, N * sh.d)), DO = upload<S>("dO", N, sh.d, random_vec(8, N * sh.d));
  Mat<S> P("p", R, T), O("o", N, sh.d), DS("ds", R, T), DQ("dq", N, sh.d), DK("dk", N, sh.d), DV("dv", N, sh.d);
  Mat<S> P1("p1", R, T), O1("o1", N, sh.d), DQ1("dq1", N, sh.d), DK1("dk1", N, sh.d), DV1("dv1", N, sh.d);
  examoe::impl::GroupedGemm<Space> gemm;
  const auto c0 = examoe::impl::work_counts();
  dense::attention_core_forward(space, gemm, a, Q, K, V, P, O);
  dense::attention_core_backward(space, gemm, a, Q, K, V, P, O, DO, DQ, DK, DV, DS);
  EXPECT_EQ((examoe::impl::work_counts() - c0).gemm_calls, gemms ? 6 : 0);
  if (gemms) {
    dense::attention_core_forward_gemm(space, gemm, a, Q, K, V, P1, O1);
    dense::attention_core_backward_gemm(space, gemm, a, Q, K, V, P1, O1, DO, DQ1, DK1, DV1, DS);
  } else {
    dense::attention_core_forward_rows(space, a, Q, K, V, P1, O1);
    dense::attention_core_backward_rows(space, a, Q, K, V, P1, O1, DO, DQ1, DK1, DV1);
  }
  space.fence();
  EXPECT_EQ(download(O), download(O1));
  EXPECT_EQ(download(DQ), download(DQ1));
  EXPECT_EQ(download(DK), download(DK1));
  EXPECT_EQ(download(DV), download(DV1));
}

TEST(Attention, ModelTakesGemmsFromSixtyFourPositionsOnHost) {
  for (int T : {32, 63, 64, 128}) {
    SCOPED_TRACE(::testing::Message() << "T=" << T);
    check_dispatch<float>(T);
    check_dispatch<double>(T);
  }
}

}  // namespace
