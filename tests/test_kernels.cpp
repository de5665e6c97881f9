// The float erf/exp used by the expert activations, against the C library in double; the host
// vector loops of the activations against their element functions, bit for bit; the
// dispatch plan's counting sort against std::stable_sort; the router's top-k against brute force;
// the host paths of the gate gradients and the router backward against their team kernels.
#include <examoe/impl/dispatch_kernels.hpp>
#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/host_blas.hpp>
#include <examoe/impl/router_kernels.hpp>
#include <examoe/impl/sums_in_order.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

TEST(Kernels, FloatErfcxMatchesDouble) {
  // erfcx(a) = exp(a^2) erfc(a) over [0, 9.4], where exp(-a^2) is a normal float.
  double worst = 0, at = 0;
  for (double x = 0.0; x <= 9.4; x += 1.0 / 4096) {
    const float f = static_cast<float>(x);
    const double a = f, ref = std::exp(a * a) * std::erfc(a);
    const double err = std::fabs(examoe::impl::erfcx_fast(f) - ref) / ref;
    if (err > worst) worst = err, at = a;
  }
  EXPECT_LT(worst, 4e-7) << "max relative error of erfcx_fast, at " << at;
  EXPECT_NEAR(examoe::impl::erfcx_fast(0.0f), 1.0f, 3e-7f);
  EXPECT_EQ(examoe::impl::erfcx_fast(std::numeric_limits<float>::infinity()), -2.22230792e-05f)
      << "t = 0 at infinity: the polynomial's constant term";
  EXPECT_TRUE(std::isnan(examoe::impl::erfcx_fast(std::nanf(""))));
}

TEST(Kernels, FloatGeluAccurateInBothTails) {
  // gelu(s) = s Phi(s) and gelu'(s) = Phi(s) + s phi(s) against double precision, relative to
  // the value (gelu) and to |Phi| + |s phi| (gelu', which crosses zero near s = -0.75), for
  // every s whose gelu is a normal float: in the left tail, 1 + erf(s/sqrt2) would cancel
  // (gelu(-5) lost all its digits that way before the erfcx form).
  double worst_a = 0, worst_g = 0, at_a = 0, at_g = 0;
  for (double x = -13.0; x <= 13.0; x += 1.0 / 1024) {
    const float s = static_cast<float>(x);
    float a = 0, g = 0;
    examoe::impl::gelu_element(s, a, g);
    const double v = s, Phi = 0.5 * std::erfc(-v / std::sqrt(2.0)), phi = std::exp(-0.5 * v * v) / std::sqrt(2 * 3.14159265358979323846);
    const double ref_a = v * Phi, ref_g = Phi + v * phi;
    if (std::fabs(ref_a) < 1e-36) continue;
    const double ea = std::fabs(a - ref_a) / std::fabs(ref_a), eg = std::fabs(g - ref_g) / (std::fabs(Phi) + std::fabs(v * phi));
    if (ea > worst_a) worst_a = ea, at_a = v;
    if (eg > worst_g) worst_g = eg, at_g = v;
  }
  EXPECT_LT(worst_a, 8e-7) << "max relative error of gelu, at " << at_a;
  EXPECT_LT(worst_g, 8e-7) << "max relative error of gelu', at " << at_g;
  float a = 1, g = 1;
  examoe::impl::gelu_element(std::nanf(""), a, g);
  EXPECT_TRUE(std::isnan(a) && std::isnan(g)) << "NaN in, NaN out (the non-finite checks must see it)";
  examoe::impl::gelu_element(-30.0f, a, g);
  EXPECT_EQ(a, -0.0f);
  EXPECT_EQ(g, 0.0f);
  examoe::impl::gelu_element(30.0f, a, g);
  EXPECT_EQ(a, 30.0f);
  EXPECT_EQ(g, 1.0f);
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
  // exp_nonpositive: the same values where both apply, NaN as exp(-87) (gelu_element's other
  // operands carry its NaN).
  for (double x = -90.0; x <= 0.0; x += 1.0 / 64)
    ASSERT_EQ(examoe::impl::exp_nonpositive(static_cast<float>(x)), examoe::impl::exp_fast(static_cast<float>(x))) << x;
  EXPECT_EQ(examoe::impl::exp_nonpositive(std::nanf("")), examoe::impl::exp_fast(-87.0f));
}

