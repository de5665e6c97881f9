// The attention core as ExaMoE computed it before its batched GEMMs (one thread per
// (sequence, head, position), scalar loops over the positions and the head's columns), kept
// as a second implementation to compare the batched-GEMM path with (test_dense.cpp).
#pragma once
#include <examoe/impl/dense_kernels.hpp>

namespace examoe::test {
using namespace examoe::impl;
using examoe::impl::dense::AttentionShape;
using examoe::impl::dense::row_dot;

/// p = causal softmax(q k^T / sqrt(dh)) per (b, h), o = p v: the scalar loops.
template <class Space, class Q, class P>
void scalar_attention_core_forward(const Space& space, const AttentionShape& sh, const Q& q, const Q& k,
                                   const Q& v, const P& p, const Q& o) {
  using S = typename Q::non_const_value_type;
  const int B = sh.batch, T = sh.seq, H = sh.heads;
  const int d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);
  Kokkos::parallel_for(
      "examoe::test::scalar_attention", Kokkos::RangePolicy<Space>(space, 0, B * H * T),
      KOKKOS_LAMBDA(const int t) {
        const int i = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int row = b * T + i, c0 = h * dh;
        // scores (stored in p), running max
        S m = 0;
        for (int j = 0; j <= i; ++j) {
          const int rj = b * T + j;
          const S s = row_dot<S>(q, row, k, rj, c0, dh) * scale;
          p(t, j) = s;
          m = (j == 0 || m < s) ? s : m;
        }
        S sum = 0;
        for (int j = 0; j <= i; ++j) {
          const S e = kc::exp(p(t, j) - m);
          p(t, j) = e;
          sum += e;
        }
        const S inv = S(1) / sum;
        for (int j = 0; j <= i; ++j) p(t, j) *= inv;
        for (int j = i + 1; j < T; ++j) p(t, j) = S(0);
        // o_i = sum_j p_ij v_j
        for (int c = 0; c < dh; ++c) o(row, c0 + c) = S(0);
        for (int j = 0; j <= i; ++j) {
          const int rj = b * T + j;
          const S pj = p(t, j);
          for (int c = 0; c < dh; ++c) o(row, c0 + c) += pj * v(rj, c0 + c);
        }
      });

}

/// Backward of scalar_attention_core_forward from dO: dq, dk, dv overwritten.
template <class Space, class Q, class P>
void scalar_attention_core_backward(const Space& space, const AttentionShape& sh, const Q& q, const Q& k,
                                    const Q& v, const P& p, const Q& o, const Q& dO, const Q& dq,
                                    const Q& dk, const Q& dv) {
  using S = typename Q::non_const_value_type;
  const int B = sh.batch, T = sh.seq, H = sh.heads;
  const int d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);
  const int nthreads = dh > 0 ? B * H * T : 0;
  // D_i = <dO_i, o_i> per (b, h, i), parked in dq(row, h*dh).
  Kokkos::parallel_for(
      "examoe::test::scalar_attention_bwd_delta", Kokkos::RangePolicy<Space>(space, 0, nthreads),
      KOKKOS_LAMBDA(const int t) {
        const int i = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int row = b * T + i, c0 = h * dh;
        S D = 0;
        for (int c = 0; c < dh; ++c) D += dO(row, c0 + c) * o(row, c0 + c);
        dq(row, c0) = D;
      });

  // dk_j, dv_j per (b, h, j), summing over i >= j in order.
  Kokkos::parallel_for(
      "examoe::test::scalar_attention_bwd_kv", Kokkos::RangePolicy<Space>(space, 0, nthreads),
      KOKKOS_LAMBDA(const int t) {
        const int j = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int rj = b * T + j, c0 = h * dh;
        for (int c = 0; c < dh; ++c) {
          dk(rj, c0 + c) = S(0);
          dv(rj, c0 + c) = S(0);
        }
        for (int i = j; i < T; ++i) {
          const int ri = b * T + i;
          const S pij = p(bh * T + i, j);
          const S dp = row_dot<S>(dO, ri, v, rj, c0, dh);
          const S ds = pij * (dp - dq(ri, c0)) * scale;
          for (int c = 0; c < dh; ++c) {
            dk(rj, c0 + c) += ds * q(ri, c0 + c);
            dv(rj, c0 + c) += pij * dO(ri, c0 + c);
          }
        }
      });

  // dq_i per (b, h, i), summing over j <= i in order (reads its own D first).
  Kokkos::parallel_for(
      "examoe::test::scalar_attention_bwd_q", Kokkos::RangePolicy<Space>(space, 0, nthreads),
      KOKKOS_LAMBDA(const int t) {
        const int i = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int ri = b * T + i, c0 = h * dh;
        const S D = dq(ri, c0);
        for (int c = 0; c < dh; ++c) dq(ri, c0 + c) = S(0);
        for (int j = 0; j <= i; ++j) {
          const int rj = b * T + j;
          const S dp = row_dot<S>(dO, ri, v, rj, c0, dh);
          const S ds = p(t, j) * (dp - D) * scale;
          for (int c = 0; c < dh; ++c) dq(ri, c0 + c) += ds * k(rj, c0 + c);
        }
      });

}

}  // namespace examoe::test
