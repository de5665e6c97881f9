// The float erf/exp used by the expert activations, against the C library in double; the
// dispatch plan's counting sort against std::stable_sort; the router's top-k against brute force.
#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/router_kernels.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

TEST(Kernels, FloatErfMatchesLibm) {
  double worst = 0;
  for (double x = -12.0; x <= 12.0; x += 1.0 / 4096) {
    const float f = static_cast<float>(x);
    worst = std::max(worst, std::fabs(examoe::impl::erf_fast(f) - std::erf(static_cast<double>(f))));
  }
  EXPECT_LT(worst, 1e-6) << "max |erf_fast - erf|";
  EXPECT_EQ(examoe::impl::erf_fast(0.0f), 0.0f);
  EXPECT_FLOAT_EQ(examoe::impl::erf_fast(10.0f), 1.0f);
  EXPECT_FLOAT_EQ(examoe::impl::erf_fast(-10.0f), -1.0f);
}

TEST(Kernels, FloatExpMatchesLibm) {
  double worst = 0;
  for (double x = -87.0; x <= 88.0; x += 1.0 / 1024) {
    const float f = static_cast<float>(x);
    const double ref = std::exp(static_cast<double>(f));
    worst = std::max(worst, std::fabs(examoe::impl::exp_fast(f) - ref) / ref);
  }
  EXPECT_LT(worst, 3e-7) << "max relative error of exp_fast";
  EXPECT_EQ(examoe::impl::exp_fast(0.0f), 1.0f);
  // Saturates instead of overflowing to inf or producing garbage exponents.
  EXPECT_TRUE(std::isfinite(examoe::impl::exp_fast(1000.0f)));
  EXPECT_GE(examoe::impl::exp_fast(-1000.0f), 0.0f);
  // NaN comes out as NaN (the trainer's non-finite checks must see it), without undefined
  // float-to-int conversions on the way (UBSan runs this in the sanitizer build).
  EXPECT_TRUE(std::isnan(examoe::impl::exp_fast(std::nanf(""))));
  EXPECT_TRUE(std::isnan(examoe::impl::erf_fast(std::nanf(""))));
}

TEST(Kernels, DoubleUsesLibraryFunctions) {
  EXPECT_EQ(examoe::impl::erf_<double>(0.3), std::erf(0.3));
  EXPECT_EQ(examoe::impl::exp_<double>(-1.7), std::exp(-1.7));
}

// The counting sort behind the dispatch plan, against a hand-sorted key list; then the same
// views sorted again with fewer and with zero keys: every output is this call's alone.
TEST(Kernels, StableCountingSortRewritesEveryKeyStart) {
  using Space = Kokkos::DefaultExecutionSpace;
  using IV = Kokkos::View<int*, Space::memory_space>;
  const int K = 4, chunk = 3;
  IV hist("test::hist", 64), perm("test::perm", 16), inv("test::inv", 16), start("test::start", K + 1);
  auto sort = [&](const std::vector<int>& keys_h) {
    const int A = static_cast<int>(keys_h.size());
    IV keys("test::keys", A);
    auto kh = Kokkos::create_mirror_view(keys);
    for (int a = 0; a < A; ++a) kh(a) = keys_h[a];
    Kokkos::deep_copy(keys, kh);
    examoe::impl::stable_counting_sort(Space(), keys, K, chunk, hist,
                                       Kokkos::subview(perm, Kokkos::make_pair(0, A)),
                                       Kokkos::subview(inv, Kokkos::make_pair(0, A)), start);
    Kokkos::fence();
    std::vector<int> p(A), s(K + 1);
    auto ph = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), perm);
    auto sh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), start);
    for (int a = 0; a < A; ++a) p[a] = ph(a);
    for (int i = 0; i <= K; ++i) s[i] = sh(i);
    return std::make_pair(p, s);
  };
  // keys 2 0 3 2 0 1 2 (7 assignments, 3 chunks): stable order by key.
  auto [p1, s1] = sort({2, 0, 3, 2, 0, 1, 2});
  EXPECT_EQ(p1, (std::vector<int>{1, 4, 5, 0, 3, 6, 2}));
  EXPECT_EQ(s1, (std::vector<int>{0, 2, 3, 6, 7}));
  auto [p2, s2] = sort({3, 3});
  EXPECT_EQ(p2, (std::vector<int>{0, 1}));
  EXPECT_EQ(s2, (std::vector<int>{0, 0, 0, 0, 2}));
  auto [p3, s3] = sort({});
  EXPECT_TRUE(p3.empty());
  EXPECT_EQ(s3, (std::vector<int>{0, 0, 0, 0, 0})) << "counts of the previous sort survived";
}

