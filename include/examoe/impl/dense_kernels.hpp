// Dense transformer kernels (RMSNorm, causal attention: impl/attention_kernels.hpp, embedding,
// cross-entropy).
//
// Same conventions as the expert and dispatch kernels: templated free functions taking the
// execution-space instance first, matrices as LayoutRight 2D views (or subviews with
// contiguous rows), every GEMM through kc::gemm. No atomics: every output element has one
// writer and every sum runs in a fixed order, so results are bitwise reproducible. Nothing
// here allocates; the caller owns every buffer (the saved activations and the scratch).
#pragma once
#include <examoe/impl/attention_kernels.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl::dense {

// ============================================================================ RMSNorm

// The row kernels take two shapes of the same sums: on a device one team per row with its
// threads on consecutive columns (coalesced); on a host one thread per row walking its columns
// (consecutive already, and without a team's cost per row). The column sums (dg of RMSNorm, the
// embedding gradients) run in chunks of kColumnChunk columns: on a device one thread per
// column, on a host one thread per chunk walking the rows with the chunk's sums in a local
// array (rows in order, not columns 1 KiB apart). Every sum keeps its order, so both shapes
// give the same bits.

/// Columns per chunk of the column sums.
constexpr int kColumnChunk = 32;

/// y[n][c] = x[n][c] * inv_rms[n] * g[c], inv_rms[n] = 1 / sqrt(mean_c x[n][c]^2 + eps).
/// One row per team (device) or thread (host).
template <class Space, class X, class G, class Y, class R>
void rmsnorm_forward(const Space& space, const X& x, const G& g, double eps, const Y& y,
                     const R& inv_rms) {
  using S = typename Y::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S e = static_cast<S>(eps);
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  if (!kc::device_memory_v<Space>) {  // (a plain if: nvcc compiles both shapes of the kernel)
    Kokkos::parallel_for(
        "examoe::dense::rmsnorm", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
          S ss = 0;
          for (int c = 0; c < d; ++c) ss += x(i, c) * x(i, c);
          const S r = S(1) / kc::sqrt(ss * inv_d + e);
          inv_rms(i) = r;
          for (int c = 0; c < d; ++c) y(i, c) = x(i, c) * r * g(c);
        });
    return;
  }
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

/// dx (overwritten) = r * (dy*g - x * r^2 * <dy*g, x> / d) per row, with r = inv_rms;
/// dg[c] += sum_n dy[n][c] * x[n][c] * r[n], each column summing the rows in order.
template <class Space, class X, class G, class R, class DY, class DX, class DG>
void rmsnorm_backward(const Space& space, const X& x, const G& g, const R& inv_rms,
                      const DY& dy, const DX& dx, const DG& dg) {
  using S = typename DX::non_const_value_type;
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const S inv_d = S(1) / static_cast<S>(d > 0 ? d : 1);
  const int chunks = (d + kColumnChunk - 1) / kColumnChunk;
  if (!kc::device_memory_v<Space>) {  // (a plain if: nvcc compiles both shapes of the kernel)
    Kokkos::parallel_for(
        "examoe::dense::rmsnorm_bwd_dx", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
          const S r = inv_rms(i);
          S dot = 0;
          for (int c = 0; c < d; ++c) dot += dy(i, c) * g(c) * x(i, c);
          const S coef = r * r * dot * inv_d;
          for (int c = 0; c < d; ++c) dx(i, c) = r * (dy(i, c) * g(c) - x(i, c) * coef);
        });
    Kokkos::parallel_for(
        "examoe::dense::rmsnorm_bwd_dg", Kokkos::RangePolicy<Space>(space, 0, chunks), KOKKOS_LAMBDA(const int k) {
          const int c0 = k * kColumnChunk, w = kc::min(d, c0 + kColumnChunk) - c0;
          S acc[kColumnChunk];
          for (int c = 0; c < w; ++c) acc[c] = 0;
          for (int i = 0; i < n; ++i)
            for (int c = 0; c < w; ++c) acc[c] += dy(i, c0 + c) * x(i, c0 + c) * inv_rms(i);
          for (int c = 0; c < w; ++c) dg(c0 + c) += acc[c];
        });
    return;
  }
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

// ========================================================================== Embedding

/// out[n] = wte[tokens[n]] + wpe[n % seq], one row per team (device) or thread (host).
template <class Space, class T, class W, class O>
void embedding_forward(const Space& space, const T& tokens, int seq, const W& wte,
                       const W& wpe, const O& out) {
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(out.extent(1));
  if (!kc::device_memory_v<Space>) {  // (a plain if: nvcc compiles both shapes of the kernel)
    Kokkos::parallel_for(
        "examoe::dense::embedding", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
          const int tok = tokens(i), s = i % seq;
          for (int c = 0; c < d; ++c) out(i, c) = wte(tok, c) + wpe(s, c);
        });
    return;
  }
  Kokkos::parallel_for(
      "examoe::dense::embedding", Kokkos::TeamPolicy<Space>(space, n, Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank(), tok = tokens(i), s = i % seq;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, d), [&](const int c) { out(i, c) = wte(tok, c) + wpe(s, c); });
      });
}

/// dwte[tokens[n]] += dout[n], dwpe[n % seq] += dout[n]. Every column c scans the rows in
/// order (in chunks of kColumnChunk columns): every (row of dwte/dwpe, c) is summed over its
/// tokens in increasing n, without atomics, in O(N d) work whatever the vocabulary size.
template <class Space, class T, class DO, class DW>
void embedding_backward(const Space& space, const T& tokens, int seq, const DO& dout,
                        const DW& dwte, const DW& dwpe) {
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(tokens.extent(0)), d = static_cast<int>(dout.extent(1));
  const int chunks = (d + kColumnChunk - 1) / kColumnChunk;
  if (!kc::device_memory_v<Space>) {  // (a plain if: nvcc compiles both shapes of the kernel)
    Kokkos::parallel_for(
        "examoe::dense::embedding_bwd", Kokkos::RangePolicy<Space>(space, 0, chunks), KOKKOS_LAMBDA(const int k) {
          const int c0 = k * kColumnChunk, c1 = kc::min(d, c0 + kColumnChunk);
          for (int i = 0; i < n; ++i) {
            const int t = tokens(i), s = i % seq;
            for (int c = c0; c < c1; ++c) {
              const auto g = dout(i, c);
              dwte(t, c) += g;
              dwpe(s, c) += g;
            }
          }
        });
    return;
  }
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
