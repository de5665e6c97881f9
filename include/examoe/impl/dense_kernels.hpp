// Dense transformer kernels (RMSNorm, causal attention, embedding, cross-entropy).
//
// Same conventions as the expert and dispatch kernels: templated free functions taking the
// execution-space instance first, matrices as LayoutRight 2D views (or subviews with
// contiguous rows), every GEMM through kc::gemm. No atomics: every output element has one
// writer and every sum runs in a fixed order, so results are bitwise reproducible. Nothing
// here allocates; the caller owns every buffer (the saved activations and the scratch).
#pragma once
#include <examoe/impl/batched_gemm.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl::dense {

// ============================================================================ RMSNorm

/// Columns per team of the kernels that sum each column over the rows in order (dg of
/// RMSNorm, the embedding gradients): consecutive threads take consecutive columns (coalesced
/// on a GPU), and on a CPU a team's columns stay in cache while its rows are walked.
constexpr int kColumnChunk = 32;

/// y[n][c] = x[n][c] * inv_rms[n] * g[c], inv_rms[n] = 1 / sqrt(mean_c x[n][c]^2 + eps).
/// One team per row, its threads on consecutive columns.
template <class Space, class X, class G, class Y, class R>
void rmsnorm_forward(const Space& space, const X& x, const G& g, double eps, const Y& y,
                     const R& inv_rms) {
  using S = typename Y::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S e = static_cast<S>(eps);
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm", Kokkos::TeamPolicy<Space>(space, n, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank();
        S ss = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, d), [&](const int c, S& acc) { acc += x(i, c) * x(i, c); }, ss);
        const S r = S(1) / kc::sqrt(ss * inv_d + e);
        Kokkos::single(Kokkos::PerTeam(team), [&]() { inv_rms(i) = r; });
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, d), [&](const int c) { y(i, c) = x(i, c) * r * g(c); });
      });
}

/// dx (overwritten) = r * (dy*g - x * r^2 * <dy*g, x> / d) per row, with r = inv_rms (one
/// team per row); dg[c] += sum_n dy[n][c] * x[n][c] * r[n], each column summing the rows in
/// order (teams of kColumnChunk columns).
template <class Space, class X, class G, class R, class DY, class DX, class DG>
void rmsnorm_backward(const Space& space, const X& x, const G& g, const R& inv_rms,
                      const DY& dy, const DX& dx, const DG& dg) {
  using S = typename DX::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm_bwd_dx", Kokkos::TeamPolicy<Space>(space, n, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank();
        const S r = inv_rms(i);
        S dot = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, d), [&](const int c, S& acc) { acc += dy(i, c) * g(c) * x(i, c); }, dot);
        const S coef = r * r * dot * inv_d;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, d),
                             [&](const int c) { dx(i, c) = r * (dy(i, c) * g(c) - x(i, c) * coef); });
      });
  const int chunks = (d + kColumnChunk - 1) / kColumnChunk;
  Kokkos::parallel_for(
      "examoe::dense::rmsnorm_bwd_dg", Kokkos::TeamPolicy<Space>(space, chunks, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int c0 = team.league_rank() * kColumnChunk, c1 = kc::min(d, c0 + kColumnChunk);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, c0, c1), [&](const int c) {
          S acc = 0;
          for (int i = 0; i < n; ++i) acc += dy(i, c) * x(i, c) * inv_rms(i);
          dg(c) += acc;
        });
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
void attention_core_forward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
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

/// Backward of attention_core_forward from dO = dL/do: dq, dk, dv overwritten; ds
/// [B*heads*S][S] is scratch. With dp_ij = <dO_i, v_j>, D_i = <dO_i, o_i> and
/// ds_ij = scale p_ij (dp_ij - D_i):  dv = p^T dO,  dq = ds k,  dk = ds^T q  (per block).
template <class Space, class Q, class P>
void attention_core_backward(const Space& space, GroupedGemm<Space>& gemm, const AttentionShape& sh,
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

// ========================================================================== Embedding

/// out[n] = wte[tokens[n]] + wpe[n % seq], one team per row, its threads on consecutive columns.
template <class Space, class T, class W, class O>
void embedding_forward(const Space& space, const T& tokens, int seq, const W& wte,
                       const W& wpe, const O& out) {
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(out.extent(1));
  Kokkos::parallel_for(
      "examoe::dense::embedding", Kokkos::TeamPolicy<Space>(space, n, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank(), tok = tokens(i), s = i % seq;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, d), [&](const int c) { out(i, c) = wte(tok, c) + wpe(s, c); });
      });
}

/// dwte[tokens[n]] += dout[n], dwpe[n % seq] += dout[n]. Every column c scans the rows in
/// order (teams of kColumnChunk columns): every (row of dwte/dwpe, c) is summed over its tokens
/// in increasing n, without atomics, in O(N d) work whatever the vocabulary size.
template <class Space, class T, class DO, class DW>
void embedding_backward(const Space& space, const T& tokens, int seq, const DO& dout,
                        const DW& dwte, const DW& dwpe) {
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(dout.extent(1));
  const int chunks = (d + kColumnChunk - 1) / kColumnChunk;
  Kokkos::parallel_for(
      "examoe::dense::embedding_bwd", Kokkos::TeamPolicy<Space>(space, chunks, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int c0 = team.league_rank() * kColumnChunk, c1 = kc::min(d, c0 + kColumnChunk);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, c0, c1), [&](const int c) {
          for (int i = 0; i < n; ++i) {
            const auto g = dout(i, c);
            dwte(tokens(i), c) += g;
            dwpe(i % seq, c) += g;
          }
        });
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