TEST(Kernels, DoubleUsesLibraryFunctions) {
  EXPECT_EQ(examoe::impl::exp_<double>(-1.7), std::exp(-1.7));
  double a = 0, g = 0;
  examoe::impl::gelu_element(0.3, a, g);
  EXPECT_EQ(a, 0.3 * (0.5 * (1 + std::erf(0.3 * 0.70710678118654752440))));
}

// The host vector loops (AVX-512, AVX2 or baseline, whichever this CPU runs) give bitwise the
// results (NaN for NaN) of the element functions the device kernels call, at every length (vector bodies and
// remainders) and for special values; and through the Kokkos entry points, row by row.
namespace {
/// The bits of f; every NaN as one value (IEEE leaves open which operand's NaN an operation
/// passes on, and compilers order commutative operands differently at different widths).
std::uint32_t bits_of(float f) {
  if (std::isnan(f)) return 0x7fc00000u;
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
std::vector<float> activation_inputs(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-9.0f, 9.0f);
  const float special[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::nanf(""), -std::nanf("0x1234"), 1e30f, -1e30f, 1e-40f, -87.5f, 88.5f, 4.0f, -4.0f};
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i % 5 == 3 ? special[(i / 5) % 13] : u(gen);
  return v;
}
}  // namespace

// The softmax's exponential (exp_nonpositive_or_nan) is exp_fast bit for bit wherever it
// applies: every x <= 0, both signs of zero, -inf, the clamp at -87, and NaN.
TEST(Kernels, SoftmaxExpIsExpFastBitwise) {
  for (double x = -100; x <= 0; x += 0.0137)
    ASSERT_EQ(bits_of(examoe::impl::exp_nonpositive_or_nan(static_cast<float>(x))),
              bits_of(examoe::impl::exp_fast(static_cast<float>(x))))
        << x;
  for (const float x : {0.0f, -0.0f, -std::numeric_limits<float>::infinity(), -87.0f, -86.99999f,
                        -std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::max()})
    EXPECT_EQ(bits_of(examoe::impl::exp_nonpositive_or_nan(x)), bits_of(examoe::impl::exp_fast(x))) << x;
  EXPECT_TRUE(std::isnan(examoe::impl::exp_nonpositive_or_nan(std::nanf(""))));
}

TEST(HostVectorKernels, BitwiseTheElementFunctionsAtEveryLength) {
  using namespace examoe::impl;
  std::printf("host vector loops run with: %s\n", host::vector_isa());
  for (std::size_t n : {0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100, 2053}) {
    const auto s0 = activation_inputs(n, 7 + static_cast<unsigned>(n)), u0 = activation_inputs(n, 99);
    // GELU: a and gelu'
    std::vector<float> s = s0, a(n), a_ref(n), g_ref(n);
    host::gelu_forward(s.data(), a.data(), n);
    for (std::size_t c = 0; c < n; ++c) gelu_element(s0[c], a_ref[c], g_ref[c]);
    for (std::size_t c = 0; c < n; ++c) {
      ASSERT_EQ(bits_of(a[c]), bits_of(a_ref[c])) << "gelu(" << s0[c] << "), n " << n;
      ASSERT_EQ(bits_of(s[c]), bits_of(g_ref[c])) << "gelu'(" << s0[c] << "), n " << n;
    }
    // GELU backward: da *= gelu'
    std::vector<float> dg = u0;
    host::gelu_backward(g_ref.data(), dg.data(), n);
    for (std::size_t c = 0; c < n; ++c) ASSERT_EQ(bits_of(dg[c]), bits_of(u0[c] * g_ref[c])) << "n " << n;
    // SwiGLU forward and backward
    std::vector<float> y(n), da = u0, du(n);
    host::swiglu_forward(s0.data(), u0.data(), y.data(), n);
    host::swiglu_backward(s0.data(), u0.data(), da.data(), du.data(), n);
    for (std::size_t c = 0; c < n; ++c) {
      ASSERT_EQ(bits_of(y[c]), bits_of(swiglu_element(s0[c], u0[c]))) << "swiglu(" << s0[c] << "), n " << n;
      float dg = u0[c], dv = 0;
      swiglu_backward_element(s0[c], u0[c], dg, dv);
      ASSERT_EQ(bits_of(da[c]), bits_of(dg)) << "dg at " << s0[c] << ", n " << n;
      ASSERT_EQ(bits_of(du[c]), bits_of(dv)) << "du at " << s0[c] << ", n " << n;
    }
  }
  // gelu itself, against double precision (finite inputs): the loops compute the right thing.
  std::vector<float> s = activation_inputs(4096, 3), a(4096);
  const std::vector<float> s0 = s;
  host::gelu_forward(s.data(), a.data(), s.size());
  for (std::size_t c = 0; c < s.size(); ++c) {
    if (!std::isfinite(s0[c]) || std::fabs(s0[c]) > 50) continue;
    const double x = s0[c], ref = 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    ASSERT_NEAR(a[c], ref, 2e-6 * std::max(1.0, std::fabs(ref))) << "gelu(" << x << ")";
  }
}