// The counting sort against std::stable_sort of (key, index): random, skewed (most keys on one
// expert), all one key and empty key lists, several sizes and chunkings, with both ways a chunk
// ranks its assignments (the host's running count and the GPUs' per-thread count).
namespace {
std::vector<int> sort_keys_on_device(const std::vector<int>& keys_h, int K, int chunk,
                                     examoe::impl::ChunkRanks ranks, std::vector<int>& inv_out,
                                     std::vector<int>& start_out) {
  using Space = Kokkos::DefaultExecutionSpace;
  using IV = Kokkos::View<int*, Space::memory_space>;
  const int A = static_cast<int>(keys_h.size()), C = (A + chunk - 1) / chunk;
  IV keys("test::keys", A), hist("test::hist", std::max(1, K * C)), perm("test::perm", A), inv("test::inv", A),
      start("test::start", K + 1);
  auto kh = Kokkos::create_mirror_view(keys);
  for (int a = 0; a < A; ++a) kh(a) = keys_h[a];
  Kokkos::deep_copy(keys, kh);
  Kokkos::deep_copy(inv, -7);  // the sort must overwrite every entry
  examoe::impl::stable_counting_sort(Space(), keys, K, chunk, hist, perm, inv, start, ranks);
  Kokkos::fence();
  auto ph = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), perm);
  auto ih = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), inv);
  auto sh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), start);
  std::vector<int> p(A);
  inv_out.assign(A, 0);
  start_out.assign(K + 1, 0);
  for (int a = 0; a < A; ++a) p[a] = ph(a), inv_out[a] = ih(a);
  for (int i = 0; i <= K; ++i) start_out[i] = sh(i);
  return p;
}
}  // namespace

