// Finite-difference check (double) of the layer's backward against its own forward, for the
// full loss L = <dout, out> (summed over all ranks) + aux + z, at any rank count.
//
// Perturbations of replicated quantities (Wr) are made identically on every rank; a token's
// input is perturbed by the rank that holds the token, an expert weight by the rank that owns
// the expert; every rank calls forward (collective). The inputs keep every top-k decision at
// least 1e-3 (in u) from a tie, far more than a perturbation of 1e-6 can move it; the test
// also verifies that no decision flipped.
#include "test_util.hpp"

#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

struct GradCase {
  const char* name;
  int E, k, d, h, T;
  Activation act;
  bool renormalize;
  double temperature, alpha, beta;
  bool empty_rank1;
  bool zero_dout;  ///< L = aux + z only
  std::uint64_t seed;
  RouterScore score = RouterScore::softmax;
  double bias_rate = 0;  ///< > 0: a fixed random selection bias (make_inputs)
  int groups = 0, topk_groups = 0;
};

std::ostream& operator<<(std::ostream& os, const GradCase& c) { return os << c.name; }

// clang-format off
const GradCase kGradCases[] = {
  // name                        E  k   d   h   T  act                renorm temp alpha beta  empty1 zero_dout seed
  {"gelu_E4_k2_renorm",          4, 2,  8, 12, 20, Activation::gelu,    true, 1.0, 0.1,  0.05, true,  false, 11},
  {"swiglu_E6_k2_plain_temp08",  6, 2,  8, 10, 24, Activation::swiglu, false, 0.8, 0.05, 0.02, false, false, 22},
  {"gelu_E8_k4_renorm_temp13",   8, 4, 10, 12, 30, Activation::gelu,    true, 1.3, 0.05, 0.02, true,  false, 33},
  {"gelu_E6_k1_plain",           6, 1,  8, 12, 22, Activation::gelu,   false, 1.0, 0.05, 0.02, false, false, 44},
  {"swiglu_E4_k1_losses_only",   4, 1,  8, 12, 20, Activation::swiglu,  true, 0.7, 0.5,  0.1,  false, true,  55},
  {"sigmoid_bias_groups_E8_k2",  8, 2,  8, 10, 24, Activation::gelu,    true, 0.9, 0.5,  0.1,  true,  false, 66,
   RouterScore::sigmoid, 1e-3, 4, 2},
};
// clang-format on

/// One entry of a rank-2 or rank-3 device view, read or written through a host mirror.
template <class View>
double get_entry(const View& v, const std::array<int, 3>& i) {
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  if constexpr (View::rank == 2) return h(i[0], i[1]);
  else return h(i[0], i[1], i[2]);
}
template <class View>
void set_entry(const View& v, const std::array<int, 3>& i, double value) {
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  if constexpr (View::rank == 2) h(i[0], i[1]) = value;
  else h(i[0], i[1], i[2]) = value;
  Kokkos::deep_copy(v, h);
}

class GradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(GradCheck, FullLoss) {
  const GradCase& c = GetParam();
  const int P = world_size(), rank = world_rank();
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.router.renormalize = c.renormalize;
  cfg.router.temperature = c.temperature;
  cfg.router.aux_loss_coef = c.alpha;
  cfg.router.z_loss_coef = c.beta;
  cfg.router.score = c.score;
  cfg.router.bias_rate = c.bias_rate;
  cfg.router.groups = c.groups;
  cfg.router.topk_groups = c.topk_groups;
  const int d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts;
  const bool swiglu = c.act == Activation::swiglu;

  const std::uint64_t seed = seed_with_margin(cfg, c.T, c.seed, Routing::random, false, 1e-3);
  RefInputs in = make_inputs(cfg, c.T, seed, Routing::random, false);
  if (c.zero_dout) std::fill(in.dout.begin(), in.dout.end(), 0.0);
  const std::vector<int> off = split_tokens(c.T, P, c.empty_rank1);
  const int t0 = off[rank], T = off[rank + 1] - t0;
  Matrix<double> x = make_matrix<double>(in.x, t0, T, d, "test::x");
  Matrix<double> dout = make_matrix<double>(in.dout, t0, T, d, "test::dout");
  Matrix<double> out("test::out", T, d), dx("test::dx", T, d);
  const std::vector<double> dout_h = rows_of(in.dout, t0, T, d);

  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  set_layer_weights(layer, in);
  if (c.bias_rate > 0) layer.set_router_bias(in.bias);
  const Placement& pl = layer.placement();

  // Analytic gradients.
  layer.zero_grad();
  layer.forward(x, out);
  layer.backward(dout, dx);
  const std::vector<int> topk0 = to_host_int(layer.topk_experts());
  const std::vector<double> dx_h = to_host(dx);
  const std::vector<double> dWr_h = to_host(layer.router_grad());
  const std::vector<double> dW1_h = to_host(layer.w1_grad());
  const std::vector<double> dW2_h = to_host(layer.w2_grad());
  const std::vector<double> dW3_h = swiglu ? to_host(layer.w3_grad()) : std::vector<double>();

  // Scale of the loss terms, for the round-off part of the tolerance.
  double lscale = 0.0;
  {
    const std::vector<double> o = to_host(out);
    double s = 0.0;
    for (std::size_t i = 0; i < o.size(); ++i) s += std::fabs(o[i] * dout_h[i]);
    lscale = allreduce_sum(s) + std::fabs(layer.losses().aux) + std::fabs(layer.losses().z);
  }
  const double rtol = 1e-6, atol = 5e-9 * std::max(1.0, lscale), eps = 1e-6;