// The router's row loops against one scalar pass each, on rows of every length around the
// vector widths, with NaN, infinities, signed zeros and ties: row_max ignores NaN as the Max
// reduction does (the lowest float if every value is NaN), first_greater finds the first
// value above x from `begin`, exp_shifted is exp_fast element by element.
TEST(HostVectorKernels, RouterRowLoopsMatchOneScalarPass) {
  using namespace examoe::impl;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> pick(0, 9);
  int cases = 0;
  for (int n : {0, 1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 255, 256, 257}) {
    for (int variant = 0; variant < 6; ++variant) {
      std::vector<float> row(n);
      for (float& v : row) {
        const int r = pick(rng);
        v = r == 0 ? nan : r == 1 ? -0.0f : r == 2 ? 0.0f : 0.25f * static_cast<float>(pick(rng)) - 1.0f;
      }
      if (variant == 1) std::fill(row.begin(), row.end(), nan);         // nothing compares
      if (variant == 2 && n > 0) row[n - 1] = inf;                      // the maximum last
      if (variant == 3) std::fill(row.begin(), row.end(), -inf);        // the lowest everywhere
      if (variant == 4 && n > 0) row[n / 2] = 7.0f;                     // one maximum inside
      std::vector<double> rowd(row.begin(), row.end());
      float m = std::numeric_limits<float>::lowest();
      double md = std::numeric_limits<double>::lowest();
      for (int e = 0; e < n; ++e) {
        m = row[e] > m ? row[e] : m;
        md = rowd[e] > md ? rowd[e] : md;
      }
      const std::string what = "n " + std::to_string(n) + " variant " + std::to_string(variant);
      EXPECT_EQ(host::row_max(row.data(), n), m) << what;  // +0 == -0: the sign is free
      EXPECT_EQ(host::row_max(rowd.data(), n), md) << what;
      for (float x : {-2.0f, -0.0f, 0.5f, 1.25f, nan}) {
        for (int begin : {0, 1, 16, 17, n}) {
          if (begin > n) continue;
          int ref = n;
          for (int e = begin; e < n; ++e)
            if (row[e] > x) {
              ref = e;
              break;
            }
          ASSERT_EQ(host::first_greater(row.data(), begin, n, x), ref) << what << " x " << x << " begin " << begin;
          ASSERT_EQ(host::first_greater(rowd.data(), begin, n, static_cast<double>(x)), ref) << what;
          ++cases;
        }
      }
      std::vector<float> u = row;
      const float shift = m;  // the row's max, as the softmax shifts (inf - inf: NaN)
      host::exp_shifted(u.data(), shift, n);
      for (int e = 0; e < n; ++e) ASSERT_EQ(bits_of(u[e]), bits_of(exp_fast(row[e] - shift))) << what << " e " << e;
    }
  }
  EXPECT_GT(cases, 1000);
}

