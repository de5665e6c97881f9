#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace examoe {

/// Phases of one layer step, in the order they run.
enum class Phase : int {
  router = 0,      ///< router GEMM, softmax, top-k, loss statistics
  plan,            ///< counting sort, count exchange, displacements
  pack,            ///< gather rows into send buffers
  alltoall,        ///< forward dispatch exchange
  experts,         ///< expert forward GEMMs + activation
  combine,         ///< reverse exchange + gate-weighted gather
  bwd_combine,     ///< backward of combine: gate gradients, dispatch of dy
  bwd_alltoall,    ///< both all-to-alls of backward
  bwd_experts,     ///< expert backward GEMMs
  bwd_router,      ///< gather of dx, router backward, dWr reduction
  count
};
constexpr int kNumPhases = static_cast<int>(Phase::count);
const char* phase_name(Phase p);

/// Counters of the most recent forward/backward of one layer on this rank.
struct LayerStats {
  // Dispatch plan (forward; backward moves the same rows in both directions).
  std::int64_t tokens = 0;             ///< local tokens T
  std::int64_t assignments = 0;        ///< T * k
  std::int64_t rows_local = 0;         ///< assignments whose expert lives on this rank (copied)
  std::int64_t rows_sent = 0;          ///< rows sent to other ranks by dispatch
  std::int64_t rows_received = 0;      ///< rows received from other ranks by dispatch
  std::int64_t expert_rows = 0;        ///< rows processed by this rank's experts
  std::int64_t bytes_sent_dispatch = 0;   ///< rows_sent * d * sizeof(scalar)
  std::int64_t bytes_recv_dispatch = 0;
  std::int64_t bytes_sent_combine = 0;    ///< rows_received * d * sizeof(scalar)
  std::int64_t bytes_recv_combine = 0;
  std::vector<std::int64_t> rows_per_local_expert;   ///< rows each local expert processed
  /// The experts' GEMM blocks: rows local expert lx got from rank src, at [lx * P + src] (P
  /// the layer communicator's size). Each block is a GEMM of its own (docs/moe-layer.md,
  /// "Overlap"): a row's result then depends neither on the overlap nor on the placement.
  std::vector<std::int64_t> rows_per_block;
  std::vector<std::int64_t> tokens_per_expert;       ///< global, all E experts (from the router)
  /// Assignments each expert dropped over its capacity (global, all E experts, like
  /// tokens_per_expert; all 0 when dropless: MoEConfig::capacity_factor = 0).
  std::vector<std::int64_t> dropped_per_expert;
  std::int64_t capacity = 0;  ///< this step's C per expert (0: dropless)
  std::array<double, kNumPhases> seconds{};          ///< time per phase of the last step
  double imbalance = 1.0;   ///< max over ranks / mean of rows per rank (global, from counts)
  /// Distinct ranks a local token's k rows go to (its own included when it owns one of its
  /// experts): the mean and the maximum over this rank's tokens of the last forward (0 at
  /// T = 0). Group-limited routing with a group per rank bounds the maximum by topk_groups.
  double ranks_per_token = 0.0;
  std::int64_t max_ranks_per_token = 0;
};

}  // namespace examoe
