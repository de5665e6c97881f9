#pragma once
#include <examoe/data.hpp>
#include <examoe/fsdp.hpp>
#include <examoe/mesh.hpp>
#include <examoe/moe_layer.hpp>

#include <Kokkos_Core.hpp>

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace examoe {
namespace impl {
template <class Space>
class GroupedGemm;
template <class S>
class SharedExperts;
}

/// The parts of one training step (docs/metrics.md, `step_phase_s`): the model times all but
/// `data`'s batch reading and `optimizer`, which the trainer adds.
enum class StepPhase : int {
  data = 0,             ///< the batch: reading it, counting targets, uploading tokens
  embedding,            ///< token + position embeddings, forward and backward
  norms,                ///< RMSNorms and residual adds, forward and backward
  attention,            ///< attention scores, softmax and their product with V (and backward)
  projections,          ///< q, k, v, o and LM-head GEMMs (and their backward)
  loss,                 ///< cross-entropy and its gradient
  moe,                  ///< the MoE layers, forward and backward (their own phases: moe_phase_s)
  fsdp_gather,          ///< FSDP all-gathers of the units' parameters
  fsdp_reduce_scatter,  ///< FSDP gradient buffers and their reduce-scatters
  expert_allreduce,     ///< expert gradients summed over the expert-data-parallel group
  optimizer,            ///< gradient norm, clipping and the AdamW update
  count
};
constexpr int kNumStepPhases = static_cast<int>(StepPhase::count);
/// "data", "embedding", ..., as in the metrics.
const char* step_phase_name(StepPhase p);
/// Seconds per StepPhase.
using StepPhaseSeconds = std::array<double, kNumStepPhases>;

/// The MoE decoder: token embedding + learned positions, L pre-norm blocks
/// `h = x + Attn(RMSNorm(x)); x = h + MoE(RMSNorm(h))`, final RMSNorm, LM head.
/// Equations, parameter names, shapes and init: docs/model.md.
struct ModelConfig {
  /// Vocabulary size V (config key model.vocab_size): token ids are in [0, V). 256: bytes.
  int vocab = 256;
  /// The largest vocab accepted (2^24: every id is exact in float, the id histogram of the data
  /// check stays at most 128 MiB).
  static constexpr int kMaxVocab = 1 << 24;
  int d_model = 64;
  int n_layers = 2;
  int n_heads = 4;
  int seq_len = 32;
  int d_hidden = 128;  ///< expert hidden width
  int num_experts = 4;
  int top_k = 2;
  /// Shared experts per block (docs/model.md, "Shared experts"): dense expert MLPs of the
  /// model's activation that every token passes through, their outputs added to the routed
  /// output of the MoE block. 0 = none (config key model.num_shared_experts).
  int num_shared_experts = 0;
  /// Hidden width of each shared expert; 0 = d_hidden (config key model.shared_hidden).
  int shared_hidden = 0;
  /// The hidden width of each shared expert: shared_hidden, or d_hidden when it is 0.
  int shared_width() const { return shared_hidden > 0 ? shared_hidden : d_hidden; }
  Activation activation = Activation::gelu;
  RouterConfig router;
  double norm_eps = 1e-5;
  /// The type MoE rows travel in between ranks (MoEConfig::dispatch_dtype).
  DispatchDtype dispatch_dtype = DispatchDtype::scalar;
  /// Float expert GEMMs may use TF32 tensor cores on CUDA builds (MoEConfig::allow_tf32).
  bool allow_tf32 = false;
  /// Expert capacity of the MoE layers (MoEConfig::capacity_factor; 0 = dropless).
  double capacity_factor = 0.0;
  void validate() const;
};

struct ParallelConfig {
  int ep = 0;                         ///< expert-parallel degree; 0 = world size (dp = 1)
  bool reshard_after_forward = true;  ///< FSDP: free gathered units after their forward
  bool activation_checkpointing = false;  ///< recompute each block in backward
  /// MoE layers hide their row exchanges behind local expert work (MoEConfig::overlap_exchange).
  bool overlap_exchange = true;
  CommBackend comm = CommBackend::automatic;            ///< collectives backend: auto, mpi or nccl
  GpuAwareMpi gpu_aware_mpi = GpuAwareMpi::automatic;  ///< MPI takes GPU buffers: auto, true or false
  /// The options of the communicators built from this config.
  CommOptions comm_options() const { return {comm, gpu_aware_mpi}; }
  /// Deadline of every collective while training (s); a collective that misses it is reported
  /// (label, ranks that did not arrive) and the job aborted. 0 = off (blocking MPI calls).
  double watchdog_seconds = 600;
};

/// Per-rank memory accounting, in bytes.
struct MemoryReport {
  std::size_t dense_total_params = 0;  ///< all dense parameters (numbers, unsharded)
  std::size_t expert_total_params = 0; ///< all expert parameters of the model (numbers)
  std::size_t dense_shard = 0;         ///< this rank's FSDP shards
  std::size_t dense_grad_shard = 0;
  std::size_t gathered_unit_max = 0;   ///< largest gathered unit
  std::size_t gathered_peak = 0;       ///< gathered units alive at once, peak so far
  std::size_t grad_buffer = 0;         ///< full-size gradient buffer of one unit
  std::size_t experts = 0;             ///< local expert weights
  std::size_t expert_grads = 0;
  std::size_t optimizer = 0;           ///< AdamW moments of the shards and local experts
  std::size_t activations = 0;         ///< saved dense activations of one step
  std::size_t activations_without_checkpointing = 0;
  /// Step buffers besides the saved activations: logits, activation gradients, the MoE
  /// layers' dispatch rows (estimate_memory fills it; Model::memory() leaves it 0).
  std::size_t buffers = 0;
  /// Everything a rank holds at its peak: shards and their gradients and decay mask, gathered
  /// units, the gradient buffer, experts and their gradients, optimizer state, activations,
  /// buffers (saturates instead of overflowing).
  std::size_t total() const;
};

/// What a rank of a dp x ep mesh of `world_size` ranks will hold for this model in `S` of
/// `scalar_bytes` bytes, computed without allocating anything (so absurd configs can be
/// refused first). Experts are counted for the rank with the most of them (balanced blocks),
/// activations for `rows` tokens per rank (the largest batch a rank will see), gathered units
/// for the FSDP mode. Fields match Model::memory() of the same configuration (its most
/// loaded rank, after a step of `rows` tokens); sizes too large for size_t saturate.
/// With gradient accumulation (`micro_batches` > 1) `rows` is one micro-batch's and the
/// gradient buffer adds FSDP's accumulation buffer (one shard of the largest unit).
MemoryReport estimate_memory(const ModelConfig& cfg, const ParallelConfig& par, int world_size,
                             int ep_size, long long rows, std::size_t scalar_bytes, int micro_batches = 1);

/// One MoE layer's part of estimate_memory on the fullest rank of an expert-parallel group of
/// `ep_size` ranks, in bytes (saturating): its local experts' parameters (their gradients and
/// AdamW moments are as many again each), and its router state and the rows of the top_k
/// assignments of `rows` tokens (dispatch, expert input/output and their gradients, hidden
/// activations; with model.capacity_factor the experts' rows are their bound, C per local
/// expert). `examoe bench` checks its one layer with it.
struct MoELayerMemory {
  std::size_t experts = 0;
  std::size_t buffers = 0;
};
MoELayerMemory estimate_moe_layer_memory(const ModelConfig& cfg, int ep_size, long long rows,
                                         std::size_t scalar_bytes);

struct StepStats {
  double ce_sum = 0;          ///< local cross-entropy sum
  long long valid = 0;        ///< local valid targets
  long long correct = 0;      ///< local argmax-correct targets
  double aux = 0, z = 0;      ///< router losses summed over layers (global)
};

/// One tensor the optimizer steps, as one row of Model::param_table().
struct ParamSlot {
  enum class Owner { fsdp_unit, experts };
  Owner owner = Owner::fsdp_unit;
  int unit = -1;                           ///< fsdp_unit: the FSDP unit
  int layer = -1;                          ///< experts: the MoE layer
  ExpertTensor tensor = ExpertTensor::w1;  ///< experts: which expert tensor
  std::string name;                        ///< the unit's name, or "layer{l}.w1" (its dataset)
  std::vector<int> shape;                  ///< global shape: [unit numel], or [E][a][b]
  /// AdamW weight decay: experts decay on every element; a unit's parameters by its decay mask.
  bool decay = true;
};

/// One model replica's slice on this rank: FSDP shards of the dense parameters, the local
/// experts of every MoE layer, and the buffers of one step.
template <class S>
class Model {
 public:
  using execution_space = Kokkos::DefaultExecutionSpace;
  using memory_space = execution_space::memory_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, memory_space>;
  using vector = Kokkos::View<S*, memory_space>;
  using ivector = Kokkos::View<int*, memory_space>;

  static_assert(Kokkos::SpaceAccessibility<execution_space, memory_space>::accessible,
                "examoe::Model: the model's views must be accessible from its execution space");

  /// Every kernel of the model, its FSDP units and its MoE layers runs on `space` (the
  /// layers' and FSDP's communicators are ordered on it, so it is fixed for the model's life).
  Model(const ModelConfig& cfg, const ParallelConfig& par, Mesh& mesh, std::uint64_t seed,
        const execution_space& space = execution_space());
  ~Model();

  /// Forward + backward of this rank's sequences (`local.batch` may be 0). The loss is
  /// L = sum(CE) / global_valid + sum over layers (aux + z); gradients land in the FSDP
  /// shard gradients and the local expert gradients (reduced over the expert-data-parallel
  /// group). `step` keys the router noise. Collective over the world.
  StepStats forward_backward(const Batch& local, long long global_valid, std::uint64_t step);
  /// Gradient accumulation (train.micro_batches; docs/model.md, "Gradient accumulation"): the
  /// same step over this rank's share given as consecutive micro-batches (the same number on
  /// every rank, any of them may be empty), with the result of forward_backward of their
  /// concatenation up to rounding. A forward-only pass over every micro-batch first sums
  /// each layer's router statistics; then each micro-batch runs forward and backward with
  /// the whole step's aux and z losses and coefficients, its dense gradients reduce-scattered
  /// into (added to) the shard gradients and its expert gradients added on their owners.
  /// `global_valid` counts the targets of the whole step. Activations are those of one
  /// micro-batch. One micro-batch is forward_backward itself. Collective over the world.
  StepStats forward_backward_accumulated(const std::vector<Batch>& micro_batches, long long global_valid,
                                         std::uint64_t step);
  /// Forward only (no router noise); `correct` gets 1 per argmax-correct target row.
  /// `logits` (if given) receives the logits [rows][vocab] row-major, in float.
  StepStats evaluate(const Batch& local, std::vector<int>* correct = nullptr,
                     std::vector<float>* logits = nullptr);

  Fsdp<S>& fsdp() { return *fsdp_; }
  MoELayer<S>& moe(int layer) { return *moe_[layer]; }
  int n_layers() const { return cfg_.n_layers; }
  const ModelConfig& config() const { return cfg_; }
  const ParallelConfig& parallel() const { return par_; }
  Mesh& mesh() { return mesh_; }
  const execution_space& space() const { return space_; }
  MemoryReport memory() const;
  /// Layer l's statistics of the last training step: the layer's own (MoELayer::stats) after
  /// forward_backward or evaluate; after forward_backward_accumulated the whole step's: its
  /// tokens per expert and imbalance, the micro-batches' rows and bytes added up (each
  /// micro-batch's forward once, as a single step counts them), the seconds of every pass.
  const LayerStats& layer_stats(int l) const;

  /// Times the phases of every forward_backward / evaluate from now on (host clocks; on a GPU
  /// every phase then ends with a counted fence, so leave it off where that matters). Off by
  /// default: no clock read, no fence.
  void set_phase_timing(bool on) { time_phases_ = on; }
  /// The seconds per phase of the last forward_backward or evaluate (zeros when timing is off;
  /// `optimizer` is always 0 here, the trainer's).
  const StepPhaseSeconds& phase_seconds() const { return phase_s_; }

  /// The optimizer's tensors in their one order: the FSDP units, then per MoE layer w1, w2
  /// (and w3 for SwiGLU). AdamW tensor i is param_table()[i]; optimizer registration, expert
  /// migration and checkpoint I/O all walk this table.
  const std::vector<ParamSlot>& param_table() const { return table_; }
  /// The row of layer `layer`'s expert tensor `t` in param_table().
  int param_slot(int layer, ExpertTensor t) const;
  using flat = Kokkos::View<S*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  /// This rank's part of row i, flat: a unit's shard (padding included) or the local experts
  /// [n_local][a][b] of the current placement (valid until the experts move).
  flat param_values(int i) const;
  flat param_grads(int i) const;
  /// 1/0 per element of a unit's shard; extent 0 for experts (decay applies to every element).
  flat param_decay_mask(int i) const;

 private:
  /// Parameter ids of one block in the FSDP registry.
  struct BlockParams {
    int attn_norm, wq, wk, wv, wo, moe_norm, router;
    std::array<int, 3> shared{{-1, -1, -1}};  ///< shared experts' w1, w2, w3 (-1: none)
  };
  struct Acts;
  // Construction.
  void register_dense_parameters(std::uint64_t seed);
  void register_shared_experts();
  void build_moe_layers(std::uint64_t seed);
  void build_param_table();
  // One step, in the order run() calls them.
  StepStats run(const Batch& local, long long global_valid, bool training, std::uint64_t step,
                std::vector<int>* correct, std::vector<float>* logits = nullptr);
  void prepare(const Batch& b);
  void forward_blocks(bool training, std::uint64_t step, StepStats& st);
  void block_forward(int l, Acts& a, bool training);
  void head_forward_loss(long long global_valid, StepStats& st, std::vector<int>* correct,
                         std::vector<float>* logits);
  void head_backward();
  void block_backward(int l, std::uint64_t step);
  void embedding_backward();
  void reduce_expert_grads();
  // Gradient accumulation (accumulation.cpp).
  std::vector<std::int64_t> micro_batch_token_offsets(const std::vector<Batch>& micro);
  void prepare_agreed(const Batch& b);
  std::vector<RouterSums> router_statistics_pass(const std::vector<Batch>& micro,
                                                 const std::vector<std::int64_t>& offsets, std::uint64_t step);
  void micro_batch_forward_backward(const Batch& b, std::int64_t offset, long long global_valid,
                                    std::uint64_t step, bool accumulate, StepStats& st);
  void end_accumulation();
  /// The time since the previous tick belongs to `ph` (when timing is on).
  void tick(StepPhase ph);

  ModelConfig cfg_;
  ParallelConfig par_;
  Mesh& mesh_;
  execution_space space_;
  std::unique_ptr<Fsdp<S>> fsdp_;
  std::vector<std::unique_ptr<MoELayer<S>>> moe_;
  std::unique_ptr<impl::Collectives<execution_space>> edp_coll_;  // expert gradients over edp
  int u_embed_ = -1, u_head_ = -1, p_wte_ = -1, p_wpe_ = -1, p_fnorm_ = -1, p_head_ = -1;
  std::vector<int> u_block_;
  std::vector<BlockParams> bp_;
  std::vector<ParamSlot> table_;
  std::vector<std::unique_ptr<Acts>> acts_;  // per layer (or one shared with checkpointing)
  std::vector<matrix> xin_;                  // block inputs (checkpointing)
  matrix x_, dx_, t1_, t2_, f_, logits_;
  vector rf_;
  ivector tokens_, targets_, correct_;
  matrix dq_, dk_, dv_, do_;
  matrix ds_;  // attention score gradients [rows*heads][seq]
  std::unique_ptr<impl::GroupedGemm<execution_space>> attn_gemm_;  // the batched attention GEMMs
  std::unique_ptr<impl::SharedExperts<S>> shared_;  // the blocks' shared experts (null: none)
  bool time_phases_ = false;
  StepPhaseSeconds phase_s_{};
  std::chrono::steady_clock::time_point tick_;
  int rows_ = 0, batch_ = 0;
  /// Gradient accumulation: the global index of this micro-batch's first token (the layers'
  /// jitter keys), -1 outside it; the step's layer statistics and whether they are current.
  std::int64_t token_offset_ = -1;
  std::vector<LayerStats> step_stats_;
  bool step_stats_valid_ = false;
  std::int64_t allocations_ = 0;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace examoe
