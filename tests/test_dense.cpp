// Dense transformer kernels (RMSNorm, causal attention, embedding, cross-entropy):
// forwards against naive host references, backwards against central finite differences,
// attention causality, cross-entropy edge cases, and float instantiations.
#include <examoe/impl/dense_kernels.hpp>

#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace {

namespace dense = examoe::impl::dense;

using Space = Kokkos::DefaultExecutionSpace;
using Mem = Space::memory_space;
template <class S>
using Mat = Kokkos::View<S**, Kokkos::LayoutRight, Mem>;
template <class S>
using CMat = Kokkos::View<const S**, Kokkos::LayoutRight, Mem>;
template <class S>
using Vec = Kokkos::View<S*, Mem>;
using Vd = std::vector<double>;

/// splitmix64, uniform in [a, b).
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ULL + 0x5151ULL) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double uniform(double a = -1, double b = 1) {
    return a + (b - a) * (static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0));
  }
  int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }
};

Vd random_vec(Rng& rng, std::size_t n, double a = -1, double b = 1) {
  Vd v(n);
  for (auto& e : v) e = rng.uniform(a, b);
  return v;
}

// Host <-> device copies of contiguous views (row-major element order).
template <class V, class T>
void upload(const V& view, const std::vector<T>& vals) {
  auto h = Kokkos::create_mirror_view(view);
  ASSERT_EQ(h.span(), vals.size());
  for (std::size_t i = 0; i < vals.size(); ++i)
    h.data()[i] = static_cast<typename V::non_const_value_type>(vals[i]);
  Kokkos::deep_copy(view, h);
}
template <class V>
Vd download(const V& view) {
  auto h = Kokkos::create_mirror_view(view);
  Kokkos::deep_copy(h, view);
  Vd out(h.span());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(h.data()[i]);
  return out;
}
template <class V>
std::vector<int> download_int(const V& view) {
  auto h = Kokkos::create_mirror_view(view);
  Kokkos::deep_copy(h, view);
  return std::vector<int>(h.data(), h.data() + h.span());
}
template <class V>
void fill_nan(const V& view) {
  Kokkos::deep_copy(view, std::numeric_limits<typename V::non_const_value_type>::quiet_NaN());
}

double max_abs(const Vd& a) {
  double m = 0;
  for (double e : a) m = std::max(m, std::fabs(e));
  return m;
}
/// max |a - b| / max |b|
double rel_err(const Vd& a, const Vd& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  const double s = max_abs(b);
  return s > 0 ? m / s : m;
}
Vd diff(const Vd& a, const Vd& b) {
  Vd r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}
double dot(const Vd& a, const Vd& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

/// Central finite differences of loss() with respect to every entry of param.
Vd finite_diff(Vd& param, const std::function<double()>& loss, double eps = 1e-6) {
  Vd g(param.size());
  for (std::size_t i = 0; i < param.size(); ++i) {
    const double p0 = param[i];
    param[i] = p0 + eps;
    const double lp = loss();
    param[i] = p0 - eps;
    const double lm = loss();
    param[i] = p0;
    g[i] = (lp - lm) / (2 * eps);
  }
  return g;
}

/// Analytic gradient vs finite differences: relative (to the largest entry) max error, and
/// not vacuous.
void expect_grad(const char* what, const Vd& analytic, const Vd& fd, double tol = 1e-6) {
  EXPECT_GT(max_abs(analytic), 1e-3) << what << ": gradient is (nearly) all zero";
  EXPECT_LT(rel_err(analytic, fd), tol) << what << ": analytic vs finite differences";
}

// ---------------------------------------------------------------- naive host references

void ref_rmsnorm(const Vd& x, const Vd& g, int n, int d, double eps, Vd& y, Vd& r) {
  y.assign(static_cast<std::size_t>(n) * d, 0);
  r.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    double ss = 0;
    for (int c = 0; c < d; ++c) ss += x[i * d + c] * x[i * d + c];
    r[i] = 1.0 / std::sqrt(ss / d + eps);
    for (int c = 0; c < d; ++c) y[i * d + c] = x[i * d + c] * r[i] * g[c];
  }
}