// The eight sums at once (host::sums_in_order_8: AVX2 blocks of 8 x 8 terms where the CPU has
// it) against sums_in_order, bit for bit: lengths around the block width, the three kinds of
// term (a, a b, a float(w)), signed zeros, infinities and NaN among the values.
TEST(HostVectorKernels, EightSumsInOrderMatchSumsInOrder) {
  using namespace examoe::impl;
  std::mt19937 rng(23);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, 40);
  for (const int n : {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 256, 259}) {
    std::vector<std::vector<float>> a(8, std::vector<float>(n)), b(8, std::vector<float>(n));
    std::vector<double> w(n);
    for (int j = 0; j < 8; ++j)
      for (int c = 0; c < n; ++c) {
        const int r = pick(rng);
        a[j][c] = r == 0 ? -0.0f : r == 1 ? std::numeric_limits<float>::infinity() : u(rng);
        b[j][c] = r == 2 ? std::nanf("") : u(rng);
      }
    for (double& v : w) v = 1e-3 * static_cast<double>(u(rng)) + 1e-12;  // not a float: rounded per term
    const float* ap[8];
    const float* bp[8];
    for (int j = 0; j < 8; ++j) {
      ap[j] = a[j].data();
      bp[j] = b[j].data();
    }
    for (int kind = 0; kind < 3; ++kind) {
      float got[8], want[8];
      host::sums_in_order_8(ap, kind == 1 ? bp : nullptr, kind == 2 ? w.data() : nullptr, n, got);
      sums_in_order(
          8, n,
          [&](const int j, const int c) -> float {
            return kind == 0 ? a[j][c] : kind == 1 ? a[j][c] * b[j][c] : a[j][c] * static_cast<float>(w[c]);
          },
          want);
      for (int j = 0; j < 8; ++j)
        ASSERT_EQ(bits_of(got[j]), bits_of(want[j])) << "n " << n << " kind " << kind << " sum " << j;
    }
  }
}

// The finite check's scan against std::isfinite element by element: one or two non-finite
// values (NaN, +-inf, a NaN with payload) anywhere around the 256-element blocks and the
// vector widths, denormals and the largest finite values (finite), in float and double.
TEST(HostVectorKernels, FirstNonfiniteMatchesIsfinite) {
  using examoe::impl::host::first_nonfinite;
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::quiet_NaN()};
  std::mt19937 rng(9);
  int cases = 0;
  for (std::size_t n : {0, 1, 15, 16, 17, 255, 256, 257, 511, 512, 1000}) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i)
      v[i] = i % 3 == 0 ? std::numeric_limits<float>::max() * (i % 2 ? -1.0f : 1.0f)
                        : i % 3 == 1 ? std::numeric_limits<float>::denorm_min() : 0.5f * static_cast<float>(i);
    std::vector<double> vd(v.begin(), v.end());
    if (n > 0) vd[0] = std::numeric_limits<double>::max();  // finite in double only
    ASSERT_EQ(first_nonfinite(v.data(), n), n) << n;  // all finite
    ASSERT_EQ(first_nonfinite(vd.data(), n), n) << n;
    for (int trial = 0; trial < 40 && n > 0; ++trial) {
      std::vector<float> w = v;
      std::vector<double> wd = vd;
      const std::size_t a = std::uniform_int_distribution<std::size_t>(0, n - 1)(rng);
      const std::size_t b = trial % 2 ? std::uniform_int_distribution<std::size_t>(0, n - 1)(rng) : a;
      w[a] = bad[trial % 4];
      w[b] = bad[(trial + 1) % 4];
      wd[a] = static_cast<double>(w[a]);
      wd[b] = static_cast<double>(w[b]);
      std::size_t ref = n;
      for (std::size_t i = 0; i < n; ++i)
        if (!std::isfinite(w[i])) {
          ref = i;
          break;
        }
      ASSERT_EQ(ref, std::min(a, b));
      ASSERT_EQ(first_nonfinite(w.data(), n), ref) << "n " << n << " at " << a << ", " << b;
      ASSERT_EQ(first_nonfinite(wd.data(), n), ref) << "n " << n << " at " << a << ", " << b;
      ++cases;
    }
  }
  EXPECT_GT(cases, 300);
}

