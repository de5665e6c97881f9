// Dense transformer kernels (RMSNorm, causal attention, embedding, cross-entropy).
//
// Same conventions as the expert and dispatch kernels: templated free functions taking the
// execution-space instance first, matrices as LayoutRight 2D views (or subviews with
// contiguous rows), every GEMM through kc::gemm. No atomics: every output element has one
// writer and every sum runs in a fixed order, so results are bitwise reproducible. Nothing
// here allocates; the caller owns every buffer (the saved activations and the scratch).
#pragma once
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl::dense {

// ============================================================================ RMSNorm

/// y[n][c] = x[n][c] * inv_rms[n] * g[c], inv_rms[n] = 1 / sqrt(mean_c x[n][c]^2 + eps).
/// One thread per row.
template <class Space, class X, class G, class Y, class R>
void rmsnorm_forward(const Space& space, const X& x, const G& g, double eps, const Y& y,
                     const R& inv_rms) {
  using S = typename Y::non_const_value_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S e = static_cast<S>(eps);
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        S ss = 0;
        for (int c = 0; c < d; ++c) ss += x(i, c) * x(i, c);
        const S r = S(1) / kc::sqrt(ss * inv_d + e);
        inv_rms(i) = r;
        for (int c = 0; c < d; ++c) y(i, c) = x(i, c) * r * g(c);
      });
}

/// dx (overwritten) = r * (dy*g - x * r^2 * <dy*g, x> / d) per row, with r = inv_rms;
/// dg[c] += sum_n dy[n][c] * x[n][c] * r[n], one thread per column summing the rows in order.
template <class Space, class X, class G, class R, class DY, class DX, class DG>
void rmsnorm_backward(const Space& space, const X& x, const G& g, const R& inv_rms,
                      const DY& dy, const DX& dx, const DG& dg) {
  using S = typename DX::non_const_value_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm_bwd_dx", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        const S r = inv_rms(i);
        S dot = 0;
        for (int c = 0; c < d; ++c) dot += dy(i, c) * g(c) * x(i, c);
        const S coef = r * r * dot * inv_d;
        for (int c = 0; c < d; ++c) dx(i, c) = r * (dy(i, c) * g(c) - x(i, c) * coef);
      });
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm_bwd_dg", Kokkos::RangePolicy<Space>(space, 0, d),
      KOKKOS_LAMBDA(const int c) {
        S acc = 0;
        for (int i = 0; i < n; ++i) acc += dy(i, c) * x(i, c) * inv_rms(i);
        dg(c) += acc;
      });
}

// ========================================================================== Attention

/// <a[ra][c0..c0+n), b[rb][c0..c0+n)> with four partial sums (a fixed order: deterministic),
/// which lets the compiler vectorize and pipeline the reduction.
template <class S, class A, class B>
KOKKOS_INLINE_FUNCTION S row_dot(const A& a, int ra, const B& b, int rb, int c0, int n) {
  S s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int c = 0;
  for (; c + 4 <= n; c += 4) {
    s0 += a(ra, c0 + c) * b(rb, c0 + c);
    s1 += a(ra, c0 + c + 1) * b(rb, c0 + c + 1);
    s2 += a(ra, c0 + c + 2) * b(rb, c0 + c + 2);
    s3 += a(ra, c0 + c + 3) * b(rb, c0 + c + 3);
  }
  for (; c < n; ++c) s0 += a(ra, c0 + c) * b(rb, c0 + c);
  return (s0 + s1) + (s2 + s3);
}

struct AttentionShape {
  int batch = 0, seq = 0, heads = 1;  // rows = batch*seq, d = heads*head_dim
};