Vd ref_matmul(const Vd& a, const Vd& b, int n, int kd, int m) {
  Vd c(static_cast<std::size_t>(n) * m, 0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      double s = 0;
      for (int l = 0; l < kd; ++l) s += a[i * kd + l] * b[l * m + j];
      c[i * m + j] = s;
    }
  return c;
}

struct RefAttn {
  Vd q, k, v, p, o, out;
};
RefAttn ref_attention(const Vd& x, const Vd& wq, const Vd& wk, const Vd& wv, const Vd& wo,
                      int B, int S, int H, int d) {
  const int N = B * S, dh = d / H;
  RefAttn r;
  r.q = ref_matmul(x, wq, N, d, d);
  r.k = ref_matmul(x, wk, N, d, d);
  r.v = ref_matmul(x, wv, N, d, d);
  r.p.assign(static_cast<std::size_t>(B) * H * S * S, 0);
  r.o.assign(static_cast<std::size_t>(N) * d, 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < S; ++i) {
        std::vector<double> sc(i + 1);
        double mx = -1e300;
        for (int j = 0; j <= i; ++j) {
          double s = 0;
          for (int c = 0; c < dh; ++c)
            s += r.q[(b * S + i) * d + h * dh + c] * r.k[(b * S + j) * d + h * dh + c];
          sc[j] = s / std::sqrt(static_cast<double>(dh));
          mx = std::max(mx, sc[j]);
        }
        double z = 0;
        for (int j = 0; j <= i; ++j) z += std::exp(sc[j] - mx);
        const std::size_t prow = (static_cast<std::size_t>(b * H + h) * S + i) * S;
        for (int j = 0; j <= i; ++j) r.p[prow + j] = std::exp(sc[j] - mx) / z;
        for (int c = 0; c < dh; ++c) {
          double s = 0;
          for (int j = 0; j <= i; ++j) s += r.p[prow + j] * r.v[(b * S + j) * d + h * dh + c];
          r.o[(b * S + i) * d + h * dh + c] = s;
        }
      }
  r.out = ref_matmul(r.o, wo, N, d, d);
  return r;
}

struct RefCE {
  double loss = 0;
  long long valid = 0;
  std::vector<int> correct;
  Vd dlogits;
};
RefCE ref_cross_entropy(const Vd& logits, const std::vector<int>& tgt, int n, int V,
                        double scale) {
  RefCE r;
  r.correct.assign(n, 0);
  r.dlogits.assign(static_cast<std::size_t>(n) * V, 0);
  for (int i = 0; i < n; ++i) {
    if (tgt[i] < 0) continue;
    ++r.valid;
    double mx = logits[i * V];
    int arg = 0;
    for (int c = 1; c < V; ++c)
      if (logits[i * V + c] > mx) mx = logits[i * V + c], arg = c;
    double z = 0;
    for (int c = 0; c < V; ++c) z += std::exp(logits[i * V + c] - mx);
    r.loss += -(logits[i * V + tgt[i]] - mx - std::log(z));
    r.correct[i] = arg == tgt[i] ? 1 : 0;
    for (int c = 0; c < V; ++c)
      r.dlogits[i * V + c] =
          scale * (std::exp(logits[i * V + c] - mx) / z - (c == tgt[i] ? 1.0 : 0.0));
  }
  return r;
}

// ------------------------------------------------------------------------------- RMSNorm

TEST(Dense, RmsNormForwardMatchesReference) {
  const int n = 13, d = 24;
  const double eps = 1e-5;
  Rng rng(1);
  const Vd x = random_vec(rng, n * d, -2, 2), g = random_vec(rng, d, 0.5, 1.5);
  Mat<double> xv("x", n, d), yv("y", n, d);
  Vec<double> gv("g", d), rv("r", n);
  upload(xv, x);
  upload(gv, g);
  Space space;
  dense::rmsnorm_forward(space, CMat<double>(xv), gv, eps, yv, rv);
  space.fence();
  Vd y, r;
  ref_rmsnorm(x, g, n, d, eps, y, r);
  EXPECT_LT(rel_err(download(yv), y), 1e-12);
  EXPECT_LT(rel_err(download(rv), r), 1e-12);
}