TEST(HostVectorKernels, KokkosEntryPointsGoRowByRow) {
  using Space = Kokkos::DefaultHostExecutionSpace;
  using M = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  const int rows = 5, h = 37;
  const auto in = activation_inputs(rows * h, 11), in_u = activation_inputs(rows * h, 12);
  M s("s", rows, h), a("a", rows, h), u("u", rows, h), y("y", rows, h), da("da", rows, h), du("du", rows, h);
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < h; ++c) {
      s(i, c) = in[i * h + c];
      u(i, c) = in_u[i * h + c];
      da(i, c) = in_u[i * h + c];
    }
  examoe::impl::swiglu_forward(Space(), s, u, y);
  examoe::impl::swiglu_backward(Space(), s, u, da, du);
  examoe::impl::gelu_forward(Space(), s, a);
  M dgelu("dgelu", rows, h);
  Kokkos::deep_copy(dgelu, u);
  examoe::impl::gelu_backward(Space(), s, dgelu);
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < h; ++c) {
      const float x = in[i * h + c], uv = in_u[i * h + c];
      float ar, gr, dg = uv, dv = 0;
      examoe::impl::gelu_element(x, ar, gr);
      examoe::impl::swiglu_backward_element(x, uv, dg, dv);
      ASSERT_EQ(bits_of(a(i, c)), bits_of(ar)) << i << "," << c;
      ASSERT_EQ(bits_of(s(i, c)), bits_of(gr)) << i << "," << c;
      ASSERT_EQ(bits_of(dgelu(i, c)), bits_of(uv * gr)) << i << "," << c;
      ASSERT_EQ(bits_of(y(i, c)), bits_of(examoe::impl::swiglu_element(x, uv))) << i << "," << c;
      ASSERT_EQ(bits_of(da(i, c)), bits_of(dg)) << i << "," << c;
      ASSERT_EQ(bits_of(du(i, c)), bits_of(dv)) << i << "," << c;
    }
}