/// Causal multi-head self-attention without biases (see the header of the model code):
/// q = x wq, k = x wk, v = x wv; per (b, head) p = causal softmax(q k^T / sqrt(dh)),
/// o = p v; out = o wo. Saves q, k, v, o ([B*S][d]) and p ([B*heads*S][S], row
/// (b*heads+h)*S+i, zero above the diagonal). The core runs one thread per (b, h, i).
template <class Space, class X, class W, class Q, class P, class O>
void attention_forward(const Space& space, const AttentionShape& sh, const X& x, const W& wq,
                       const W& wk, const W& wv, const W& wo, const Q& q, const Q& k,
                       const Q& v, const P& p, const Q& o, const O& out) {
  using S = typename Q::non_const_value_type;
  const int B = sh.batch, T = sh.seq, H = sh.heads;
  const int d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);

  kc::gemm(space, "N", "N", S(1), x, wq, S(0), q);
  kc::gemm(space, "N", "N", S(1), x, wk, S(0), k);
  kc::gemm(space, "N", "N", S(1), x, wv, S(0), v);

  Kokkos::parallel_for(
      "examoe::dense::attention", Kokkos::RangePolicy<Space>(space, 0, B * H * T),
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

  kc::gemm(space, "N", "N", S(1), o, wo, S(0), out);
}

/// Backward of attention_forward. dx is overwritten; dwq, dwk, dwv, dwo are accumulated
/// (+=). dq, dk, dv, dO ([B*S][d]) are scratch.
///
/// With dO = dout wo^T, dp_ij = <dO_i, v_j> and D_i = sum_j p_ij dp_ij = <dO_i, o_i>, the
/// softmax backward is ds_ij = p_ij (dp_ij - D_i), and
///   dq_i = scale sum_{j<=i} ds_ij k_j,  dk_j = scale sum_{i>=j} ds_ij q_i,
///   dv_j = sum_{i>=j} p_ij dO_i.
/// Nothing is allocated: D is parked in dq's first column of each head until dq itself is
/// computed (dk/dv: one thread per (b, h, j); dq: one thread per (b, h, i)).
template <class Space, class X, class W, class Q, class P, class DY, class DX, class DW>
void attention_backward(const Space& space, const AttentionShape& sh, const X& x, const W& wq,
                        const W& wk, const W& wv, const W& wo, const Q& q, const Q& k,
                        const Q& v, const P& p, const Q& o, const DY& dout, const DX& dx,
                        const DW& dwq, const DW& dwk, const DW& dwv, const DW& dwo,
                        const Q& dq, const Q& dk, const Q& dv, const Q& dO) {
  using S = typename Q::non_const_value_type;
  const int B = sh.batch, T = sh.seq, H = sh.heads;
  const int d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);
  const int nthreads = dh > 0 ? B * H * T : 0;

  // out = o wo
  kc::gemm(space, "N", "T", S(1), dout, wo, S(0), dO);
  kc::gemm(space, "T", "N", S(1), o, dout, S(1), dwo);

  // D_i = <dO_i, o_i> per (b, h, i), parked in dq(row, h*dh).
  Kokkos::parallel_for(
      "examoe::dense::attention_bwd_delta", Kokkos::RangePolicy<Space>(space, 0, nthreads),
      KOKKOS_LAMBDA(const int t) {
        const int i = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int row = b * T + i, c0 = h * dh;
        S D = 0;
        for (int c = 0; c < dh; ++c) D += dO(row, c0 + c) * o(row, c0 + c);
        dq(row, c0) = D;
      });

  // dk_j, dv_j per (b, h, j), summing over i >= j in order.
  Kokkos::parallel_for(
      "examoe::dense::attention_bwd_kv", Kokkos::RangePolicy<Space>(space, 0, nthreads),
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
      "examoe::dense::attention_bwd_q", Kokkos::RangePolicy<Space>(space, 0, nthreads),
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

  // q = x wq, k = x wk, v = x wv
  kc::gemm(space, "N", "T", S(1), dq, wq, S(0), dx);
  kc::gemm(space, "N", "T", S(1), dk, wk, S(1), dx);
  kc::gemm(space, "N", "T", S(1), dv, wv, S(1), dx);
  kc::gemm(space, "T", "N", S(1), x, dq, S(1), dwq);
  kc::gemm(space, "T", "N", S(1), x, dk, S(1), dwk);
  kc::gemm(space, "T", "N", S(1), x, dv, S(1), dwv);
}

// ========================================================================== Embedding