TEST(Dense, RmsNormBackwardFiniteDifference) {
  const int n = 5, d = 7;
  const double eps = 1e-5;
  Rng rng(2);
  Vd x = random_vec(rng, n * d), g = random_vec(rng, d, 0.5, 1.5);
  const Vd R = random_vec(rng, n * d), dg0 = random_vec(rng, d);
  Mat<double> xv("x", n, d), yv("y", n, d), dyv("dy", n, d), dxv("dx", n, d);
  Vec<double> gv("g", d), rv("r", n), dgv("dg", d);
  Space space;
  auto loss = [&] {
    upload(xv, x);
    upload(gv, g);
    dense::rmsnorm_forward(space, xv, gv, eps, yv, rv);
    space.fence();
    return dot(download(yv), R);
  };
  loss();
  upload(dyv, R);
  upload(dgv, dg0);
  fill_nan(dxv);
  dense::rmsnorm_backward(space, xv, gv, rv, dyv, dxv, dgv);
  space.fence();
  const Vd dx = download(dxv), dg = diff(download(dgv), dg0);
  expect_grad("rmsnorm dx", dx, finite_diff(x, loss));
  expect_grad("rmsnorm dg", dg, finite_diff(g, loss));
}

// ----------------------------------------------------------------------------- Attention

/// Device buffers of one attention layer.
struct AttnBuffers {
  int B, S, H, d, N;
  Mat<double> x, wq, wk, wv, wo, q, k, v, p, o, out;
  Mat<double> dout, dx, dwq, dwk, dwv, dwo, dq, dk, dv, dO;
  AttnBuffers(int B_, int S_, int H_, int d_)
      : B(B_), S(S_), H(H_), d(d_), N(B_ * S_),
        x("x", N, d), wq("wq", d, d), wk("wk", d, d), wv("wv", d, d), wo("wo", d, d),
        q("q", N, d), k("k", N, d), v("v", N, d), p("p", B * H * S, S), o("o", N, d),
        out("out", N, d), dout("dout", N, d), dx("dx", N, d), dwq("dwq", d, d),
        dwk("dwk", d, d), dwv("dwv", d, d), dwo("dwo", d, d), dq("dq", N, d), dk("dk", N, d),
        dv("dv", N, d), dO("dO", N, d) {}
  dense::AttentionShape shape() const {
    dense::AttentionShape sh;
    sh.batch = B;
    sh.seq = S;
    sh.heads = H;
    return sh;
  }
  void forward(const Space& space) {
    // const inputs, as the model code will pass them
    dense::attention_forward(space, shape(), CMat<double>(x), CMat<double>(wq), CMat<double>(wk),
                             CMat<double>(wv), CMat<double>(wo), q, k, v, p, o, out);
    space.fence();
  }
  void backward(const Space& space) {
    dense::attention_backward(space, shape(), x, wq, wk, wv, wo, q, k, v, p, o, dout, dx, dwq,
                              dwk, dwv, dwo, dq, dk, dv, dO);
    space.fence();
  }
};

TEST(Dense, AttentionForwardMatchesReference) {
  const int B = 2, S = 7, H = 3, d = 12;
  Rng rng(3);
  AttnBuffers a(B, S, H, d);
  const Vd x = random_vec(rng, B * S * d), wq = random_vec(rng, d * d), wk = random_vec(rng, d * d),
           wv = random_vec(rng, d * d), wo = random_vec(rng, d * d);
  upload(a.x, x);
  upload(a.wq, wq);
  upload(a.wk, wk);
  upload(a.wv, wv);
  upload(a.wo, wo);
  fill_nan(a.p);  // the upper triangle must be written too
  fill_nan(a.o);
  Space space;
  a.forward(space);
  const RefAttn r = ref_attention(x, wq, wk, wv, wo, B, S, H, d);
  EXPECT_LT(rel_err(download(a.q), r.q), 1e-12);
  EXPECT_LT(rel_err(download(a.k), r.k), 1e-12);
  EXPECT_LT(rel_err(download(a.v), r.v), 1e-12);
  EXPECT_LT(rel_err(download(a.p), r.p), 1e-12);
  EXPECT_LT(rel_err(download(a.o), r.o), 1e-12);
  EXPECT_LT(rel_err(download(a.out), r.out), 1e-12);
  // p: exact zeros above the diagonal, rows summing to 1
  const Vd p = download(a.p);
  for (int row = 0; row < B * H * S; ++row) {
    const int i = row % S;
    double s = 0;
    for (int j = 0; j < S; ++j) {
      if (j > i) {
        EXPECT_EQ(p[row * S + j], 0.0);
      }
      s += p[row * S + j];
    }
    EXPECT_NEAR(s, 1.0, 1e-14);
  }
}

