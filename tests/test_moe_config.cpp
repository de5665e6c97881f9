// MoEConfig on its own (no communication): validate names the field, the hash sees every
// field, activation names round-trip.
#include "test_util.hpp"

#include <examoe/error.hpp>
#include <examoe/moe_config.hpp>

#include <algorithm>
#include <string>

namespace examoe::test {
namespace {

MoEConfig valid_config() {
  MoEConfig c = small_config(std::max(4, world_size()), 2, Activation::gelu);
  return c;
}

TEST(MoEConfig, ValidateNamesTheField) {
  MoEConfig c = valid_config();
  EXPECT_NO_THROW(c.validate());
  auto expect_field = [](MoEConfig bad, const char* field) {
    try {
      bad.validate();
      ADD_FAILURE() << "validate() accepted a bad " << field;
    } catch (const examoe::Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  MoEConfig b = c;
  b.top_k = 0;
  expect_field(b, "top_k");
  b = c;
  b.top_k = c.num_experts + 1;
  expect_field(b, "top_k");
  b = c;
  b.d_model = 0;
  expect_field(b, "d_model");
  b = c;
  b.d_hidden = -3;
  expect_field(b, "d_hidden");
  b = c;
  b.num_experts = 0;
  expect_field(b, "num_experts");
  b = c;
  b.router.temperature = 0.0;
  expect_field(b, "temperature");
}

TEST(MoEConfig, HashDetectsDifferences) {
  const MoEConfig a = valid_config();
  MoEConfig b = a;
  EXPECT_EQ(a.hash(), b.hash());
  b.d_hidden += 1;
  EXPECT_NE(a.hash(), b.hash());
  b = a;
  b.router.temperature = 0.5;
  EXPECT_NE(a.hash(), b.hash());
  b = a;
  b.activation = Activation::swiglu;
  EXPECT_NE(a.hash(), b.hash());
  b = a;
  b.placement.assign(a.num_experts, 0);
  EXPECT_NE(a.hash(), b.hash());
  b = a;
  b.allow_tf32 = !a.allow_tf32;  // changes float results on GPUs: must agree across ranks
  EXPECT_NE(a.hash(), b.hash());
  EXPECT_NE(a.to_string(), b.to_string());
  EXPECT_FALSE(a.to_string().empty());
}

TEST(MoEConfig, ActivationStrings) {
  EXPECT_EQ(activation_from_string("gelu"), Activation::gelu);
  EXPECT_EQ(activation_from_string("swiglu"), Activation::swiglu);
  EXPECT_EQ(activation_from_string(to_string(Activation::gelu)), Activation::gelu);
  EXPECT_EQ(activation_from_string(to_string(Activation::swiglu)), Activation::swiglu);
  EXPECT_THROW(activation_from_string("relu6"), examoe::Error);
}

}  // namespace
}  // namespace examoe::test