TEST(Kernels, StableCountingSortMatchesStdStableSort) {
  using examoe::impl::ChunkRanks;
  std::mt19937 rng(20261201);
  int cases = 0;
  for (const int A : {0, 1, 7, 255, 256, 257, 1000, 8192}) {
    for (const int K : {1, 5, 64, 256}) {
      for (const char* kind : {"random", "skewed", "one key"}) {
        std::vector<int> keys(A);
        std::uniform_int_distribution<int> any(0, K - 1);
        std::uniform_real_distribution<double> u(0, 1);
        const int hot = any(rng);
        for (int& key : keys) {
          if (std::string(kind) == "random") key = any(rng);
          else if (std::string(kind) == "skewed") key = u(rng) < 0.9 ? hot : any(rng);
          else key = hot;
        }
        // The reference: indices sorted stably by key.
        std::vector<int> ref(A);
        std::iota(ref.begin(), ref.end(), 0);
        std::stable_sort(ref.begin(), ref.end(), [&](int a, int b) { return keys[a] < keys[b]; });
        std::vector<int> ref_start(K + 1, 0);
        for (int key : keys) ++ref_start[key + 1];
        for (int i = 0; i < K; ++i) ref_start[i + 1] += ref_start[i];
        for (const int chunk : {1, 3, 256}) {
          for (const ChunkRanks ranks : {ChunkRanks::running_count, ChunkRanks::team_count, ChunkRanks::automatic}) {
            std::vector<int> inv, start;
            const auto perm = sort_keys_on_device(keys, K, chunk, ranks, inv, start);
            const std::string what = std::string(kind) + " keys, A=" + std::to_string(A) + " K=" + std::to_string(K) +
                                     " chunk=" + std::to_string(chunk) + " ranks=" + std::to_string(static_cast<int>(ranks));
            ASSERT_EQ(perm, ref) << what;
            ASSERT_EQ(start, ref_start) << what;
            for (int s = 0; s < A; ++s) ASSERT_EQ(inv[perm[s]], s) << what << ": inv_perm is not perm's inverse";
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 8 * 4 * 3 * 3 * 3);
}

// Sigmoid scores with a selection bias and group-limited routing: both top-k searches pick
// what a brute force picks (groups by their top-two key sums, then the k best keys inside
// them; ties to the lower group and id), the gates are the chosen scores normalised without
// the bias, and 1 / sum_e s and softmax(u) come out for the backward.
TEST(Kernels, RouterSigmoidBiasGroupsBothWaysMatchBruteForce) {
  using Space = Kokkos::DefaultExecutionSpace;
  using Mem = Space::memory_space;
  using M = Kokkos::View<float**, Kokkos::LayoutRight, Mem>;
  using IM = Kokkos::View<int**, Kokkos::LayoutRight, Mem>;
  std::mt19937 rng(11);
  struct Case { int E, k, G, M; };
  for (const Case c : {Case{8, 2, 4, 1}, Case{8, 2, 4, 2}, Case{7, 3, 3, 2}, Case{64, 4, 8, 3}, Case{6, 2, 6, 4},
                       Case{6, 2, 1, 1}}) {
    const int T = 61, E = c.E, k = c.k;
    std::uniform_int_distribution<int> level(-3, 3);  // few distinct values: ties everywhere
    std::vector<float> z(static_cast<std::size_t>(T) * E), b(E);
    for (float& v : z) v = 0.5f * static_cast<float>(level(rng));
    for (float& v : b) v = 0.125f * static_cast<float>(level(rng));
    examoe::impl::RouterParams rp;
    rp.sigmoid = true;
    rp.groups = c.G;
    rp.topk_groups = c.M;
    std::vector<std::vector<int>> got;
    for (const auto search : {examoe::impl::TopkSearch::insertion, examoe::impl::TopkSearch::team_argmax}) {
      M p("test::p", T, E), g("test::g", T, k);
      Kokkos::View<float*, Mem> lse("test::lse", T);
      IM topk("test::topk", T, k);
      examoe::impl::RouterModeViews<float, Mem> modes;
      Kokkos::View<float*, Mem> bias("test::bias", E);
      modes.q = M("test::q", T, E);
      modes.inv_sum = Kokkos::View<float*, Mem>("test::inv_sum", T);
      modes.chosen = IM("test::chosen", T, c.M);
      auto ph = Kokkos::create_mirror_view(p);
      for (int t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) ph(t, e) = z[static_cast<std::size_t>(t) * E + e];
      Kokkos::deep_copy(p, ph);
      auto bh = Kokkos::create_mirror_view(bias);
      for (int e = 0; e < E; ++e) bh(e) = b[e];
      Kokkos::deep_copy(bias, bh);
      modes.bias = bias;
      examoe::impl::router_softmax_topk(Space(), rp, p, lse, topk, g, modes, search);
      Kokkos::fence();
      auto s = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p);
      auto tk = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), topk);
      auto gh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), g);
      auto nh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), modes.inv_sum);
      auto qh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), modes.q);
      std::vector<int> all;
      for (int t = 0; t < T; ++t) {
        const float* zt = &z[static_cast<std::size_t>(t) * E];
        float ssum = 0, qsum = 0;
        for (int e = 0; e < E; ++e) {
          EXPECT_NEAR(s(t, e), 1 / (1 + std::exp(-zt[e])), 1e-6);
          ssum += s(t, e);
          qsum += qh(t, e);
        }
        EXPECT_NEAR(nh(t), 1 / ssum, 1e-6);
        EXPECT_NEAR(qsum, 1.0f, 1e-5);
        // brute force: group g = [first[g], first[g+1]), the first E % G one larger
        std::vector<int> first(1, 0);
        for (int gg = 0; gg < c.G; ++gg) first.push_back(first.back() + E / c.G + (gg < E % c.G ? 1 : 0));
        std::vector<float> key(E), score(c.G);
        for (int e = 0; e < E; ++e) key[e] = s(t, e) + b[e];
        for (int gg = 0; gg < c.G; ++gg) {
          std::vector<float> v(key.begin() + first[gg], key.begin() + first[gg + 1]);
          std::sort(v.rbegin(), v.rend());
          score[gg] = v.size() > 1 ? v[0] + v[1] : v[0];
        }
        std::vector<int> gorder(c.G);
        std::iota(gorder.begin(), gorder.end(), 0);
        std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int b2) { return score[a] > score[b2]; });
        std::vector<int> order;
        for (int e = 0; e < E; ++e)
          for (int j = 0; j < c.M; ++j)
            if (e >= first[gorder[j]] && e < first[gorder[j] + 1]) order.push_back(e);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b2) { return key[a] > key[b2]; });
        float chosen = 0;
        for (int j = 0; j < k; ++j) chosen += s(t, order[j]);
        for (int j = 0; j < k; ++j) {
          ASSERT_EQ(tk(t, j), order[j]) << "E=" << E << " G=" << c.G << " M=" << c.M << " token " << t;
          EXPECT_EQ(gh(t, j), s(t, order[j]) / chosen);
          all.push_back(tk(t, j));
        }
      }
      got.push_back(all);
    }
    EXPECT_EQ(got[0], got[1]);
  }
}