TEST(Dense, AttentionBackwardFiniteDifference) {
  const int B = 2, S = 5, H = 2, d = 8, N = B * S;
  Rng rng(4);
  AttnBuffers a(B, S, H, d);
  Vd x = random_vec(rng, N * d), wq = random_vec(rng, d * d, -0.7, 0.7),
     wk = random_vec(rng, d * d, -0.7, 0.7), wv = random_vec(rng, d * d),
     wo = random_vec(rng, d * d);
  const Vd R = random_vec(rng, N * d);
  Vd w0[4];
  for (auto& w : w0) w = random_vec(rng, d * d);  // accumulated into, not overwritten
  Space space;
  auto loss = [&] {
    upload(a.x, x);
    upload(a.wq, wq);
    upload(a.wk, wk);
    upload(a.wv, wv);
    upload(a.wo, wo);
    a.forward(space);
    return dot(download(a.out), R);
  };
  auto run_backward = [&] {
    loss();
    upload(a.dout, R);
    upload(a.dwq, w0[0]);
    upload(a.dwk, w0[1]);
    upload(a.dwv, w0[2]);
    upload(a.dwo, w0[3]);
    for (const auto& s : {a.dx, a.dq, a.dk, a.dv, a.dO}) fill_nan(s);  // all overwritten
    a.backward(space);
    return std::vector<Vd>{download(a.dx), diff(download(a.dwq), w0[0]),
                           diff(download(a.dwk), w0[1]), diff(download(a.dwv), w0[2]),
                           diff(download(a.dwo), w0[3])};
  };
  const std::vector<Vd> g = run_backward();
  // The attention weights are not degenerate (otherwise the softmax path is untested).
  {
    const Vd p = download(a.p);
    double pmin = 1, pmax = 0;
    for (int row = 0; row < B * H * S; ++row)
      for (int j = 0; row % S > 0 && j <= row % S; ++j)  // row i = 0 has p = 1
        pmin = std::min(pmin, p[row * S + j]), pmax = std::max(pmax, p[row * S + j]);
    EXPECT_GT(pmin, 0.02);
    EXPECT_LT(pmax, 0.98);
  }
  expect_grad("attention dx", g[0], finite_diff(x, loss));
  expect_grad("attention dwq", g[1], finite_diff(wq, loss));
  expect_grad("attention dwk", g[2], finite_diff(wk, loss));
  expect_grad("attention dwv", g[3], finite_diff(wv, loss));
  expect_grad("attention dwo", g[4], finite_diff(wo, loss));
  // Deterministic: a second run is bitwise identical.
  const std::vector<Vd> g2 = run_backward();
  for (int t = 0; t < 5; ++t) EXPECT_EQ(g[t], g2[t]) << "gradient " << t;
}

TEST(Dense, AttentionIsCausal) {
  const int B = 2, S = 6, H = 2, d = 8, N = B * S, j = 3;
  Rng rng(5);
  AttnBuffers a(B, S, H, d);
  Vd x = random_vec(rng, N * d);
  upload(a.wq, random_vec(rng, d * d));
  upload(a.wk, random_vec(rng, d * d));
  upload(a.wv, random_vec(rng, d * d));
  upload(a.wo, random_vec(rng, d * d));
  Space space;
  upload(a.x, x);
  a.forward(space);
  const Vd out0 = download(a.out);
  for (int c = 0; c < d; ++c) x[j * d + c] += 0.5 + 0.1 * c;  // batch 0, position j
  upload(a.x, x);
  a.forward(space);
  const Vd out1 = download(a.out);
  for (int row = 0; row < N; ++row) {
    const int b = row / S, s = row % S;
    bool same = true;
    for (int c = 0; c < d; ++c) same = same && out0[row * d + c] == out1[row * d + c];
    if (b == 1 || s < j)
      EXPECT_TRUE(same) << "row b=" << b << " s=" << s << " changed";
    else
      EXPECT_FALSE(same) << "row b=" << b << " s=" << s << " did not change";
  }
}