/// out[n] = wte[tokens[n]] + wpe[n % seq], one thread per row.
template <class Space, class T, class W, class O>
void embedding_forward(const Space& space, const T& tokens, int seq, const W& wte,
                       const W& wpe, const O& out) {
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(out.extent(1));
  Kokkos::parallel_for(
      "examoe::dense::embedding", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) {
        const int tok = tokens(i), s = i % seq;
        for (int c = 0; c < d; ++c) out(i, c) = wte(tok, c) + wpe(s, c);
      });
}

/// dwte[tokens[n]] += dout[n], dwpe[n % seq] += dout[n]. One thread per column c scanning
/// the rows in order: every (row of dwte/dwpe, c) is summed over its tokens in increasing
/// n, without atomics, in O(N d) work whatever the vocabulary size.
template <class Space, class T, class DO, class DW>
void embedding_backward(const Space& space, const T& tokens, int seq, const DO& dout,
                        const DW& dwte, const DW& dwpe) {
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(dout.extent(1));
  Kokkos::parallel_for(
      "examoe::dense::embedding_bwd", Kokkos::RangePolicy<Space>(space, 0, d),
      KOKKOS_LAMBDA(const int c) {
        for (int i = 0; i < n; ++i) {
          const auto g = dout(i, c);
          dwte(tokens(i), c) += g;
          dwpe(i % seq, c) += g;
        }
      });
}

// ====================================================================== Cross-entropy

/// Softmax cross-entropy over the rows of logits [N][V] with targets [N] (< 0: ignored).
/// Returns the sum over valid rows of -log softmax(logits[n])[target[n]] (double
/// accumulation); writes dlogits = scale * (softmax - onehot) for valid rows and 0 for
/// ignored ones (dlogits may be logits itself: each row is read fully before it is written);
/// correct[n] = 1 when valid and the argmax (lowest index among ties) is the target.
/// *valid_count (when non-null) = number of valid rows. One thread per row.
template <class Space, class L, class T, class DL, class C>
double cross_entropy(const Space& space, const L& logits, const T& targets, double scale,
                     const DL& dlogits, const C& correct, long long* valid_count = nullptr) {
  using S = typename DL::non_const_value_type;
  const int n = static_cast<int>(logits.extent(0)), V = static_cast<int>(logits.extent(1));
  double loss = 0;
  count_host_sync();  // a reduction into a host value waits for it
  Kokkos::parallel_reduce(
      "examoe::dense::cross_entropy", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i, double& acc) {
        const int tgt = targets(i);
        if (tgt < 0 || V == 0) {
          for (int c = 0; c < V; ++c) dlogits(i, c) = S(0);
          correct(i) = 0;
          return;
        }
        double m = static_cast<double>(logits(i, 0));
        int arg = 0;
        for (int c = 1; c < V; ++c) {
          const double l = static_cast<double>(logits(i, c));
          if (m < l) {
            m = l;
            arg = c;
          }
        }
        const double lt = static_cast<double>(logits(i, tgt));
        correct(i) = arg == tgt ? 1 : 0;
        // exp(l - max) parked in dlogits (one exp per logit; each logit is read before its
        // slot is written, so this also works in place), then normalized.
        double sum = 0;
        for (int c = 0; c < V; ++c) {
          const double e = kc::exp(static_cast<double>(logits(i, c)) - m);
          dlogits(i, c) = static_cast<S>(e);
          sum += e;
        }
        acc += m + kc::log(sum) - lt;
        const double f = scale / sum;
        for (int c = 0; c < V; ++c) {
          const double g = static_cast<double>(dlogits(i, c)) * f;
          dlogits(i, c) = static_cast<S>(c == tgt ? g - scale : g);
        }
      },
      loss);
  if (valid_count) {
    long long cnt = 0;
    count_host_sync();
    Kokkos::parallel_reduce(
        "examoe::dense::cross_entropy_count", Kokkos::RangePolicy<Space>(space, 0, n),
        KOKKOS_LAMBDA(const int i, long long& acc) { acc += targets(i) >= 0 ? 1 : 0; }, cnt);
    *valid_count = cnt;
  }
  return loss;
}

}  // namespace examoe::impl::dense
