// Causal multi-head self-attention (docs/model.md): the projections, and the core per
// (sequence b, head h): p = causal softmax(q k^T / sqrt(dh)), o = p v, with its backward.
// The core runs as batched GEMMs over the (b, h) blocks (impl/batched_gemm.hpp: one cuBLAS
// grouped call on CUDA) with team kernels for the softmax and the score gradients, or, for
// short sequences on host spaces, as the row kernels it replaced (attention_core_uses_gemms).
// Conventions of impl/dense_kernels.hpp: no atomics, fixed summation orders, nothing allocated
// (except by the two overloads that keep the signatures of before, for tests).
#pragma once
#include <examoe/impl/batched_gemm.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl::dense {

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

namespace detail {
/// The (sequence, head) blocks of attention as batched-GEMM operands: block i = b*heads + h
/// is rows [b S, (b+1) S) x columns [h dh, (h+1) dh) of q, k, v, o (and their gradients), and
/// rows [i S, (i+1) S) of p and ds.
struct HeadBlocks {
  int seq = 0, heads = 1, dh = 0;
  KOKKOS_INLINE_FUNCTION BlockCorner token(int i) const { return {(i / heads) * seq, (i % heads) * dh}; }
  KOKKOS_INLINE_FUNCTION BlockCorner scores(int i) const { return {i * seq, 0}; }
};
inline HeadBlocks head_blocks(const AttentionShape& sh, int d) {
  return {sh.seq, sh.heads, sh.heads > 0 ? d / sh.heads : 0};
}
}  // namespace detail

/// q = x wq, k = x wk, v = x wv.
template <class Space, class X, class W, class Q>
void attention_project_qkv(const Space& space, const X& x, const W& wq, const W& wk, const W& wv,
                           const Q& q, const Q& k, const Q& v) {
  using S = typename Q::non_const_value_type;
  kc::gemm(space, "N", "N", S(1), x, wq, S(0), q);
  kc::gemm(space, "N", "N", S(1), x, wk, S(0), k);
  kc::gemm(space, "N", "N", S(1), x, wv, S(0), v);
}

/// Backward of attention_project_qkv: dx (overwritten) = dq wq^T + dk wk^T + dv wv^T;
/// dwq += x^T dq, dwk += x^T dk, dwv += x^T dv.
template <class Space, class X, class W, class Q, class DX, class DW>
void attention_project_qkv_backward(const Space& space, const X& x, const W& wq, const W& wk,
                                    const W& wv, const Q& dq, const Q& dk, const Q& dv,
                                    const DX& dx, const DW& dwq, const DW& dwk, const DW& dwv) {
  using S = typename Q::non_const_value_type;
  kc::gemm(space, "N", "T", S(1), dq, wq, S(0), dx);
  kc::gemm(space, "N", "T", S(1), dk, wk, S(1), dx);
  kc::gemm(space, "N", "T", S(1), dv, wv, S(1), dx);
  kc::gemm(space, "T", "N", S(1), x, dq, S(1), dwq);
  kc::gemm(space, "T", "N", S(1), x, dk, S(1), dwk);
  kc::gemm(space, "T", "N", S(1), x, dv, S(1), dwv);
}

/// Row t = (b*heads + h)*S + i of the scores p [B*heads*S][S]: p_ij = softmax_{j <= i}(p_ij)
/// (max, exponentials, their sum, in the order j = 0..i), exact zeros for j > i. One team per
/// row, its threads on consecutive j.
template <class Space, class P>
void causal_softmax_rows(const Space& space, int seq, const P& p) {
  using S = typename P::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int rows = static_cast<int>(p.extent(0));
  Kokkos::parallel_for(
      "examoe::dense::attention_softmax", Kokkos::TeamPolicy<Space>(space, rows, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int t = team.league_rank(), i = t % seq;
        S m = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, i + 1),
            [&](const int j, S& mx) { mx = mx < p(t, j) ? p(t, j) : mx; }, Kokkos::Max<S>(m));
        S sum = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, i + 1),
            [&](const int j, S& acc) {
              const S e = kc::exp(p(t, j) - m);
              p(t, j) = e;
              acc += e;
            },
            sum);
        const S inv = S(1) / sum;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, seq),
                             [&](const int j) { p(t, j) = j <= i ? p(t, j) * inv : S(0); });
      });
}