// ----------------------------------------------------------------------------- Embedding

TEST(Dense, EmbeddingForwardMatchesReference) {
  const int B = 3, S = 5, Smax = 8, V = 11, d = 6, N = B * S;
  Rng rng(6);
  std::vector<int> tok(N);
  for (auto& t : tok) t = rng.below(V);
  const Vd wte = random_vec(rng, V * d), wpe = random_vec(rng, Smax * d);
  Kokkos::View<int*, Mem> tv("tokens", N);
  upload(tv, tok);
  Mat<double> wtev("wte", V, d), wpev("wpe", Smax, d), outv("out", N, d);
  upload(wtev, wte);
  upload(wpev, wpe);
  Space space;
  dense::embedding_forward(space, Kokkos::View<const int*, Mem>(tv), S, CMat<double>(wtev),
                           CMat<double>(wpev), outv);
  space.fence();
  Vd ref(N * d);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < d; ++c) ref[n * d + c] = wte[tok[n] * d + c] + wpe[(n % S) * d + c];
  EXPECT_LT(rel_err(download(outv), ref), 1e-12);
}

TEST(Dense, EmbeddingBackwardFiniteDifference) {
  const int B = 3, S = 4, Smax = 6, V = 9, d = 5, N = B * S;
  Rng rng(7);
  std::vector<int> tok(N);
  for (auto& t : tok) t = rng.below(5);  // repeats; vocabulary rows 5..8 unused
  tok[0] = tok[7] = tok[11] = 2;
  Vd wte = random_vec(rng, V * d), wpe = random_vec(rng, Smax * d);
  const Vd R = random_vec(rng, N * d), dwte0 = random_vec(rng, V * d),
           dwpe0 = random_vec(rng, Smax * d);
  Kokkos::View<int*, Mem> tv("tokens", N);
  upload(tv, tok);
  Kokkos::View<const int*, Mem> ctv = tv;
  Mat<double> wtev("wte", V, d), wpev("wpe", Smax, d), outv("out", N, d), doutv("dout", N, d),
      dwtev("dwte", V, d), dwpev("dwpe", Smax, d);
  Space space;
  auto loss = [&] {
    upload(wtev, wte);
    upload(wpev, wpe);
    dense::embedding_forward(space, ctv, S, wtev, wpev, outv);
    space.fence();
    return dot(download(outv), R);
  };
  upload(doutv, R);
  upload(dwtev, dwte0);
  upload(dwpev, dwpe0);
  dense::embedding_backward(space, ctv, S, CMat<double>(doutv), dwtev, dwpev);
  space.fence();
  const Vd dwte = diff(download(dwtev), dwte0), dwpe = diff(download(dwpev), dwpe0);
  expect_grad("embedding dwte", dwte, finite_diff(wte, loss));
  expect_grad("embedding dwpe", dwpe, finite_diff(wpe, loss));
  // Unused vocabulary rows and positions >= S untouched (bitwise).
  const Vd dwte_abs = download(dwtev), dwpe_abs = download(dwpev);
  for (int i = 5 * d; i < V * d; ++i) EXPECT_EQ(dwte_abs[i], dwte0[i]);
  for (int i = S * d; i < Smax * d; ++i) EXPECT_EQ(dwpe_abs[i], dwpe0[i]);
}

// ------------------------------------------------------------------------- Cross-entropy