  int flips = 0;
  auto loss = [&]() {
    layer.forward(x, out);
    const std::vector<double> o = to_host(out);
    double s = 0.0;
    for (std::size_t i = 0; i < o.size(); ++i) s += o[i] * dout_h[i];
    if (to_host_int(layer.topk_experts()) != topk0) ++flips;
    return allreduce_sum(s) + layer.losses().aux + layer.losses().z;
  };

  // Sample entries first (same draws on every rank), then gather the analytic values with one
  // allreduce, then perturb entry by entry.
  enum class Target { x, Wr, W1, W2, W3 };
  struct Sample {
    std::string what;
    Target target;
    std::array<int, 3> idx;  ///< local index on the perturbing rank(s)
    int owner;               ///< perturbing rank, -1 = every rank (replicated)
    double analytic = 0.0, fd = 0.0;
  };
  std::vector<Sample> samples;
  std::vector<double> analytic_local;

  Rng rng(c.seed * 7919 + 17);
  const int nsamp = 5;
  for (int s = 0; s < nsamp; ++s) {
    const int tg = rng.below(c.T), i = rng.below(d);
    int owner = 0;
    while (!(tg >= off[owner] && tg < off[owner + 1])) ++owner;
    samples.push_back({"x[" + std::to_string(tg) + "][" + std::to_string(i) + "]", Target::x,
                       {owner == rank ? tg - t0 : 0, i, 0}, owner});
    analytic_local.push_back(owner == rank ? dx_h[(tg - t0) * d + i] : 0.0);
  }
  for (int s = 0; s < nsamp; ++s) {
    const int i = rng.below(d), e = rng.below(E);
    samples.push_back({"Wr[" + std::to_string(i) + "][" + std::to_string(e) + "]", Target::Wr,
                       {i, e, 0}, -1});
    analytic_local.push_back(rank == 0 ? dWr_h[i * E + e] : 0.0);  // replicated: count once
  }
  auto expert_samples = [&](const char* name, Target target, const std::vector<double>& grad,
                            int n1, int n2) {
    for (int s = 0; s < nsamp - 1; ++s) {
      const int e = rng.below(E), a = rng.below(n1), b = rng.below(n2);
      const int owner = pl.owner(e), l = pl.local_index(e);
      samples.push_back({std::string(name) + "[" + std::to_string(e) + "][" + std::to_string(a) +
                             "][" + std::to_string(b) + "]",
                         target, {owner == rank ? l : 0, a, b}, owner});
      analytic_local.push_back(
          owner == rank ? grad[(static_cast<std::size_t>(l) * n1 + a) * n2 + b] : 0.0);
    }
  };
  expert_samples("W1", Target::W1, dW1_h, d, h);
  expert_samples("W2", Target::W2, dW2_h, h, d);
  if (swiglu) expert_samples("W3", Target::W3, dW3_h, d, h);

  std::vector<double> analytic(analytic_local.size(), 0.0);
  MPI_Allreduce(analytic_local.data(), analytic.data(), static_cast<int>(analytic.size()),
                MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  double max_analytic = 0.0;
  for (std::size_t n = 0; n < samples.size(); ++n) {
    samples[n].analytic = analytic[n];
    max_analytic = std::max(max_analytic, std::fabs(analytic[n]));
  }

  // Perturbs one entry on its owner (every rank when replicated); every rank runs forward.
  auto finite_difference = [&](auto view, const Sample& smp) {
    const bool mine = smp.owner < 0 || smp.owner == rank;
    double orig = 0.0;
    if (mine) orig = get_entry(view, smp.idx);
    if (mine) set_entry(view, smp.idx, orig + eps);
    const double lp = loss();
    if (mine) set_entry(view, smp.idx, orig - eps);
    const double lm = loss();
    if (mine) set_entry(view, smp.idx, orig);
    return (lp - lm) / (2 * eps);
  };
  for (Sample& smp : samples) {
    switch (smp.target) {
      case Target::x: smp.fd = finite_difference(x, smp); break;
      case Target::Wr: smp.fd = finite_difference(layer.router_weight(), smp); break;
      case Target::W1: smp.fd = finite_difference(layer.w1(), smp); break;
      case Target::W2: smp.fd = finite_difference(layer.w2(), smp); break;
      case Target::W3: smp.fd = finite_difference(layer.w3(), smp); break;
    }
  }

  int total_flips = 0;
  MPI_Allreduce(&flips, &total_flips, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total_flips, 0) << "a perturbation flipped a top-k decision: the check is invalid";
  EXPECT_GT(max_analytic, 1e-6) << "all sampled gradients vanish: the check is vacuous";

  double worst = 0.0;
  for (const Sample& s : samples) {
    const double err = std::fabs(s.fd - s.analytic);
    const double allowed = rtol * std::max(std::fabs(s.analytic), std::fabs(s.fd)) + atol;
    worst = std::max(worst, err / allowed);
    EXPECT_LE(err, allowed) << "dL/d" << s.what << ": analytic " << s.analytic
                            << ", finite difference " << s.fd;
  }
  if (rank == 0) {
    RecordProperty("worst_error_over_tolerance", std::to_string(worst));
    if (std::getenv("EXAMOE_TEST_VERBOSE"))
      std::printf("[gradcheck] %s: %zu entries, worst |fd - analytic| / tolerance = %.3g "
                  "(rtol %.0e, atol %.2e)\n", c.name, samples.size(), worst, rtol, atol);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, GradCheck, ::testing::ValuesIn(kGradCases),
                         [](const ::testing::TestParamInfo<GradCase>& i) {
                           return std::string(i.param.name);
                         });

}  // namespace
}  // namespace examoe::test
