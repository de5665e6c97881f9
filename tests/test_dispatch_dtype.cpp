// Rows on the wire in bf16 (MoEConfig::dispatch_dtype): the conversion against hand-computed
// bits; one layer through many steps of random per-rank token counts (zero included), at 1-4
// ranks, against the double reference with every row that crosses ranks rounded to bf16 where
// the layer sends it (reference.hpp, RefWire); bytes on the wire exactly half of float's.
#include "test_util.hpp"

#include <examoe/impl/bf16.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

using impl::bf16;
using impl::from_bf16;
using impl::to_bf16;

std::uint16_t bits(float f) { return to_bf16(f).bits; }

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(bits(1.0f), 0x3f80);
  EXPECT_EQ(bits(-2.0f), 0xc000);
  EXPECT_EQ(bits(0.0f), 0x0000);
  EXPECT_EQ(bits(-0.0f), 0x8000);
  // 1 + 2^-8 lies halfway between 1 (0x3f80, even) and 1 + 2^-7 (0x3f81): to the even one.
  EXPECT_EQ(bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 2^-8 lies halfway between 0x3f81 (odd) and 0x3f82 (even): up.
  EXPECT_EQ(bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // Just above the first halfway point: up.
  EXPECT_EQ(bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(bits(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bits(std::numeric_limits<float>::max()), 0x7f80);  // rounds past the largest bf16
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(from_bf16(bf16{0x4049}), 3.140625f);
  // The reference's own rounding (frexp/ldexp) agrees on a sweep of values.
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-8, 8);
  for (int i = 0; i < 10000; ++i) {
    const double v = u(rng);
    ASSERT_EQ(static_cast<double>(from_bf16(to_bf16(static_cast<float>(v)))), round_to_bf16(v)) << v;
  }
}

struct Case {
  const char* name;
  int E, k, d, h;
  Activation act;
  bool reversed;  // owner[e] = (E - 1 - e) % P instead of balanced blocks
};

MoEConfig make_config(const Case& c, int P) {
  MoEConfig cfg = small_config(c.E, c.k, c.act, c.d, c.h);
  cfg.dispatch_dtype = DispatchDtype::bf16;
  if (c.reversed)
    for (int e = 0; e < c.E; ++e) cfg.placement.push_back((c.E - 1 - e) % P);
  return cfg;
}

/// One layer through `steps` steps of random global token counts split unevenly (a rank may
/// get none); every step against the reference with crossing rows rounded to bf16.
template <class Scalar>
void check_steps(const Case& c, int steps, double tol) {
  const int P = world_size(), me = world_rank();
  const MoEConfig cfg = make_config(c, P);
  MoELayer<Scalar> layer(cfg, MPI_COMM_WORLD);
  const Placement& pl = layer.placement();
  const int d = cfg.d_model, h = cfg.d_hidden, k = cfg.top_k;
  const std::size_t dh = static_cast<std::size_t>(d) * h;
  std::mt19937 rng(31);  // the same stream on every rank
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE(std::string(c.name) + " step " + std::to_string(s));
    const int Tg = 1 + static_cast<int>(rng() % 48);  // ranks may still get none
    const bool empty1 = rng() % 2 == 0;
    constexpr bool is_float = std::is_same_v<Scalar, float>;
    const std::vector<int> off = split_tokens(Tg, P, empty1);
    RefWire wire;
    for (int r = 0; r < P; ++r)
      for (int t = off[r]; t < off[r + 1]; ++t) wire.token_rank.push_back(r);
    for (int e = 0; e < cfg.num_experts; ++e) wire.expert_rank.push_back(pl.owner(e));
    // Inputs whose routing has a margin and, in float, whose rounded values are all further
    // from a bf16 halfway point than float's error reaches (1e-6 relative): the layer's float
    // value of such a point may lie on the other side of it than the reference's double.
    std::uint64_t seed = 900 + 1000 * static_cast<std::uint64_t>(s);
    RefInputs in;
    RefResult ref;
    for (int tries = 0;; ++tries, ++seed) {
      seed = seed_with_margin(cfg, Tg, seed, Routing::random, is_float, is_float ? 1e-3 : 1e-9);
      in = make_inputs(cfg, Tg, seed, Routing::random, is_float);
      ref = reference_moe(cfg, in, &wire);
      if (!is_float || ref.min_bf16_margin >= 1e-6) break;
      ASSERT_LT(tries, 200) << "no seed whose bf16 roundings have a margin of 1e-6";
    }

    const int t0 = off[me], T = off[me + 1] - t0;
    auto x = make_matrix<Scalar>(in.x, t0, T, d, "x"), dout = make_matrix<Scalar>(in.dout, t0, T, d, "dout");
    Matrix<Scalar> out("out", T, d), dx("dx", T, d);
    set_layer_weights(layer, in);
    layer.zero_grad();
    layer.forward(x, out);
    layer.backward(dout, dx);

    auto rows = [&](const std::vector<double>& v) {
      return std::vector<double>(v.begin() + static_cast<std::size_t>(t0) * d, v.begin() + static_cast<std::size_t>(t0 + T) * d);
    };
    EXPECT_EQ(to_host_int(layer.topk_experts()),
              std::vector<int>(ref.topk.begin() + t0 * k, ref.topk.begin() + (t0 + T) * k));
    EXPECT_TRUE(close_to("out", to_host(out), rows(ref.out), tol));
    EXPECT_TRUE(close_to("dx", to_host(dx), rows(ref.dx), tol));
    EXPECT_TRUE(close_to("dWr", to_host(layer.router_grad()), ref.dWr, tol));
    EXPECT_TRUE(close_to("dW1", to_host(layer.w1_grad()), local_expert_slices(ref.dW1, pl, me, dh), tol));
    EXPECT_TRUE(close_to("dW2", to_host(layer.w2_grad()), local_expert_slices(ref.dW2, pl, me, dh), tol));
    if (cfg.activation == Activation::swiglu)
      EXPECT_TRUE(close_to("dW3", to_host(layer.w3_grad()), local_expert_slices(ref.dW3, pl, me, dh), tol));
    // Two bytes per element on the wire, whatever the scalar.
    const LayerStats& st = layer.stats();
    EXPECT_EQ(st.bytes_sent_dispatch, st.rows_sent * d * 2);
    EXPECT_EQ(st.bytes_recv_combine, st.rows_sent * d * 2);
  }
}

// clang-format off
const Case kCases[] = {
  {"gelu_E4_k2",           4, 2,  8, 12, Activation::gelu,   false},
  {"swiglu_E6_k2_reversed", 6, 2, 10, 16, Activation::swiglu, true},
  {"gelu_E8_k4",           8, 4, 12, 16, Activation::gelu,   false},
};
// clang-format on

// In double the layer and the reference round the same values (equal to 1e-15), so every
// rounding point must be where the reference puts it.
TEST(DispatchDtype, Bf16MatchesTheRoundingReferenceDouble) {
  for (const Case& c : kCases) check_steps<double>(c, 8, 1e-12);
}

// In float, to float's tolerance, on inputs with no rounded value within float's error of a
// bf16 halfway point (one in a few thousand per element: such a value can round the other way
// than the reference's double, by one bf16 step). The double test above is the exact one.
TEST(DispatchDtype, Bf16MatchesTheRoundingReferenceFloat) {
  for (const Case& c : kCases) check_steps<float>(c, 4, 1e-5);
}

// The same inputs with rows in float and in bf16: the plan's byte counters halve exactly, and
// the outputs differ by bf16's rounding (at more than one rank, where rows cross).
TEST(DispatchDtype, Bf16HalvesTheBytes) {
  const int P = world_size(), me = world_rank();
  MoEConfig a = small_config(6, 2, Activation::gelu, 16, 24);
  MoEConfig b = a;
  b.dispatch_dtype = DispatchDtype::bf16;
  MoELayer<float> la(a, MPI_COMM_WORLD), lb(b, MPI_COMM_WORLD);
  const int Tg = 64, d = a.d_model;
  const RefInputs in = make_inputs(a, Tg, 4242, Routing::random, true);
  const std::vector<int> off = split_tokens(Tg, P, false);
  const int t0 = off[me], T = off[me + 1] - t0;
  auto x = make_matrix<float>(in.x, t0, T, d, "x"), dout = make_matrix<float>(in.dout, t0, T, d, "dout");
  Matrix<float> oa("oa", T, d), ob("ob", T, d), da("da", T, d), db("db", T, d);
  set_layer_weights(la, in);
  set_layer_weights(lb, in);
  la.forward(x, oa);
  la.backward(dout, da);
  lb.forward(x, ob);
  lb.backward(dout, db);
  const LayerStats &sa = la.stats(), &sb = lb.stats();
  EXPECT_EQ(sa.rows_sent, sb.rows_sent);
  EXPECT_EQ(sb.bytes_sent_dispatch * 2, sa.bytes_sent_dispatch);
  EXPECT_EQ(sb.bytes_recv_dispatch * 2, sa.bytes_recv_dispatch);
  EXPECT_EQ(sb.bytes_sent_combine * 2, sa.bytes_sent_combine);
  EXPECT_EQ(sb.bytes_recv_combine * 2, sa.bytes_recv_combine);
  if (P == 1) {  // nothing crosses: bitwise the same
    EXPECT_EQ(to_host(oa), to_host(ob));
    EXPECT_EQ(to_host(da), to_host(db));
  } else if (sa.rows_sent > 0) {
    EXPECT_NE(to_host(oa), to_host(ob)) << "rows crossed ranks but were not rounded";
    EXPECT_TRUE(close_to("bf16 vs float out", to_host(ob), to_host(oa), 2e-2));
  }
}

}  // namespace
}  // namespace examoe::test