TEST(Dense, CrossEntropyMatchesReference) {
  const int n = 9, V = 13;
  const double scale = 0.37;
  Rng rng(8);
  const Vd logits = random_vec(rng, n * V, -4, 4);
  std::vector<int> tgt(n);
  for (auto& t : tgt) t = rng.below(V);
  tgt[2] = -1;
  tgt[6] = -100;
  // make row 4 correct: its target is its argmax
  tgt[4] = static_cast<int>(std::max_element(logits.begin() + 4 * V, logits.begin() + 5 * V) -
                            (logits.begin() + 4 * V));
  Mat<double> lv("logits", n, V), dlv("dlogits", n, V);
  Kokkos::View<int*, Mem> tv("targets", n), cv("correct", n);
  upload(lv, logits);
  upload(tv, tgt);
  fill_nan(dlv);
  Kokkos::deep_copy(cv, 7);
  Space space;
  long long count = -1;
  const double loss = dense::cross_entropy(space, CMat<double>(lv), Kokkos::View<const int*, Mem>(tv),
                                           scale, dlv, cv, &count);
  const RefCE r = ref_cross_entropy(logits, tgt, n, V, scale);
  EXPECT_NEAR(loss, r.loss, 1e-12 * std::fabs(r.loss));
  EXPECT_EQ(count, r.valid);
  EXPECT_EQ(count, n - 2);
  EXPECT_EQ(download_int(cv), r.correct);
  EXPECT_EQ(download_int(cv)[4], 1);
  EXPECT_LT(rel_err(download(dlv), r.dlogits), 1e-12);
  // valid_count is optional
  EXPECT_EQ(dense::cross_entropy(space, lv, tv, scale, dlv, cv), loss);

  // In place (dlogits == logits): the same bits as out of place.
  const Vd out_of_place = download(dlv);
  const double loss_inplace = dense::cross_entropy(space, lv, tv, scale, lv, cv);
  EXPECT_EQ(loss_inplace, loss);
  EXPECT_EQ(download(lv), out_of_place);
}

TEST(Dense, CrossEntropyGradientFiniteDifference) {
  const int n = 6, V = 5;
  const double scale = 1.0 / 3.0;
  Rng rng(9);
  Vd logits = random_vec(rng, n * V, -2, 2);
  const std::vector<int> tgt = {1, -1, 4, 0, -1, 2};
  Mat<double> lv("logits", n, V), dlv("dlogits", n, V);
  Kokkos::View<int*, Mem> tv("targets", n), cv("correct", n);
  upload(tv, tgt);
  Space space;
  auto loss = [&] {
    upload(lv, logits);
    return scale * dense::cross_entropy(space, lv, tv, 1.0, dlv, cv);
  };
  upload(lv, logits);
  dense::cross_entropy(space, lv, tv, scale, dlv, cv);
  space.fence();
  const Vd g = download(dlv);
  expect_grad("cross_entropy dlogits", g, finite_diff(logits, loss));
  for (int i : {1, 4})
    for (int c = 0; c < V; ++c) EXPECT_EQ(g[i * V + c], 0.0) << "ignored row " << i;
}

TEST(Dense, CrossEntropyUniformLogitsAndCounts) {
  const int n = 7, V = 10;
  Mat<double> lv("logits", n, V), dlv("dlogits", n, V);
  Kokkos::View<int*, Mem> tv("targets", n), cv("correct", n);
  Kokkos::deep_copy(lv, 0.75);
  upload(tv, std::vector<int>{0, 3, -1, 9, 0, -1, 5});
  Space space;
  long long count = 0;
  const double loss = dense::cross_entropy(space, lv, tv, 1.0, dlv, cv, &count);
  EXPECT_EQ(count, 5);
  EXPECT_NEAR(loss, 5 * std::log(static_cast<double>(V)), 1e-12);
  // ties go to the lowest index: only the targets 0 count as correct
  EXPECT_EQ(download_int(cv), (std::vector<int>{1, 0, 0, 0, 1, 0, 0}));

  // Argmax with a tie between two maxima (3 and 6): the lower one wins.
  Vd l(n * V, 0.0);
  for (int i = 0; i < n; ++i) l[i * V + 3] = l[i * V + 6] = 2.0;
  upload(lv, l);
  upload(tv, std::vector<int>{3, 6, 3, -1, 0, 3, 6});
  const double loss2 = dense::cross_entropy(space, lv, tv, 1.0, dlv, cv, &count);
  EXPECT_EQ(count, 6);
  EXPECT_EQ(download_int(cv), (std::vector<int>{1, 0, 1, 0, 0, 1, 0}));
  const double z = 8 + 2 * std::exp(2.0);
  EXPECT_NEAR(loss2, 5 * (std::log(z) - 2.0) + std::log(z), 1e-12);

  // Large logits stay finite (stable log-sum-exp).
  Kokkos::deep_copy(lv, 1e4);
  EXPECT_NEAR(dense::cross_entropy(space, lv, tv, 1.0, dlv, cv), 6 * std::log(double(V)), 1e-9);
}