/// The core of causal multi-head attention, per (sequence b, head h) as batched GEMMs:
/// p = causal softmax(q k^T / sqrt(dh)) ([B*heads*S][S], row (b*heads+h)*S+i, zero above the
/// diagonal), o = p v. q, k, v, o: [B*S][d], head h in columns [h dh, (h+1) dh).
template <class Space, class Q, class P, class O>
void attention_core_forward_gemm(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                            const Q& q, const Q& k, const Q& v, const P& p, const O& o) {
  using S = typename P::non_const_value_type;
  const auto hb = detail::head_blocks(sh, static_cast<int>(q.extent(1)));
  if (hb.dh <= 0 || sh.batch * sh.seq == 0) return;
  const S scale = S(1) / kc::sqrt(static_cast<S>(hb.dh));
  const int n = sh.batch * sh.heads, T = sh.seq;
  auto tok = [hb](int i) { return hb.token(i); };
  auto sco = [hb](int i) { return hb.scores(i); };
  batched_gemm(space, gemm, "N", "T", scale, q, k, S(0), p, BatchShape{n, T, T, hb.dh}, tok, tok, sco);
  causal_softmax_rows(space, T, p);
  batched_gemm(space, gemm, "N", "N", S(1), p, v, S(0), o, BatchShape{n, T, hb.dh, T}, sco, tok, tok);
}

/// Row t = (b*heads + h)*S + i of ds (holding dp = dO v^T): ds_ij = scale p_ij (dp_ij - D_i)
/// for j <= i with D_i = <dO_i, o_i> over the head's columns, 0 above the diagonal.
template <class Space, class Q, class P>
void attention_score_grads(const Space& space, const AttentionShape& sh, const Q& o, const Q& dO,
                           const P& p, const P& ds) {
  using S = typename P::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const auto hb = detail::head_blocks(sh, static_cast<int>(o.extent(1)));
  const int T = sh.seq, dh = hb.dh;
  const S scale = S(1) / kc::sqrt(static_cast<S>(dh));
  Kokkos::parallel_for(
      "examoe::dense::attention_bwd_scores",
      Kokkos::TeamPolicy<Space>(space, static_cast<int>(p.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int t = team.league_rank(), i = t % T;
        const BlockCorner c = hb.token(t / T);
        const int row = c.row + i;
        S D = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, dh),
            [&](const int e, S& acc) { acc += dO(row, c.col + e) * o(row, c.col + e); }, D);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, T), [&](const int j) {
          ds(t, j) = j <= i ? p(t, j) * (ds(t, j) - D) * scale : S(0);
        });
      });
}

/// Backward of attention_core_forward_gemm from dO = dL/do: dq, dk, dv overwritten; ds
/// [B*heads*S][S] is scratch. With dp_ij = <dO_i, v_j>, D_i = <dO_i, o_i> and
/// ds_ij = scale p_ij (dp_ij - D_i):  dv = p^T dO,  dq = ds k,  dk = ds^T q  (per block).
template <class Space, class Q, class P>
void attention_core_backward_gemm(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                             const Q& q, const Q& k, const Q& v, const P& p, const Q& o, const Q& dO,
                             const Q& dq, const Q& dk, const Q& dv, const P& ds) {
  using S = typename P::non_const_value_type;
  const auto hb = detail::head_blocks(sh, static_cast<int>(q.extent(1)));
  if (hb.dh <= 0 || sh.batch * sh.seq == 0) return;
  const int n = sh.batch * sh.heads, T = sh.seq;
  auto tok = [hb](int i) { return hb.token(i); };
  auto sco = [hb](int i) { return hb.scores(i); };
  batched_gemm(space, gemm, "T", "N", S(1), p, dO, S(0), dv, BatchShape{n, T, hb.dh, T}, sco, tok, tok);
  batched_gemm(space, gemm, "N", "T", S(1), dO, v, S(0), ds, BatchShape{n, T, T, hb.dh}, tok, tok, sco);
  attention_score_grads(space, sh, o, dO, p, ds);
  batched_gemm(space, gemm, "N", "N", S(1), ds, k, S(0), dq, BatchShape{n, T, hb.dh, T}, sco, tok, tok);
  batched_gemm(space, gemm, "T", "N", S(1), ds, q, S(0), dk, BatchShape{n, T, hb.dh, T}, sco, tok, tok);
}

