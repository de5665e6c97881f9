#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace examoe {

enum class Activation {
  gelu,   ///< y = W2^T gelu(W1^T x), exact (erf) GELU
  swiglu  ///< y = W2^T (silu(W1^T x) * (W3^T x))
};
std::string to_string(Activation a);

/// The weight tensors of an expert: w1 [d][h], w2 [h][d] and, for SwiGLU only, w3 [d][h].
enum class ExpertTensor { w1, w2, w3 };
/// "w1", "w2" or "w3" (the tensor's name in checkpoints: "layer{l}.w1").
const char* to_string(ExpertTensor t);
Activation activation_from_string(const std::string& s);

/// The type rows travel in through the layer's exchanges (dispatch and combine, forward and
/// backward). Compute stays in the layer's scalar either way; rows that stay on their rank are
/// never converted.
enum class DispatchDtype {
  scalar,  ///< the layer's scalar (float or double)
  bf16     ///< bfloat16, rounded to nearest even: half of float's bytes (impl/bf16.hpp)
};
const char* to_string(DispatchDtype t);
DispatchDtype dispatch_dtype_from_string(const std::string& s);

/// How the experts run their GEMMs (docs/moe-layer.md, "Overlap"). The results are the same
/// either way (bitwise while no expert's block of rows from one rank exceeds a chunk).
enum class ExpertSchedule {
  automatic,      ///< by_projection on GPUs, by_expert on host backends
  by_projection,  ///< one grouped GEMM per projection over every local expert
  by_expert,      ///< expert after expert, in cache-sized row chunks: GEMM, activation, GEMM
};
const char* to_string(ExpertSchedule s);
ExpertSchedule expert_schedule_from_string(const std::string& s);

/// How the router turns logits u into the scores s it selects by (docs/moe-layer.md, "Router").
enum class RouterScore {
  softmax,  ///< s = softmax(u); gates are the chosen s (renormalised over the k if asked)
  sigmoid   ///< s_e = sigmoid(u_e) (DeepSeek-V3); gates are the chosen s normalised over the k
};
const char* to_string(RouterScore s);
RouterScore router_score_from_string(const std::string& s);

/// Router settings. Equations: docs/moe-layer.md.
struct RouterConfig {
  double temperature = 1.0;   ///< u = z / temperature (+ jitter noise)
  bool renormalize = true;    ///< gates of the k chosen experts rescaled to sum to 1
  double jitter = 0.0;        ///< std-dev of Gaussian noise added to u in training (0 = off)
  std::uint64_t seed = 0;     ///< seed of the jitter noise and of parameter init
  double aux_loss_coef = 1e-2;  ///< alpha of the Switch load-balancing loss
  double z_loss_coef = 1e-3;    ///< beta of the router z-loss
  RouterScore score = RouterScore::softmax;
  /// Aux-loss-free balancing (docs/moe-layer.md, "Selection bias"): > 0 adds a per-expert
  /// bias b to the scores for selection only (never to the gates), moved by
  /// bias_rate * sign(mean load - load_e) at each MoELayer::update_router_bias(). 0 = off.
  double bias_rate = 0.0;
  /// Group-limited routing (docs/moe-layer.md, "Group-limited routing"): topk_groups > 0
  /// splits the experts into `groups` contiguous balanced blocks of ids (0 = as many as the
  /// expert-parallel ranks) and lets each token choose its k experts among the experts of its
  /// topk_groups best groups. 0 = off.
  int groups = 0;
  int topk_groups = 0;
};

/// Everything that defines one MoE layer. Must be identical on every rank of the
/// communicator (checked collectively at construction).
struct MoEConfig {
  int d_model = 0;
  int d_hidden = 0;
  int num_experts = 0;
  int top_k = 1;
  Activation activation = Activation::gelu;
  RouterConfig router;
  /// Optional explicit placement: owner rank of each expert (size num_experts). Empty means
  /// balanced contiguous blocks.
  std::vector<int> placement;
  /// Sum the router-weight gradient over the communicator in backward (every rank then holds
  /// the full dWr). Turn off when an outer layer (FSDP) reduces it.
  bool reduce_router_grad = true;
  /// forward() and backward() refuse non-finite inputs (NaN or Inf in x or dout): every rank
  /// throws examoe::Error naming the first bad element instead of spreading NaN through the
  /// router. One extra pass over the input, agreed with the shape checks (no extra message).
  /// The trainer turns it off: there, non-finite values are train.nonfinite's business.
  bool check_finite_inputs = true;
  /// Time each phase (router, plan, pack, all-to-all, experts, combine, backward) into
  /// stats().seconds. No fences: a host clock on host spaces, CUDA events on the stream on
  /// GPUs (one wait when stats() is read). Off by default; the trainer and the bench turn it on.
  bool time_phases = false;
  /// Float expert GEMMs may use TF32 tensor cores (CUDA builds; about 1e-3 relative per
  /// product instead of float's 6e-8). No effect in double or on host builds.
  bool allow_tf32 = false;
  DispatchDtype dispatch_dtype = DispatchDtype::scalar;
  /// Hide the row exchanges behind local work (docs/moe-layer.md, "Overlap"): each all-to-all
  /// is started, the expert rows that never left this rank are computed while the others
  /// travel, then the received ones. Off: every exchange completes before the experts run.
  /// The results are the same either way (the same GEMMs on the same rows, the same sums).
  bool overlap_exchange = true;
  ExpertSchedule expert_schedule = ExpertSchedule::automatic;
  /// Expert capacity (docs/moe-layer.md, "Capacity and token dropping"): each expert keeps at
  /// most C = ceil(capacity_factor * top_k * T / num_experts) assignments per step, T the
  /// tokens of the layer communicator's batch; its owner keeps the ones with the largest
  /// gates (ties: the lower global token index), the others are dropped (they add nothing to
  /// the output; their tokens keep the residual path). 0 = dropless (the default); >= 0, finite.
  double capacity_factor = 0.0;

  /// Local validity checks; throws examoe::Error naming the bad field.
  void validate() const;
  /// Stable 64-bit hash of every field (used to detect configs that differ between ranks).
  std::uint64_t hash() const;
  std::string to_string() const;
};

}  // namespace examoe
