// Misconfiguration raises examoe::Error on EVERY rank, with a message that names the field,
// and leaves the communicator usable (no rank stuck in a collective).
#include "test_util.hpp"

#include <examoe/error.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/moe_layer.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <string>

namespace examoe::test {
namespace {

MoEConfig valid_config() {
  MoEConfig c = small_config(std::max(4, world_size()), 2, Activation::gelu);
  return c;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return s;
}

/// Constructs a layer with `cfg` on MPI_COMM_WORLD; expects examoe::Error on every rank.
/// `needle` (if non-empty) must occur in the message on every rank where `check_message`.
void expect_error_everywhere(const MoEConfig& cfg, const std::string& needle,
                             bool check_message = true) {
  bool threw = false;
  std::string msg;
  try {
    MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  } catch (const examoe::Error& e) {
    threw = true;
    msg = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-examoe exception: " << e.what();
    threw = true;
  }
  EXPECT_TRUE(threw) << "no examoe::Error for config " << cfg.to_string();
  EXPECT_TRUE(all_ranks(threw)) << "not every rank threw";
  if (threw && check_message && !needle.empty()) {
    EXPECT_NE(msg.find(needle), std::string::npos)
        << "message does not name '" << needle << "': " << msg;
    EXPECT_EQ(msg.rfind("examoe::", 0), 0u) << "message does not start with the function: " << msg;
  }
}

/// After the errors, the communicator still works: a valid layer runs one step.
void expect_world_still_usable() {
  const MoEConfig cfg = valid_config();
  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  layer.init_parameters(5);
  const int T = world_rank() + 1;
  Matrix<double> x("test::x", T, cfg.d_model), out("test::out", T, cfg.d_model),
      dx("test::dx", T, cfg.d_model);
  Kokkos::deep_copy(x, 0.25);
  layer.forward(x, out);
  layer.backward(out, dx);
  EXPECT_EQ(layer.stats().tokens, T);
}

TEST(Errors, TopKExceedsExperts) {
  MoEConfig c = valid_config();
  c.top_k = c.num_experts + 1;
  expect_error_everywhere(c, "top_k");
}

TEST(Errors, TopKZero) {
  MoEConfig c = valid_config();
  c.top_k = 0;
  expect_error_everywhere(c, "top_k");
}

TEST(Errors, DModelZero) {
  MoEConfig c = valid_config();
  c.d_model = 0;
  expect_error_everywhere(c, "d_model");
}

TEST(Errors, DHiddenZero) {
  MoEConfig c = valid_config();
  c.d_hidden = 0;
  expect_error_everywhere(c, "d_hidden");
}

TEST(Errors, FewerExpertsThanRanks) {
  MoEConfig c = valid_config();
  c.num_experts = world_size() > 1 ? world_size() - 1 : 0;
  c.top_k = 1;
  expect_error_everywhere(c, "num_experts");
}

TEST(Errors, TemperatureNotPositive) {
  MoEConfig c = valid_config();
  c.router.temperature = 0.0;
  expect_error_everywhere(c, "temperature");
  c.router.temperature = -1.0;
  expect_error_everywhere(c, "temperature");
}

TEST(Errors, RouterModesOutOfRange) {
  MoEConfig c = valid_config();
  c.router.bias_rate = -1e-3;
  expect_error_everywhere(c, "router.bias_rate");
  c = valid_config();
  c.router.groups = c.num_experts + 1;
  expect_error_everywhere(c, "router.groups");
  c = valid_config();
  c.router.groups = 2;
  c.router.topk_groups = 3;
  expect_error_everywhere(c, "router.topk_groups");
  // k = 3 experts from one group of two
  c = valid_config();
  c.num_experts = 2 * world_size() + 2;
  c.top_k = 3;
  c.router.groups = c.num_experts / 2;
  c.router.topk_groups = 1;
  expect_error_everywhere(c, "top_k (3) exceeds the experts of router.topk_groups = 1");
  // The same with one group per rank (router.groups = 0): found when the ranks are known. On
  // one rank the one group holds every expert, and the config is valid.
  c = valid_config();
  c.num_experts = 2 * world_size() + (world_size() == 1 ? 2 : 0);
  c.top_k = 3;
  c.router.topk_groups = 1;
  if (world_size() > 1)
    expect_error_everywhere(c, "one group per expert-parallel rank");
  else
    EXPECT_NO_THROW(MoELayer<double>(c, MPI_COMM_WORLD));
  expect_world_still_usable();
}

TEST(Errors, CapacityFactorNegativeOrNotFinite) {
  for (double cf : {-1.0, -1e-300, std::nan(""), HUGE_VAL}) {
    MoEConfig c = valid_config();
    c.capacity_factor = cf;
    expect_error_everywhere(c, "capacity_factor must be >= 0 and finite");
  }
}

TEST(Errors, PlacementWrongSize) {
  MoEConfig c = valid_config();
  c.placement.assign(c.num_experts - 1, 0);
  expect_error_everywhere(c, "placement");
}

TEST(Errors, PlacementOwnerOutOfRange) {
  MoEConfig c = valid_config();
  c.placement.assign(c.num_experts, 0);
  c.placement.back() = world_size();  // no such rank
  expect_error_everywhere(c, "");
}

TEST(Errors, ConfigDiffersBetweenRanks) {
  if (world_size() == 1) GTEST_SKIP() << "needs at least 2 ranks";
  MoEConfig c = valid_config();
  if (world_rank() == 1) c.d_hidden += 4;
  bool threw = false;
  std::string msg;
  try {
    MoELayer<double> layer(c, MPI_COMM_WORLD);
  } catch (const examoe::Error& e) {
    threw = true;
    msg = e.what();
  }
  EXPECT_TRUE(threw);
  EXPECT_TRUE(all_ranks(threw)) << "not every rank threw";
  if (threw) {
    const std::string m = lower(msg);
    EXPECT_NE(m.find("config"), std::string::npos) << "message: " << msg;
    EXPECT_TRUE(m.find("differ") != std::string::npos || m.find("identical") != std::string::npos ||
                m.find("mismatch") != std::string::npos || m.find("disagree") != std::string::npos)
        << "message does not say that the configs differ: " << msg;
    EXPECT_NE(msg.find("d_hidden"), std::string::npos) << "message does not name the field: " << msg;
  }
}

TEST(Errors, InvalidOnOneRankOnly) {
  // Rank P-1 has top_k = 0; every rank must throw (not only the one that sees it).
  MoEConfig c = valid_config();
  const bool bad_here = world_rank() == world_size() - 1;  // rank 0 when P = 1
  if (bad_here) c.top_k = 0;
  bool threw = false;
  std::string msg;
  try {
    MoELayer<double> layer(c, MPI_COMM_WORLD);
  } catch (const examoe::Error& e) {
    threw = true;
    msg = e.what();
  }
  EXPECT_TRUE(threw);
  EXPECT_TRUE(all_ranks(threw)) << "not every rank threw";
  // Every rank learns what was wrong, not only the rank that saw it.
  if (threw) {
    EXPECT_NE(msg.find("top_k"), std::string::npos) << (bad_here ? "" : "(valid rank) ") << msg;
  }
}

TEST(Errors, CommunicatorUsableAfterErrors) {
  MoEConfig c = valid_config();
  c.top_k = 0;
  expect_error_everywhere(c, "top_k");
  expect_world_still_usable();
}

}  // namespace
}  // namespace examoe::test