// The host BLAS check: a warning exactly where OpenBLAS's kernels lack AVX2 on a CPU that has
// it, naming the OPENBLAS_CORETYPE that fits; and the core this process runs, as OpenBLAS's
// own build line names it.
TEST(HostBlas, WarnsWhereTheKernelsAreNarrowerThanTheCpu) {
  using examoe::impl::host::blas_core_warning;
  const std::string config = "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64";
  const std::string w = blas_core_warning("Prescott", "avx512f", config);
  EXPECT_NE(w.find("'Prescott' kernels"), std::string::npos) << w;
  EXPECT_NE(w.find("AVX-512"), std::string::npos) << w;
  EXPECT_NE(w.find("OPENBLAS_CORETYPE=SkylakeX"), std::string::npos) << w;
  EXPECT_NE(w.find("(" + config + ")"), std::string::npos) << w;
  const std::string w2 = blas_core_warning("Nehalem", "avx2", "");
  EXPECT_NE(w2.find("OPENBLAS_CORETYPE=Haswell"), std::string::npos) << w2;
  EXPECT_NE(w2.find("AVX2"), std::string::npos) << w2;
  EXPECT_EQ(w2.find("()"), std::string::npos) << w2;
  EXPECT_NE(blas_core_warning("Sandybridge", "avx2", ""), "");
  // Nothing to warn about: kernels as wide as the CPU's vectors (any case), a CPU without AVX2,
  // or a BLAS that is not OpenBLAS.
  for (const char* core : {"Haswell", "Zen", "SkylakeX", "skylakex", "Cooperlake", "SapphireRapids"}) {
    EXPECT_EQ(blas_core_warning(core, "avx512f", config), "") << core;
    EXPECT_EQ(blas_core_warning(core, "avx2", config), "") << core;
  }
  EXPECT_EQ(blas_core_warning("Prescott", "baseline", config), "");
  EXPECT_EQ(blas_core_warning("", "avx512f", ""), "");

  // A GEMM through Kokkos Kernels first, so that this process has loaded the BLAS it uses.
  using M = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  M a("a", 2, 2), b("b", 2, 2), c("c", 2, 2);
  a(0, 0) = 1, a(0, 1) = 2, a(1, 0) = 3, a(1, 1) = 4;
  b(0, 0) = 5, b(0, 1) = 6, b(1, 0) = 7, b(1, 1) = 8;
  examoe::impl::kc::gemm(Kokkos::DefaultHostExecutionSpace(), "N", "N", 1.0f, a, b, 0.0f, c);
  EXPECT_EQ(c(0, 0), 19.0f);
  EXPECT_EQ(c(0, 1), 22.0f);
  EXPECT_EQ(c(1, 0), 43.0f);
  EXPECT_EQ(c(1, 1), 50.0f);
  const std::string core = examoe::impl::host::blas_core(), build = examoe::impl::host::blas_config();
  std::printf("host BLAS: %s\n", build.empty() ? "not OpenBLAS" : build.c_str());
  if (!build.empty()) {
    EXPECT_FALSE(core.empty());
    EXPECT_NE(build.find(core), std::string::npos) << build << " does not name " << core;
  }
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
      for (const int T : {0, 1, 8, 97}) {  // around the host path's blocks of tokens
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
}

namespace {
// v filled with random finite values in [-2, 2), through a host mirror.
template <class V>
void fill_random(const V& v, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-2, 2);
  auto h = Kokkos::create_mirror_view(v);
  auto* data = h.data();
  for (std::size_t i = 0; i < h.span(); ++i) data[i] = static_cast<typename V::non_const_value_type>(u(rng));
  Kokkos::deep_copy(v, h);
}
template <class V>
auto on_host(const V& v) {
  return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
}
/// Random return locations of assignments (combine_rows, gate_grads) in a host mirror of loc:
/// a fifth dropped, two fifths rows kept on this rank and two fifths rows come back, of `rows`.
template <class L>
auto random_return_locations(const L& loc, int rows, std::mt19937& rng) {
  auto loch = Kokkos::create_mirror_view(loc);
  std::uniform_int_distribution<int> kind(0, 4), row(0, rows - 1);
  for (std::size_t a = 0; a < loch.extent(0); ++a) {
    const int c = kind(rng);
    loch(a) = c == 0 ? examoe::impl::kDroppedRow : c <= 2 ? row(rng) : -1 - row(rng);
  }
  return loch;
}
}  // namespace