/// The same as attention_core_forward_gemm with one thread per (b, h, i) and scalar loops over
/// the positions and the head's columns (the kernel of ExaMoE before its batched GEMMs). The
/// scores of row i are <q_i, k_j> * scale for j <= i only.
template <class Space, class Q, class P>
void attention_core_forward_rows(const Space& space, const AttentionShape& sh, const Q& q, const Q& k,
                                   const Q& v, const P& p, const Q& o) {
  using S = typename Q::non_const_value_type;
  const int B = sh.batch, T = sh.seq, H = sh.heads;
  const int d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);
  Kokkos::parallel_for(
      "examoe::dense::attention_rows", Kokkos::RangePolicy<Space>(space, 0, B * H * T),
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


template <class Space, class Q, class P>
void attention_core_backward_rows(const Space& space, const AttentionShape& sh, const Q& q, const Q& k,
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
      "examoe::dense::attention_rows_bwd_delta", Kokkos::RangePolicy<Space>(space, 0, nthreads),
      KOKKOS_LAMBDA(const int t) {
        const int i = t % T, bh = t / T, h = bh % H, b = bh / H;
        const int row = b * T + i, c0 = h * dh;
        S D = 0;
        for (int c = 0; c < dh; ++c) D += dO(row, c0 + c) * o(row, c0 + c);
        dq(row, c0) = D;
      });

  // dk_j, dv_j per (b, h, j), summing over i >= j in order.
  Kokkos::parallel_for(
      "examoe::dense::attention_rows_bwd_kv", Kokkos::RangePolicy<Space>(space, 0, nthreads),
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
      "examoe::dense::attention_rows_bwd_q", Kokkos::RangePolicy<Space>(space, 0, nthreads),
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

/// Sequences at least this long run the attention core as batched GEMMs on host execution
/// spaces; shorter ones (the default model's 32) keep the row kernels, whose small dot products
/// cost no more there than 64 tiny GEMM calls (docs/performance.md) and whose rounding the
/// documented runs were made with. Device spaces always take the GEMMs.
constexpr int kAttentionGemmMinSeqOnHost = 64;

/// Whether attention_core_forward / _backward run as batched GEMMs for this shape on Space.
template <class Space>
bool attention_core_uses_gemms(const AttentionShape& sh) {
  return kc::device_memory_v<Space> || sh.seq >= kAttentionGemmMinSeqOnHost;
}

/// The attention core (attention_core_forward_gemm or _rows, attention_core_uses_gemms).
template <class Space, class Q, class P, class O>
void attention_core_forward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                            const Q& q, const Q& k, const Q& v, const P& p, const O& o) {
  if (attention_core_uses_gemms<Space>(sh))
    attention_core_forward_gemm(space, gemm, sh, q, k, v, p, o);
  else
    attention_core_forward_rows(space, sh, q, k, v, p, o);
}

/// Backward of attention_core_forward (the same kernels' backward; ds is scratch of the GEMMs').
template <class Space, class Q, class P>
void attention_core_backward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                             const Q& q, const Q& k, const Q& v, const P& p, const Q& o, const Q& dO,
                             const Q& dq, const Q& dk, const Q& dv, const P& ds) {
  if (attention_core_uses_gemms<Space>(sh))
    attention_core_backward_gemm(space, gemm, sh, q, k, v, p, o, dO, dq, dk, dv, ds);
  else
    attention_core_backward_rows(space, sh, q, k, v, p, o, dO, dq, dk, dv);
}

