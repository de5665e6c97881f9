// Independent single-process dense reference of one MoE layer, in double precision.
//
// Written from docs/moe-layer.md with plain loops over tokens and their k experts. Uses no
// library code besides the config structs (it only reads their fields). Jitter is ignored
// (the reference is the jitter-free model).
#pragma once

#include <examoe/moe_config.hpp>

#include <cstdint>
#include <vector>

namespace examoe::test {

/// Global inputs of one layer step, row-major.
struct RefInputs {
  int T = 0;                  ///< global token count T_g
  std::vector<double> x;      ///< [T][d]
  std::vector<double> Wr;     ///< [d][E]
  std::vector<double> W1;     ///< [E][d][h]
  std::vector<double> W3;     ///< [E][d][h] (SwiGLU only; empty otherwise)
  std::vector<double> W2;     ///< [E][h][d]
  std::vector<double> dout;   ///< [T][d]
  std::vector<double> bias;   ///< [E] selection bias (router.bias_rate > 0; empty = zeros)
};

struct RefResult {
  // forward
  std::vector<double> out;     ///< [T][d]
  std::vector<double> probs;   ///< [T][E] scores s: softmax of u, or sigmoid of u
  std::vector<double> lse;     ///< [T]
  std::vector<int> topk;       ///< [T][k]
  std::vector<double> gates;   ///< [T][k]
  std::vector<std::int64_t> counts;  ///< [E] c_i (the router's choices, before any dropping)
  /// Capacity (MoEConfig::capacity_factor > 0): C per expert (0: dropless), kept[t*k+j] = 1 if
  /// assignment (t, j) is kept, 0 if its expert dropped it, and the drops per expert.
  long long capacity = 0;
  std::vector<int> kept;              ///< [T][k]
  std::vector<std::int64_t> dropped;  ///< [E]
  /// min over experts that drop of gate(last kept) - gate(first dropped) (infinity when none
  /// drops): how far the capacity decision is from flipping (0: a tie, broken by token index).
  double min_capacity_gap = 0.0;
  double aux = 0.0;
  double z = 0.0;
  /// min over tokens and j < k of u[j-th largest] - u[(j+1)-th largest] (k == E: j < k - 1):
  /// how far the top-k decision, and the order of the k chosen, is from flipping. With sigmoid scores, a bias or groups: in
  /// units of the selection key s + b, the group choice's gap included.
  double min_topk_gap = 0.0;
  /// With a wire: min over the values rounded to bf16 of their distance to the nearest bf16
  /// rounding boundary (a halfway point), relative to the value (infinity when none crosses):
  /// how far a rounding is from going the other way when the value carries a relative error.
  double min_bf16_margin = 0.0;
  // backward of L = <dout, out> + aux + z
  std::vector<double> dx;    ///< [T][d]
  std::vector<double> dWr;   ///< [d][E]
  std::vector<double> dW1;   ///< [E][d][h]
  std::vector<double> dW3;   ///< [E][d][h] (SwiGLU only)
  std::vector<double> dW2;   ///< [E][h][d]
};

/// Where rows would cross ranks, for a reference of the layer with rows on the wire in bf16
/// (MoEConfig::dispatch_dtype): every row element of an assignment whose token and expert live
/// on different ranks is rounded to bf16 where the layer sends it: the expert input x, the
/// expert output y, the dispatched g * dout and the returned expert input gradient.
struct RefWire {
  std::vector<int> token_rank;   ///< [T] the rank holding token t
  std::vector<int> expert_rank;  ///< [E] the rank owning expert e
};

/// bf16(float(v)) by frexp/ldexp arithmetic (round to nearest even, normal numbers), written
/// apart from the library's bit-level conversion.
double round_to_bf16(double v);
/// |v - the nearest bf16 halfway point| / |v| for float(v) (infinity for 0 and non-finite).
double bf16_margin(double v);

/// Forward and backward of the dense reference; with `wire`, crossing rows rounded to bf16.
/// Group-limited routing needs router.groups > 0 (the reference does not know the ranks).
RefResult reference_moe(const MoEConfig& cfg, const RefInputs& in, const RefWire* wire = nullptr);

}  // namespace examoe::test