// Gate gradients on a host backend (kSumsInOrder assignments at once) against the team kernel
// and against one plain loop per assignment, bit for bit (on a GPU, where both calls run the
// team kernel, against the loop to rounding): dropped assignments (0 even where dout holds inf),
// rows kept on this rank and rows come back, at assignment counts around the block size and
// several d; float and double.
template <class S>
void check_gate_grads_both_ways() {
  using Space = Kokkos::DefaultExecutionSpace;
  using M = Kokkos::View<S**, Kokkos::LayoutRight, Space::memory_space>;
  std::mt19937 rng(11);
  for (const int d : {1, 7, 128}) {
    for (const int k : {1, 2, 3}) {
      for (const int T : {0, 1, 5, 8, 37, 64, 3}) {
        const int A = T * k, rows = A + 1;
        M ye("test::ye", rows, d), back("test::back", rows, d), dout("test::dout", T, d);
        M dg_host("test::dg_host", T, k), dg_team("test::dg_team", T, k);
        Kokkos::View<int*, Space::memory_space> loc("test::loc", A);
        fill_random(ye, rng);
        fill_random(back, rng);
        fill_random(dout, rng);
        auto douth = on_host(dout);
        if (T > 2) douth(2, 0) = std::numeric_limits<S>::infinity();  // must not reach a dropped one
        Kokkos::deep_copy(dout, douth);
        auto loch = random_return_locations(loc, rows, rng);
        if (T > 2) loch(2 * k) = examoe::impl::kDroppedRow;
        Kokkos::deep_copy(loc, loch);
        examoe::impl::gate_grads(Space(), loc, k, ye, back, dout, dg_host);
        examoe::impl::gate_grads(Space(), loc, k, ye, back, dout, dg_team, /*team_kernel=*/true);
        Kokkos::fence();
        const auto yh = on_host(ye), bh = on_host(back), gh = on_host(dg_host), gt = on_host(dg_team);
        for (int a = 0; a < A; ++a) {
          const int t = a / k, l = loch(a);
          S want = 0, size = 0;
          if (l != examoe::impl::kDroppedRow)
            for (int c = 0; c < d; ++c) {
              const S term = douth(t, c) * (l >= 0 ? yh(l, c) : bh(-1 - l, c));
              want += term;
              size += std::abs(term);
            }
          const S got = gh(t, a % k);
          if constexpr (!examoe::impl::kc::device_memory_v<Space>)  // host: the same sum in order
            EXPECT_EQ(std::memcmp(&got, &want, sizeof(S)), 0)
                << "d=" << d << " k=" << k << " T=" << T << " assignment " << a << ": " << got << " vs " << want;
          else if (!std::isfinite(want))  // a GPU team's reduction adds in another (fixed) order
            EXPECT_EQ(got, want) << "assignment " << a;
          else
            EXPECT_NEAR(got, want, (sizeof(S) == 4 ? 1e-5 : 1e-13) * size) << "assignment " << a;
          EXPECT_EQ(std::memcmp(&got, &gt(t, a % k), sizeof(S)), 0) << "host and team paths differ";
        }
      }
    }
  }
}
TEST(Kernels, GateGradsHostSumsMatchTheTeamKernelBitwise) {
  check_gate_grads_both_ways<float>();
  check_gate_grads_both_ways<double>();
}

// The combine on a host backend (a vector loop per token) against the team kernel and against
// a plain loop per element, bit for bit (on a GPU, where both calls run the team kernel, the
// same): dropped assignments, rows kept on this rank and rows come back, gates or none, into
// a fresh output or added to it, d around the vector widths; float and double. Gates of 0 and
// -0 (a product of -0 that the first row's 0 + w v turns into +0) are among the weights.
template <class S>
void check_combine_both_ways() {
  using Space = Kokkos::DefaultExecutionSpace;
  using M = Kokkos::View<S**, Kokkos::LayoutRight, Space::memory_space>;
  std::mt19937 rng(17);
  for (const int d : {1, 15, 16, 128, 131}) {
    for (const int k : {1, 2, 3}) {
      for (const int T : {0, 1, 9, 40}) {
        for (const bool weighted : {true, false}) {
          for (const bool accumulate : {false, true}) {
            const int A = T * k, rows = A + 1;
            M ye("test::ye", rows, d), back("test::back", rows, d), gates("test::gates", T, k);
            M out_host("test::out_host", T, d), out_team("test::out_team", T, d);
            Kokkos::View<int*, Space::memory_space> loc("test::loc", A);
            fill_random(ye, rng);
            fill_random(back, rng);
            fill_random(gates, rng);
            fill_random(out_host, rng);
            Kokkos::deep_copy(out_team, out_host);
            auto gh = on_host(gates);
            if (T > 1) gh(1, 0) = S(-0.0);
            if (T > 2) gh(2, k - 1) = S(0);
            Kokkos::deep_copy(gates, gh);
            auto before = Kokkos::create_mirror(out_host);  // a copy (on_host may alias a host view)
            Kokkos::deep_copy(before, out_host);
            auto loch = random_return_locations(loc, rows, rng);
            Kokkos::deep_copy(loc, loch);
            examoe::impl::combine_rows(Space(), loc, k, gates, weighted, ye, back, accumulate, out_host);
            examoe::impl::combine_rows(Space(), loc, k, gates, weighted, ye, back, accumulate, out_team,
                                       /*team_kernel=*/true);
            Kokkos::fence();
            const auto yh = on_host(ye), bh = on_host(back), oh = on_host(out_host), ot = on_host(out_team);
            for (int t = 0; t < T; ++t)
              for (int c = 0; c < d; ++c) {
                S want = before(t, c);
                for (int j = 0; j < k; ++j) {
                  const int l = loch(t * k + j);
                  const S acc = j == 0 && !accumulate ? S(0) : want;
                  if (l == examoe::impl::kDroppedRow) {
                    want = acc;
                    continue;
                  }
                  const S v = l >= 0 ? yh(l, c) : bh(-1 - l, c);
                  want = acc + (weighted ? gh(t, j) * v : v);
                }
                ASSERT_EQ(std::memcmp(&oh(t, c), &want, sizeof(S)), 0)
                    << "d=" << d << " k=" << k << " T=" << T << " weighted=" << weighted
                    << " accumulate=" << accumulate << " out(" << t << ", " << c << "): " << oh(t, c) << " vs "
                    << want;
                ASSERT_EQ(std::memcmp(&oh(t, c), &ot(t, c), sizeof(S)), 0) << "host and team paths differ";
              }
          }
        }
      }
    }
  }
}
TEST(Kernels, CombineHostRowsMatchTheTeamKernelBitwise) {
  check_combine_both_ways<float>();
  check_combine_both_ways<double>();
}

