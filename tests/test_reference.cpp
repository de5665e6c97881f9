// Self-check of the dense reference (no library code): its analytic gradients match central
// finite differences of its own loss L = <dout, out> + aux + z on every entry, and a few
// hand-computable properties hold. If the layer disagrees with the reference, this test says
// whether the reference can be trusted.
#include "reference.hpp"
#include "test_util.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

double full_loss(const MoEConfig& cfg, const RefInputs& in) {
  const RefResult r = reference_moe(cfg, in);
  double s = r.aux + r.z;
  for (std::size_t i = 0; i < r.out.size(); ++i) s += r.out[i] * in.dout[i];
  return s;
}

void fd_check(const MoEConfig& cfg, std::uint64_t seed) {
  const int T = 10;
  const std::uint64_t s = seed_with_margin(cfg, T, seed, Routing::random, false, 1e-3);
  RefInputs in = make_inputs(cfg, T, s, Routing::random, false);
  const RefResult r = reference_moe(cfg, in);
  const double eps = 1e-6;
  auto check = [&](const char* name, std::vector<double>& v, const std::vector<double>& grad) {
    ASSERT_EQ(v.size(), grad.size()) << name;
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double orig = v[i];
      v[i] = orig + eps;
      const double lp = full_loss(cfg, in);
      v[i] = orig - eps;
      const double lm = full_loss(cfg, in);
      v[i] = orig;
      const double fd = (lp - lm) / (2 * eps);
      EXPECT_NEAR(grad[i], fd, 1e-7 + 1e-6 * std::fabs(fd)) << name << "[" << i << "]";
    }
  };
  check("x", in.x, r.dx);
  check("Wr", in.Wr, r.dWr);
  check("W1", in.W1, r.dW1);
  check("W2", in.W2, r.dW2);
  if (cfg.activation == Activation::swiglu) check("W3", in.W3, r.dW3);
}

MoEConfig cfg_of(int E, int k, Activation act, bool renorm, double temp) {
  MoEConfig c = small_config(E, k, act, 6, 8);
  c.router.renormalize = renorm;
  c.router.temperature = temp;
  c.router.aux_loss_coef = 0.1;
  c.router.z_loss_coef = 0.05;
  return c;
}

MoEConfig sigmoid_cfg(int E, int k, Activation act, bool renorm, double temp, double bias_rate, int G, int M) {
  MoEConfig c = cfg_of(E, k, act, renorm, temp);
  c.router.score = RouterScore::sigmoid;
  c.router.bias_rate = bias_rate;
  c.router.groups = G;
  c.router.topk_groups = M;
  return c;
}

TEST(Reference, FiniteDifferencesSigmoidRenorm) {
  fd_check(sigmoid_cfg(4, 2, Activation::gelu, true, 1.0, 0.0, 0, 0), 5);
}
TEST(Reference, FiniteDifferencesSigmoidPlainBiasTemp) {
  fd_check(sigmoid_cfg(5, 2, Activation::swiglu, false, 0.7, 1e-3, 0, 0), 6);
}
TEST(Reference, FiniteDifferencesSoftmaxBiasGroups) {
  MoEConfig c = cfg_of(6, 2, Activation::gelu, true, 1.3);
  c.router.bias_rate = 1e-3;
  c.router.groups = 3;
  c.router.topk_groups = 2;
  fd_check(c, 7);
}
TEST(Reference, FiniteDifferencesSigmoidGroupsOfOne) {
  fd_check(sigmoid_cfg(5, 2, Activation::gelu, true, 1.0, 1e-3, 5, 3), 8);
}

TEST(Reference, FiniteDifferencesGeluRenorm) { fd_check(cfg_of(4, 2, Activation::gelu, true, 1.0), 1); }
TEST(Reference, FiniteDifferencesGeluPlainTemp) { fd_check(cfg_of(5, 3, Activation::gelu, false, 0.6), 2); }
TEST(Reference, FiniteDifferencesSwiGLURenormTemp) { fd_check(cfg_of(6, 2, Activation::swiglu, true, 1.7), 3); }
TEST(Reference, FiniteDifferencesSwiGLUPlainK1) { fd_check(cfg_of(4, 1, Activation::swiglu, false, 1.0), 4); }

TEST(Reference, HandComputableProperties) {
  MoEConfig cfg = cfg_of(4, 2, Activation::gelu, true, 1.0);
  RefInputs in = make_inputs(cfg, 7, 9, Routing::random, false);
  // Equal logits: uniform probabilities, ties to the lower ids, lse = log E.
  std::fill(in.Wr.begin(), in.Wr.end(), 0.0);
  const RefResult r = reference_moe(cfg, in);
  for (int t = 0; t < 7; ++t) {
    EXPECT_EQ(r.topk[t * 2 + 0], 0);
    EXPECT_EQ(r.topk[t * 2 + 1], 1);
    EXPECT_DOUBLE_EQ(r.gates[t * 2 + 0], 0.5);
    EXPECT_DOUBLE_EQ(r.lse[t], std::log(4.0));
  }
  // f = (1/2, 1/2, 0, 0), P = 1/4 each: aux = alpha * E * (1/4) = alpha.
  EXPECT_NEAR(r.aux, cfg.router.aux_loss_coef, 1e-15);
  EXPECT_NEAR(r.z, cfg.router.z_loss_coef * std::log(4.0) * std::log(4.0), 1e-15);
  EXPECT_EQ(r.counts, (std::vector<std::int64_t>{7, 7, 0, 0}));
}

TEST(Reference, HandComputableSigmoidBiasAndGroups) {
  // Equal logits: every sigmoid score is 1/2; the bias alone decides.
  MoEConfig cfg = sigmoid_cfg(6, 1, Activation::gelu, true, 1.0, 1e-3, 0, 0);
  RefInputs in = make_inputs(cfg, 5, 9, Routing::random, false);
  std::fill(in.Wr.begin(), in.Wr.end(), 0.0);
  in.bias = {0, 0, 0, 1, 0, 0};
  RefResult r = reference_moe(cfg, in);
  for (int t = 0; t < 5; ++t) {
    EXPECT_EQ(r.topk[t], 3);
    EXPECT_DOUBLE_EQ(r.gates[t], 1.0);  // the bias never enters a gate
    EXPECT_DOUBLE_EQ(r.probs[t * 6 + 3], 0.5);
  }
  EXPECT_EQ(r.counts, (std::vector<std::int64_t>{0, 0, 0, 5, 0, 0}));
  // f = (0, 0, 0, 1, 0, 0), P = s / sum s = 1/6 each: aux = alpha * 6 * 1/6 = alpha.
  EXPECT_NEAR(r.aux, cfg.router.aux_loss_coef, 1e-15);

  // Three groups {0,1} {2,3} {4,5}, one chosen by its top-two sum: 1.1, 1.0, 1.11 -> group 2,
  // although expert 0 has the largest key.
  cfg.top_k = 2;
  cfg.router.groups = 3;
  cfg.router.topk_groups = 1;
  in.bias = {0.1, 0, 0, 0, 0.05, 0.06};
  r = reference_moe(cfg, in);
  for (int t = 0; t < 5; ++t) {
    EXPECT_EQ(r.topk[t * 2 + 0], 5);
    EXPECT_EQ(r.topk[t * 2 + 1], 4);
    EXPECT_DOUBLE_EQ(r.gates[t * 2 + 0], 0.5);
  }
  EXPECT_NEAR(r.min_topk_gap, 0.01, 1e-12);  // the group choice: 1.11 - 1.1
}

}  // namespace
}  // namespace examoe::test