/// Causal multi-head self-attention without biases (see the header of the model code):
/// q = x wq, k = x wk, v = x wv; per (b, head) p = causal softmax(q k^T / sqrt(dh)),
/// o = p v; out = o wo. Saves q, k, v, o ([B*S][d]) and p ([B*heads*S][S], row
/// (b*heads+h)*S+i, zero above the diagonal). The core: attention_core_forward.
template <class Space, class X, class W, class Q, class P, class O>
void attention_forward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                       const X& x, const W& wq, const W& wk, const W& wv, const W& wo, const Q& q,
                       const Q& k, const Q& v, const P& p, const Q& o, const O& out) {
  using S = typename Q::non_const_value_type;
  attention_project_qkv(space, x, wq, wk, wv, q, k, v);
  attention_core_forward(space, gemm, sh, q, k, v, p, o);
  kc::gemm(space, "N", "N", S(1), o, wo, S(0), out);
}

/// Backward of attention_forward. dx is overwritten; dwq, dwk, dwv, dwo are accumulated
/// (+=). dq, dk, dv, dO ([B*S][d]) and ds (like p) are scratch.
template <class Space, class X, class W, class Q, class P, class DY, class DX, class DW>
void attention_backward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
                        const X& x, const W& wq, const W& wk, const W& wv, const W& wo, const Q& q,
                        const Q& k, const Q& v, const P& p, const Q& o, const DY& dout, const DX& dx,
                        const DW& dwq, const DW& dwk, const DW& dwv, const DW& dwo, const Q& dq,
                        const Q& dk, const Q& dv, const Q& dO, const P& ds) {
  using S = typename Q::non_const_value_type;
  kc::gemm(space, "N", "T", S(1), dout, wo, S(0), dO);  // out = o wo
  kc::gemm(space, "T", "N", S(1), o, dout, S(1), dwo);
  attention_core_backward(space, gemm, sh, q, k, v, p, o, dO, dq, dk, dv, ds);
  attention_project_qkv_backward(space, x, wq, wk, wv, dq, dk, dv, dx, dwq, dwk, dwv);
}

namespace detail {
/// A GroupedGemm for one call of the overloads without one; on CUDA the queue is drained
/// before it (and its cuBLAS handle and pointer arrays) goes.
template <class Space>
struct LocalGemm {
  explicit LocalGemm(const Space& s) : space(s) {}
  ~LocalGemm() {
    if constexpr (GroupedGemm<Space>::uses_cublas) host_sync(space);
  }
  Space space;
  GroupedGemm<Space> gemm;
};
}  // namespace detail

/// attention_forward with a GroupedGemm of its own (tests; the model keeps one).
template <class Space, class X, class W, class Q, class P, class O>
void attention_forward(const Space& space, const AttentionShape& sh, const X& x, const W& wq,
                       const W& wk, const W& wv, const W& wo, const Q& q, const Q& k,
                       const Q& v, const P& p, const Q& o, const O& out) {
  detail::LocalGemm<Space> g(space);
  attention_forward(space, g.gemm, sh, x, wq, wk, wv, wo, q, k, v, p, o, out);
}

/// attention_backward with a GroupedGemm of its own and its ds scratch allocated here (tests;
/// the model passes its own, and allocates nothing per step).
template <class Space, class X, class W, class Q, class P, class DY, class DX, class DW>
void attention_backward(const Space& space, const AttentionShape& sh, const X& x, const W& wq,
                        const W& wk, const W& wv, const W& wo, const Q& q, const Q& k,
                        const Q& v, const P& p, const Q& o, const DY& dout, const DX& dx,
                        const DW& dwq, const DW& dwk, const DW& dwv, const DW& dwo,
                        const Q& dq, const Q& dk, const Q& dv, const Q& dO) {
  using S = typename P::non_const_value_type;
  Kokkos::View<S**, Kokkos::LayoutRight, typename P::memory_space> ds(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, "examoe::dense::attention_ds"), p.extent(0), p.extent(1));
  detail::LocalGemm<Space> g(space);
  attention_backward(space, g.gemm, sh, x, wq, wk, wv, wo, q, k, v, p, o, dout, dx, dwq, dwk, dwv, dwo, dq,
                     dk, dv, dO, ds);
}

}  // namespace examoe::impl::dense