// The router's top-k both ways (one pass keeping the best k; k team-wide argmax passes)
// against a brute-force order (value descending, then id ascending), on logits with many
// exact ties; the gates are the chosen probabilities renormalized; both paths give the same
// probabilities and lse bit for bit (also with temperature and jitter).
TEST(Kernels, RouterTopkBothWaysMatchBruteForce) {
  using Space = Kokkos::DefaultExecutionSpace;
  using M = Kokkos::View<float**, Kokkos::LayoutRight, Space::memory_space>;
  using IM = Kokkos::View<int**, Kokkos::LayoutRight, Space::memory_space>;
  std::mt19937 rng(7);
  for (const int E : {1, 2, 8, 64, 256}) {
    for (const int k : {1, 2, 4, 8}) {
      if (k > E) continue;
      const int T = 97;
      std::uniform_int_distribution<int> level(0, 5);  // few distinct logits: ties everywhere
      std::vector<float> z(static_cast<std::size_t>(T) * E);
      for (float& v : z) v = 0.5f * static_cast<float>(level(rng));
      examoe::impl::RouterParams rp;
      if (E == 64) {  // temperature and jitter: u is rewritten before the softmax
        rp.inv_temperature = 1 / 0.7;
        rp.jitter = 0.3;
        rp.seed = 5;
      }
      std::vector<std::vector<int>> got;
      std::vector<std::vector<float>> probs;
      for (const auto search : {examoe::impl::TopkSearch::insertion, examoe::impl::TopkSearch::team_argmax}) {
        M p("test::p", T, E), g("test::g", T, k);
        Kokkos::View<float*, Space::memory_space> lse("test::lse", T);
        IM topk("test::topk", T, k);
        auto ph = Kokkos::create_mirror_view(p);
        for (int t = 0; t < T; ++t)
          for (int e = 0; e < E; ++e) ph(t, e) = z[static_cast<std::size_t>(t) * E + e];
        Kokkos::deep_copy(p, ph);
        examoe::impl::router_softmax_topk(Space(), rp, p, lse, topk, g, search);
        Kokkos::fence();
        auto pr = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p);
        auto tk = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), topk);
        auto gh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), g);
        auto lh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), lse);
        std::vector<int> all;
        std::vector<float> pl;
        for (int t = 0; t < T; ++t) {
          for (int e = 0; e < E; ++e) pl.push_back(pr(t, e));
          pl.push_back(lh(t));
          std::vector<int> order(E);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pr(t, a) > pr(t, b); });
          float chosen = 0;
          for (int j = 0; j < k; ++j) chosen += pr(t, order[j]);
          for (int j = 0; j < k; ++j) {
            ASSERT_EQ(tk(t, j), order[j]) << "E=" << E << " k=" << k << " token " << t << " slot " << j;
            EXPECT_EQ(gh(t, j), pr(t, order[j]) / chosen);
            all.push_back(tk(t, j));
          }
        }
        got.push_back(all);
        probs.push_back(pl);
      }
      EXPECT_EQ(got[0], got[1]);
      EXPECT_EQ(probs[0], probs[1]) << "p and lse differ between the one-thread and the team path";
    }
  }
}