// -------------------------------------------------------------------------------- float

/// Each function instantiated for float (and on row subviews), checked loosely against
/// the double path.
TEST(Dense, FloatInstantiations) {
  const int B = 2, S = 5, H = 2, d = 8, N = B * S, V = 7;
  Rng rng(10);
  const Vd x = random_vec(rng, N * d), g = random_vec(rng, d, 0.5, 1.5);
  const Vd w = random_vec(rng, 4 * d * d, -0.5, 0.5), R = random_vec(rng, N * d);
  std::vector<int> tok(N), tgt(N);
  for (auto& t : tok) t = rng.below(V);
  for (auto& t : tgt) t = rng.below(d);
  tgt[3] = -1;
  Space space;

  auto run = [&](auto zero) {
    using S_ = decltype(zero);
    Mat<S_> xv("x", N, d), yv("y", N, d), dyv("dy", N, d), dxv("dx", N, d);
    Vec<S_> gv("g", d), rv("r", N), dgv("dg", d);
    Mat<S_> W("W", 4 * d, d), dW("dW", 4 * d, d);
    auto blk = [&](const Mat<S_>& m, int i) {
      return Kokkos::subview(m, Kokkos::make_pair(i * d, (i + 1) * d), Kokkos::ALL());
    };
    Mat<S_> q("q", N, d), k("k", N, d), v("v", N, d), o("o", N, d), p("p", B * H * S, S);
    Mat<S_> out("out", N, d), dq("dq", N, d), dk("dk", N, d), dv("dv", N, d), dO("dO", N, d);
    Mat<S_> wte("wte", V, d), wpe("wpe", S, d), dwte("dwte", V, d), dwpe("dwpe", S, d);
    Kokkos::View<int*, Mem> tv("tok", N), tg("tgt", N), cv("correct", N);
    upload(xv, x);
    upload(gv, g);
    upload(W, w);
    upload(dyv, R);
    upload(tv, tok);
    upload(tg, tgt);
    upload(wte, Vd(w.begin(), w.begin() + V * d));
    upload(wpe, Vd(w.begin() + V * d, w.begin() + (V + S) * d));
    dense::AttentionShape sh;
    sh.batch = B;
    sh.seq = S;
    sh.heads = H;
    std::vector<Vd> res;
    dense::rmsnorm_forward(space, xv, gv, 1e-5, yv, rv);
    dense::rmsnorm_backward(space, xv, gv, rv, dyv, dxv, dgv);
    res.push_back(download(yv));
    res.push_back(download(dxv));
    res.push_back(download(dgv));
    dense::attention_forward(space, sh, yv, blk(W, 0), blk(W, 1), blk(W, 2), blk(W, 3), q, k, v,
                             p, o, out);
    dense::attention_backward(space, sh, yv, blk(W, 0), blk(W, 1), blk(W, 2), blk(W, 3), q, k, v,
                              p, o, dyv, dxv, blk(dW, 0), blk(dW, 1), blk(dW, 2), blk(dW, 3), dq,
                              dk, dv, dO);
    res.push_back(download(out));
    res.push_back(download(dxv));
    res.push_back(download(dW));
    dense::embedding_forward(space, tv, S, wte, wpe, out);
    dense::embedding_backward(space, tv, S, dyv, dwte, dwpe);
    res.push_back(download(out));
    res.push_back(download(dwte));
    res.push_back(download(dwpe));
    long long cnt = 0;
    auto logits = Kokkos::subview(xv, Kokkos::make_pair(0, N), Kokkos::ALL());
    const double loss = dense::cross_entropy(space, logits, tg, 0.5, logits, cv, &cnt);
    res.push_back(download(xv));
    res.push_back(Vd{loss, static_cast<double>(cnt)});
    return res;
  };
  const std::vector<Vd> rd = run(0.0), rf = run(0.0f);
  ASSERT_EQ(rd.size(), rf.size());
  for (std::size_t t = 0; t < rd.size(); ++t) {
    EXPECT_GT(max_abs(rd[t]), 1e-3) << "result " << t;
    EXPECT_LT(rel_err(rf[t], rd[t]), 1e-4) << "result " << t;
  }
}

}  // namespace