// Router backward (softmax scores) on a host backend, tokens in blocks of kSumsInOrder,
// against the team kernel bit for bit: token counts around the block size, E from 1 to 256,
// k = 1 and 2, renormalised gates or not, temperature 1 and 0.7; float and double.
template <class S>
void check_router_backward_both_ways() {
  using Space = Kokkos::DefaultExecutionSpace;
  using M = Kokkos::View<S**, Kokkos::LayoutRight, Space::memory_space>;
  std::mt19937 rng(13);
  for (const int E : {1, 8, 64, 256}) {
    for (const int k : {1, 2}) {
      if (k > E) continue;
      for (const int T : {0, 1, 8, 9, 97}) {
        for (const bool renorm : {true, false}) {
          examoe::impl::RouterParams rp;
          rp.renormalize = renorm;
          rp.inv_temperature = E == 64 ? 1 / 0.7 : 1.0;
          M p("test::p", T, E), g("test::g", T, k), dg("test::dg", T, k);
          M dz_host("test::dz_host", T, E), dz_team("test::dz_team", T, E);
          Kokkos::View<S*, Space::memory_space> lse("test::lse", T);
          Kokkos::View<int**, Kokkos::LayoutRight, Space::memory_space> topk("test::topk", T, k);
          Kokkos::View<double*, Space::memory_space> aux("test::aux", E);
          fill_random(p, rng);
          fill_random(dg, rng);
          fill_random(aux, rng);
          examoe::impl::router_softmax_topk(Space(), rp, p, lse, topk, g);
          examoe::impl::router_backward_softmax(Space(), rp, p, lse, topk, g, dg, aux, 0.01, dz_host);
          examoe::impl::router_backward_softmax(Space(), rp, p, lse, topk, g, dg, aux, 0.01, dz_team,
                                                /*team_kernel=*/true);
          Kokkos::fence();
          const auto hh = on_host(dz_host), th = on_host(dz_team);
          for (int t = 0; t < T; ++t)
            for (int e = 0; e < E; ++e)
              ASSERT_EQ(std::memcmp(&hh(t, e), &th(t, e), sizeof(S)), 0)
                  << "E=" << E << " k=" << k << " T=" << T << " renorm=" << renorm << " token " << t << " expert "
                  << e << ": " << hh(t, e) << " vs " << th(t, e);
        }
      }
    }
  }
}
TEST(Kernels, RouterBackwardHostBlocksMatchTheTeamKernelBitwise) {
  check_router_backward_both_ways<float>();
  check_router_backward_both_ways<double>();
}
