// What a model needs in memory per rank, computed without allocating anything (so absurd
// configurations can be refused first), and MemoryReport's total. The layout mirrors Model's
// (src/model/model.cpp): docs/model.md.
#include <examoe/model.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace examoe {

namespace {
/// Bytes as a double (exact below 2^53) to a size_t, saturating.
std::size_t saturate(double b) {
  return b >= 1.8e19 ? std::numeric_limits<std::size_t>::max() : static_cast<std::size_t>(b);
}
}  // namespace

std::size_t MemoryReport::total() const {
  const std::size_t parts[] = {dense_shard, dense_grad_shard, dense_shard /* decay mask */,
                               gathered_peak, grad_buffer, experts, expert_grads, optimizer,
                               activations, buffers};
  std::size_t t = 0;
  for (std::size_t p : parts) {
    if (p > std::numeric_limits<std::size_t>::max() - t) return std::numeric_limits<std::size_t>::max();
    t += p;
  }
  return t;
}

namespace {
/// A MoE layer's numbers of values on the fullest rank (doubles: exact to 2^53, no overflow):
/// local expert parameters, and router state plus the rows of the k assignments per token.
/// Per row, 2d on the sending side (the dispatch send and combine receive buffers) and
/// 6d + 5h on the experts' side (dispatch receive, combine send, expert input/output and
/// their gradients, hidden activations). Dropless, the experts' side holds the rank's share
/// A = rows k; with a capacity it holds at most C rows per local expert,
/// C = ceil(capacity_factor k T / E) with T = ep rows: that bound is what is counted.
std::pair<double, double> moe_layer_values(const ModelConfig& cfg, int ep_size, double rows) {
  const double d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts, k = cfg.top_k;
  const double per_expert = d * h * (cfg.activation == Activation::swiglu ? 3 : 2);
  const double ep = std::max(ep_size, 1);
  const double local_experts = std::ceil(E / ep);  // balanced blocks
  const double A = rows * k;
  const double expert_rows =
      cfg.capacity_factor > 0 ? local_experts * std::ceil(cfg.capacity_factor * k * ep * rows / E) : A;
  return {local_experts * per_expert, rows * (3 * E + 3 * k) + A * 2 * d + expert_rows * (6 * d + 5 * h)};
}
}  // namespace

MoELayerMemory estimate_moe_layer_memory(const ModelConfig& cfg, int ep_size, long long rows,
                                         std::size_t scalar_bytes) {
  const auto [experts, buffers] = moe_layer_values(cfg, ep_size, static_cast<double>(std::max(rows, 0LL)));
  const double sb = static_cast<double>(scalar_bytes);
  MoELayerMemory m;
  m.experts = saturate(experts * sb);
  m.buffers = saturate(buffers * sb);
  return m;
}

MemoryReport estimate_memory(const ModelConfig& cfg, const ParallelConfig& par, int world_size,
                             int ep_size, long long rows, std::size_t scalar_bytes, int micro_batches) {
  // Same layout as Model: units embed [wte, wpe], block l [attn_norm, wq, wk, wv, wo,
  // moe_norm, router (, shared experts' w1, w2 (, w3))], head [final_norm, lm_head], each padded
  // to a multiple of the world.
  // In doubles: every product stays exact up to 2^53 and cannot overflow.
  const double d = cfg.d_model, V = cfg.vocab, Sq = cfg.seq_len, E = cfg.num_experts,
               L = cfg.n_layers, h = cfg.d_hidden, H = cfg.n_heads, W = std::max(world_size, 1),
               sb = static_cast<double>(scalar_bytes), r = static_cast<double>(std::max(rows, 0LL));
  auto padded = [&](double n) { return std::ceil(n / W) * W; };
  // The shared experts: one MLP of width N hs per block (src/model/shared_experts.hpp).
  const double sw = static_cast<double>(cfg.num_shared_experts) * cfg.shared_width();
  const double swiglu = cfg.activation == Activation::swiglu ? 1 : 0;
  const double shared = d * sw * (2 + swiglu);
  const double embed = V * d + Sq * d, block = 2 * d + 4 * d * d + d * E + shared, head = d + d * V;
  const double shard = padded(embed) / W + L * (padded(block) / W) + padded(head) / W;
  const double max_padded = std::max({padded(embed), padded(block), padded(head)});
  const double all_padded = padded(embed) + L * padded(block) + padded(head);
  const double per_expert = d * h * (cfg.activation == Activation::swiglu ? 3 : 2);
  const auto [local_expert_values, moe] = moe_layer_values(cfg, ep_size, r);
  MemoryReport m;
  m.dense_total_params = saturate(embed + L * block + head);
  m.expert_total_params = saturate(per_expert * E * L);
  m.dense_shard = saturate(shard * sb);
  m.dense_grad_shard = m.dense_shard;
  m.gathered_unit_max = saturate(max_padded * sb);
  m.gathered_peak = saturate((par.reshard_after_forward ? max_padded : all_padded) * sb);
  m.grad_buffer = saturate((max_padded + (micro_batches > 1 ? max_padded / W : 0)) * sb);
  m.experts = saturate(local_expert_values * L * sb);
  m.expert_grads = m.experts;
  m.optimizer = saturate(2 * (shard + local_expert_values * L) * sb);
  // Per block also the shared experts' g, a (and u), kept for backward.
  const double per_block = 7 * r * d + r * H * Sq + 2 * r + r * sw * (2 + swiglu);
  const double inputs = (L + 1) * r * d;
  m.activations_without_checkpointing = saturate((per_block * L + inputs) * sb);
  m.activations = saturate((per_block * (par.activation_checkpointing ? 1 : L) + inputs) * sb);
  // Logits, 8 activation-gradient/scratch matrices, the attention score gradients (like p),
  // and per MoE layer its router state and the rows of its k assignments per token
  // (dispatch, expert input/output and their gradients, hidden activations), and the shared
  // experts' backward scratch (da, and du for SwiGLU).
  m.buffers = saturate((r * V + 8 * r * d + r * H * Sq + r + L * moe + r * sw * (1 + swiglu)) * sb);
  return m;
}

}  // namespace examoe
