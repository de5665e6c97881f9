// The float erf/exp used by the expert activations, against the C library in double.
#include <examoe/impl/expert_kernels.hpp>

#include <gtest/gtest.h>

#include <cmath>

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
}

TEST(Kernels, DoubleUsesLibraryFunctions) {
  EXPECT_EQ(examoe::impl::erf_<double>(0.3), std::erf(0.3));
  EXPECT_EQ(examoe::impl::exp_<double>(-1.7), std::exp(-1.7));
}
