// The MoE decoder on a dp x ep mesh: FSDP for every dense parameter, expert parallelism for
// the experts. Equations and parameter layout: docs/model.md.
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/dense_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/model.hpp>

#include "model/shared_experts.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>

namespace examoe {

const char* step_phase_name(StepPhase p) {
  switch (p) {
    case StepPhase::data: return "data";
    case StepPhase::embedding: return "embedding";
    case StepPhase::norms: return "norms";
    case StepPhase::attention: return "attention";
    case StepPhase::projections: return "projections";
    case StepPhase::loss: return "loss";
    case StepPhase::moe: return "moe";
    case StepPhase::fsdp_gather: return "fsdp_gather";
    case StepPhase::fsdp_reduce_scatter: return "fsdp_reduce_scatter";
    case StepPhase::expert_allreduce: return "expert_allreduce";
    case StepPhase::optimizer: return "optimizer";
    case StepPhase::count: break;
  }
  return "?";
}

void ModelConfig::validate() const {
  const std::string f = "examoe::ModelConfig::validate: ";
  auto positive = [&](const char* name, int v) {
    if (v <= 0) throw Error(f + name + " must be positive (got " + std::to_string(v) + ")");
  };
  if (vocab < 1 || vocab > kMaxVocab)
    throw Error(f + "vocab must be in [1, " + std::to_string(kMaxVocab) + "] (256: bytes), got " + std::to_string(vocab));
  positive("d_model", d_model);
  positive("n_layers", n_layers);
  positive("n_heads", n_heads);
  positive("seq_len", seq_len);
  if (d_model % n_heads != 0)
    throw Error(f + "d_model (" + std::to_string(d_model) + ") must be a multiple of n_heads (" +
                std::to_string(n_heads) + ")");
  if (!(norm_eps > 0)) throw Error(f + "norm_eps must be positive");
  if (num_shared_experts < 0 || shared_hidden < 0 || 1LL * num_shared_experts * shared_width() > INT32_MAX)
    throw Error(f + "num_shared_experts (" + std::to_string(num_shared_experts) + ") and shared_hidden (" +
                std::to_string(shared_hidden) + ", 0 = d_hidden) must be >= 0, their product at most 2^31 - 1");
  MoEConfig m;
  m.d_model = d_model;
  m.d_hidden = d_hidden;
  m.num_experts = num_experts;
  m.top_k = top_k;
  m.activation = activation;
  m.router = router;
  m.capacity_factor = capacity_factor;
  m.validate();
}

namespace {
namespace dk = impl::dense;

// First n rows / entries of a grow-only buffer.
template <class V>
auto rows(const V& v, int n) {
  return impl::rows_of(v, static_cast<std::size_t>(n));
}
template <class V>
auto head(const V& v, int n) {
  return impl::head(v, static_cast<std::size_t>(n));
}
/// y = a + b (element-wise: a team per row on a device, a thread per row on a host); y may alias a.
template <class Space, class A, class B, class Y>
void add(const Space& space, const A& a, const B& b, const Y& y) {
  using Team = typename Kokkos::TeamPolicy<Space>::member_type;
  const int n = static_cast<int>(y.extent(0)), d = static_cast<int>(y.extent(1));
  if (!impl::kc::device_memory_v<Space>) {  // a host thread per row walks it in order
    Kokkos::parallel_for(
        "examoe::model::residual", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
          for (int c = 0; c < d; ++c) y(i, c) = a(i, c) + b(i, c);
        });
    return;
  }
  Kokkos::parallel_for(
      "examoe::model::residual", Kokkos::TeamPolicy<Space>(space, n, Kokkos::AUTO), KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, d), [&](const int c) { y(i, c) = a(i, c) + b(i, c); });
      });
}
/// Sum of an int view (free function: nvcc forbids device lambdas in private members).
template <class Space, class V>
long long sum_ints(const Space& space, const V& v) {
  long long c = 0;
  impl::count_host_sync();  // a reduction into a host value waits for it
  Kokkos::parallel_reduce("examoe::model::count_correct",
                          Kokkos::RangePolicy<Space>(space, 0, static_cast<int>(v.extent(0))),
                          KOKKOS_LAMBDA(const int i, long long& acc) { acc += v(i); }, c);
  return c;
}
/// The attention shape of a batch of `batch` sequences.
dk::AttentionShape attention_shape(int batch, const ModelConfig& cfg) {
  dk::AttentionShape sh;
  sh.batch = batch;
  sh.seq = cfg.seq_len;
  sh.heads = cfg.n_heads;
  return sh;
}
}  // namespace

/// Saved activations of one block (rows = batch * seq).
template <class S>
struct Model<S>::Acts {
  Acts() {}  // see Fsdp::Unit: never value-initialise an aggregate holding Views
  matrix a, q, k, v, o, h, m, p;
  vector r1, r2;
  typename impl::SharedExperts<S>::Saved shared;  // the shared experts' activations
  int cap = 0;
};

template <class S>
Model<S>::Model(const ModelConfig& cfg, const ParallelConfig& par, Mesh& mesh, std::uint64_t seed,
                const execution_space& space)
    : cfg_(cfg), par_(par), mesh_(mesh), space_(space),
      attn_gemm_(std::make_unique<impl::GroupedGemm<execution_space>>()) {
  impl::agree(mesh_.world(), [&] { cfg_.validate(); });
  register_dense_parameters(seed);
  build_moe_layers(seed);
  build_param_table();
  const int nacts = par_.activation_checkpointing ? 1 : cfg_.n_layers;
  for (int i = 0; i < nacts; ++i) acts_.push_back(std::make_unique<Acts>());
  xin_.resize(cfg_.n_layers + 1);
}

/// FSDP units embed [wte, wpe], block l [attn_norm, wq, wk, wv, wo, moe_norm, router] and
/// head [final_norm, lm_head], laid out and filled from `seed`.
template <class S>
void Model<S>::register_dense_parameters(std::uint64_t seed) {
  const int d = cfg_.d_model, V = cfg_.vocab, E = cfg_.num_experts;
  const double sd = 1.0 / std::sqrt(static_cast<double>(d));
  fsdp_ = std::make_unique<Fsdp<S>>(mesh_.world(), par_.reshard_after_forward, space_);
  auto& F = *fsdp_;
  u_embed_ = F.add_unit("embed");
  p_wte_ = F.add_param(u_embed_, "embed.wte", {V, d}, {ParamInit::uniform, 1.0}, false);
  p_wpe_ = F.add_param(u_embed_, "embed.wpe", {cfg_.seq_len, d}, {ParamInit::uniform, 1.0}, false);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const std::string b = "block" + std::to_string(l) + ".";
    const int u = F.add_unit("block" + std::to_string(l));
    u_block_.push_back(u);
    BlockParams bp;
    bp.attn_norm = F.add_param(u, b + "attn_norm", {d}, {ParamInit::constant, 1.0}, false);
    bp.wq = F.add_param(u, b + "attn.wq", {d, d}, {ParamInit::uniform, sd}, true);
    bp.wk = F.add_param(u, b + "attn.wk", {d, d}, {ParamInit::uniform, sd}, true);
    bp.wv = F.add_param(u, b + "attn.wv", {d, d}, {ParamInit::uniform, sd}, true);
    bp.wo = F.add_param(u, b + "attn.wo", {d, d}, {ParamInit::uniform, sd}, true);
    bp.moe_norm = F.add_param(u, b + "moe_norm", {d}, {ParamInit::constant, 1.0}, false);
    bp.router = F.add_param(u, b + "moe.router", {d, E}, {ParamInit::uniform, sd}, true);
    bp_.push_back(bp);
  }
  u_head_ = F.add_unit("head");
  p_fnorm_ = F.add_param(u_head_, "final_norm", {d}, {ParamInit::constant, 1.0}, false);
  p_head_ = F.add_param(u_head_, "lm_head", {d, V}, {ParamInit::uniform, sd}, true);
  register_shared_experts();
  F.finalize(seed);
}

/// Block l's shared experts, in its unit after every other dense parameter (shared_experts.hpp).
template <class S>
void Model<S>::register_shared_experts() {
  if (cfg_.num_shared_experts == 0) return;
  shared_ = std::make_unique<impl::SharedExperts<S>>(cfg_.activation, cfg_.num_shared_experts * cfg_.shared_width());
  for (int l = 0; l < cfg_.n_layers; ++l) bp_[l].shared = impl::add_shared_expert_params(*fsdp_, u_block_[l], l, cfg_);
}

/// One MoE layer per block, on the mesh's communicators and the model's instance.
template <class S>
void Model<S>::build_moe_layers(std::uint64_t seed) {
  for (int l = 0; l < cfg_.n_layers; ++l) {
    MoEConfig m;
    m.d_model = cfg_.d_model;
    m.d_hidden = cfg_.d_hidden;
    m.num_experts = cfg_.num_experts;
    m.top_k = cfg_.top_k;
    m.activation = cfg_.activation;
    m.router = cfg_.router;
    m.dispatch_dtype = cfg_.dispatch_dtype;
    m.allow_tf32 = cfg_.allow_tf32;
    m.capacity_factor = cfg_.capacity_factor;
    m.overlap_exchange = par_.overlap_exchange;
    m.router.seed = seed + 1000003ull * static_cast<std::uint64_t>(l + 1);
    m.reduce_router_grad = false;  // FSDP reduce-scatters the router gradient
    // Non-finite activations in training are the trainer's policy (train.nonfinite), not an
    // input error of the layer.
    m.check_finite_inputs = false;
    // The run log reports the layers' phases (no fences on a GPU: events on the stream).
    m.time_phases = true;
    // Every layer shares the mesh's communicators (one NCCL communicator per group, not per layer).
    MoELayerOptions on_mesh;
    on_mesh.shared_comm = mesh_.ep_shared();
    on_mesh.shared_stats_comm = mesh_.world_shared();
    on_mesh.space = space_;
    moe_.push_back(std::make_unique<MoELayer<S>>(m, on_mesh));
    moe_.back()->init_parameters(m.router.seed);
  }
}

/// The FSDP units, then per MoE layer its expert tensors (param_table()).
template <class S>
void Model<S>::build_param_table() {
  const auto& F = *fsdp_;
  for (int u = 0; u < F.num_units(); ++u) {
    ParamSlot row;
    row.owner = ParamSlot::Owner::fsdp_unit;
    row.unit = u;
    row.name = F.unit_name(u);
    row.shape = {static_cast<int>(F.unit_numel(u))};
    table_.push_back(row);
  }
  for (int l = 0; l < cfg_.n_layers; ++l)
    for (ExpertTensor t : moe_[l]->expert_tensors()) {
      const auto w = moe_[l]->weights(t);
      ParamSlot row;
      row.owner = ParamSlot::Owner::experts;
      row.layer = l;
      row.tensor = t;
      row.name = "layer" + std::to_string(l) + "." + to_string(t);
      row.shape = {cfg_.num_experts, static_cast<int>(w.extent(1)), static_cast<int>(w.extent(2))};
      table_.push_back(row);
    }
}

template <class S>
Model<S>::~Model() = default;

template <class S>
void Model<S>::prepare(const Batch& b) {
  const int Sq = cfg_.seq_len, d = cfg_.d_model, V = cfg_.vocab, H = cfg_.n_heads;
  if (b.seq_len != Sq && b.batch > 0)
    throw Error("examoe::Model: batch has seq_len " + std::to_string(b.seq_len) + ", the model " +
                std::to_string(Sq));
  batch_ = b.batch;
  rows_ = b.batch * Sq;
  const int n = std::max(rows_, 1);
  auto grow = [&](matrix& m, const char* name, int r, int c) {
    if (m.extent(0) < static_cast<std::size_t>(r) || m.extent(1) != static_cast<std::size_t>(c)) {
      m = matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("examoe::model::") + name), r, c);
      ++allocations_;
    }
  };
  auto growv = [&](auto& v, const char* name, int r) {
    using VT = std::decay_t<decltype(v)>;
    if (v.extent(0) < static_cast<std::size_t>(r)) {
      v = VT(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("examoe::model::") + name), r);
      ++allocations_;
    }
  };
  for (int l = 0; l <= cfg_.n_layers; ++l) grow(xin_[l], "x", n, d);
  for (auto& a : acts_) {
    grow(a->a, "a", n, d); grow(a->q, "q", n, d); grow(a->k, "k", n, d); grow(a->v, "v", n, d);
    grow(a->o, "o", n, d); grow(a->h, "h", n, d); grow(a->m, "m", n, d);
    grow(a->p, "p", n * H, Sq);
    growv(a->r1, "r1", n); growv(a->r2, "r2", n);
  }
  grow(dx_, "dx", n, d); grow(t1_, "t1", n, d); grow(t2_, "t2", n, d); grow(f_, "f", n, d);
  grow(logits_, "logits", n, V);
  grow(dq_, "dq", n, d); grow(dk_, "dk", n, d); grow(dv_, "dv", n, d); grow(do_, "dO", n, d);
  grow(ds_, "ds", n * H, Sq);
  growv(rf_, "rf", n);
  growv(tokens_, "tokens", n); growv(targets_, "targets", n); growv(correct_, "correct", n);
  if (rows_ > 0) {
    auto ht = Kokkos::create_mirror_view(tokens_);
    auto hg = Kokkos::create_mirror_view(targets_);
    for (int i = 0; i < rows_; ++i) {
      const int t = b.tokens[i];
      if (t < 0 || t >= V)
        throw Error("examoe::Model: token " + std::to_string(t) + " outside [0, " + std::to_string(V) + ")");
      ht(i) = t;
      hg(i) = b.targets[i];
    }
    Kokkos::deep_copy(space_, tokens_, ht);
    Kokkos::deep_copy(space_, targets_, hg);
    impl::host_sync(space_);  // ht and hg are temporary host mirrors
  }
}

template <class S>
void Model<S>::tick(StepPhase ph) {
  if (!time_phases_) return;
  impl::host_sync(space_);  // free on host spaces; on a GPU the fence that makes the clock mean it
  const auto now = std::chrono::steady_clock::now();
  phase_s_[static_cast<int>(ph)] += std::chrono::duration<double>(now - tick_).count();
  tick_ = now;
}

template <class S>
void Model<S>::block_forward(int l, Acts& A, bool training) {
  auto& F = *fsdp_;
  const BlockParams& P = bp_[l];
  const int n = rows_;
  const execution_space& sp = space_;
  auto x = rows(xin_[l], n);
  dk::rmsnorm_forward(sp, x, F.param1(P.attn_norm), cfg_.norm_eps, rows(A.a, n), head(A.r1, n));
  tick(StepPhase::norms);
  dk::attention_project_qkv(sp, rows(A.a, n), F.param2(P.wq), F.param2(P.wk), F.param2(P.wv), rows(A.q, n),
                            rows(A.k, n), rows(A.v, n));
  tick(StepPhase::projections);
  dk::attention_core_forward(sp, *attn_gemm_, attention_shape(batch_, cfg_), rows(A.q, n), rows(A.k, n),
                             rows(A.v, n), rows(A.p, n * cfg_.n_heads), rows(A.o, n));
  tick(StepPhase::attention);
  impl::kc::gemm(sp, "N", "N", S(1), rows(A.o, n), F.param2(P.wo), S(0), rows(t1_, n));
  tick(StepPhase::projections);
  add(sp, x, rows(t1_, n), rows(A.h, n));
  dk::rmsnorm_forward(sp, rows(A.h, n), F.param1(P.moe_norm), cfg_.norm_eps, rows(A.m, n), head(A.r2, n));
  tick(StepPhase::norms);
  Kokkos::deep_copy(sp, moe_[l]->router_weight(), F.param2(P.router));
  if (shared_) {  // out = routed(m) + shared(m), the shared experts while the rows travel
    const auto w = impl::shared_expert_weights(F, P.shared, false);
    moe_[l]->forward(rows(A.m, n), rows(t2_, n), training,
                     [&] { shared_->forward(sp, rows(A.m, n), w, A.shared, rows(t1_, n)); });
    add(sp, rows(t2_, n), rows(t1_, n), rows(t2_, n));
  } else {
    moe_[l]->forward(rows(A.m, n), rows(t2_, n), training);
  }
  tick(StepPhase::moe);
  add(sp, rows(A.h, n), rows(t2_, n), rows(xin_[l + 1], n));
  tick(StepPhase::norms);
}

template <class S>
StepStats Model<S>::forward_backward(const Batch& local, long long global_valid, std::uint64_t step) {
  return run(local, global_valid, true, step, nullptr);
}

template <class S>
StepStats Model<S>::evaluate(const Batch& local, std::vector<int>* correct,
                             std::vector<float>* logits) {
  return run(local, 0, false, 0, correct, logits);
}

template <class S>
int Model<S>::param_slot(int layer, ExpertTensor t) const {
  for (std::size_t i = 0; i < table_.size(); ++i)
    if (table_[i].owner == ParamSlot::Owner::experts && table_[i].layer == layer && table_[i].tensor == t)
      return static_cast<int>(i);
  throw Error("examoe::Model::param_slot: layer " + std::to_string(layer) + " has no expert tensor " + to_string(t));
}

template <class S>
auto Model<S>::param_values(int i) const -> flat {
  const ParamSlot& row = table_[i];
  if (row.owner == ParamSlot::Owner::fsdp_unit) return flat(fsdp_->shard(row.unit).data(), fsdp_->shard_numel(row.unit));
  const auto w = moe_[row.layer]->weights(row.tensor);
  return flat(w.data(), w.size());
}

template <class S>
auto Model<S>::param_grads(int i) const -> flat {
  const ParamSlot& row = table_[i];
  if (row.owner == ParamSlot::Owner::fsdp_unit)
    return flat(fsdp_->shard_grad(row.unit).data(), fsdp_->shard_numel(row.unit));
  const auto g = moe_[row.layer]->weight_grads(row.tensor);
  return flat(g.data(), g.size());
}

template <class S>
auto Model<S>::param_decay_mask(int i) const -> flat {
  const ParamSlot& row = table_[i];
  if (row.owner == ParamSlot::Owner::fsdp_unit)
    return flat(fsdp_->shard_decay_mask(row.unit).data(), fsdp_->shard_numel(row.unit));
  return flat();
}

/// One step: forward through every block, the head's loss, and (training) backward and the
/// expert-gradient reduction.
template <class S>
StepStats Model<S>::run(const Batch& local, long long global_valid, bool training,
                        std::uint64_t step, std::vector<int>* correct,
                        std::vector<float>* logits_out) {
  phase_s_.fill(0.0);
  step_stats_valid_ = false;
  if (time_phases_) {
    impl::host_sync(space_);
    tick_ = std::chrono::steady_clock::now();
  }
  {
    impl::CollectiveLabel label("model.check_batch");
    impl::agree(mesh_.world(), [&] { prepare(local); });
  }
  tick(StepPhase::data);
  StepStats st;
  forward_blocks(training, step, st);
  head_forward_loss(global_valid, st, correct, logits_out);
  if (!training) {
    fsdp_->release(u_head_);
    return st;
  }
  for (int l = 0; l < cfg_.n_layers; ++l) moe_[l]->zero_grad();
  tick(StepPhase::moe);
  head_backward();
  for (int l = cfg_.n_layers - 1; l >= 0; --l) block_backward(l, step);
  embedding_backward();
  reduce_expert_grads();
  tick(StepPhase::expert_allreduce);
  impl::count_host_sync();
  Kokkos::fence();
  return st;
}

/// Embedding, then every block (gathering each unit, releasing it after its forward when
/// resharding or evaluating); adds the layers' router losses to `st`.
template <class S>
void Model<S>::forward_blocks(bool training, std::uint64_t step, StepStats& st) {
  auto& F = *fsdp_;
  const int n = rows_;
  F.gather(u_embed_);
  tick(StepPhase::fsdp_gather);
  if (n > 0)
    dk::embedding_forward(space_, head(tokens_, n), cfg_.seq_len, F.param2(p_wte_), F.param2(p_wpe_),
                          rows(xin_[0], n));
  tick(StepPhase::embedding);
  if (par_.reshard_after_forward || !training) F.release(u_embed_);
  tick(StepPhase::fsdp_gather);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    F.gather(u_block_[l]);
    tick(StepPhase::fsdp_gather);
    if (training) moe_[l]->set_step(step);
    if (training && token_offset_ >= 0) moe_[l]->set_token_offset(token_offset_);
    block_forward(l, *acts_[par_.activation_checkpointing ? 0 : l], training);
    if (par_.reshard_after_forward || !training) F.release(u_block_[l]);
    tick(StepPhase::fsdp_gather);
    st.aux += moe_[l]->losses().aux;
    st.z += moe_[l]->losses().z;
    tick(StepPhase::moe);
  }
}

/// Final norm, LM head and cross-entropy (sum scaled by 1/global_valid); the logits become
/// their gradient in place. Leaves the head unit gathered.
template <class S>
void Model<S>::head_forward_loss(long long global_valid, StepStats& st, std::vector<int>* correct,
                                 std::vector<float>* logits_out) {
  auto& F = *fsdp_;
  const int n = rows_, L = cfg_.n_layers;
  F.gather(u_head_);
  tick(StepPhase::fsdp_gather);
  dk::rmsnorm_forward(space_, rows(xin_[L], n), F.param1(p_fnorm_), cfg_.norm_eps, rows(f_, n), head(rf_, n));
  tick(StepPhase::norms);
  auto lg = rows(logits_, n);
  impl::kc::gemm(space_, "N", "N", S(1), rows(f_, n), F.param2(p_head_), S(0), lg);
  tick(StepPhase::projections);
  const double scale = global_valid > 0 ? 1.0 / static_cast<double>(global_valid) : 0.0;
  long long valid = 0;
  if (logits_out) {  // before cross_entropy turns them into gradients in place
    auto h = impl::host_copy_of(lg);
    logits_out->assign(h.data(), h.data() + static_cast<std::size_t>(n) * cfg_.vocab);
  }
  st.ce_sum = n > 0 ? dk::cross_entropy(space_, lg, head(targets_, n), scale, lg, head(correct_, n), &valid) : 0.0;
  st.valid = valid;
  if (n > 0) {
    auto cv = head(correct_, n);
    st.correct = sum_ints(space_, cv);
    if (correct) {
      auto h = impl::host_copy_of(cv);
      correct->assign(h.data(), h.data() + n);
    }
  } else if (correct) {
    correct->clear();
  }
  tick(StepPhase::loss);
}

/// Backward of the LM head and final norm from dlogits (in logits_) into dx_.
template <class S>
void Model<S>::head_backward() {
  auto& F = *fsdp_;
  const int n = rows_, L = cfg_.n_layers;
  F.begin_grad(space_, u_head_);
  tick(StepPhase::fsdp_reduce_scatter);
  if (n > 0) {
    auto lg = rows(logits_, n);
    impl::kc::gemm(space_, "T", "N", S(1), rows(f_, n), lg, S(1), F.grad2(p_head_));
    impl::kc::gemm(space_, "N", "T", S(1), lg, F.param2(p_head_), S(0), rows(t1_, n));
    tick(StepPhase::projections);
    dk::rmsnorm_backward(space_, rows(xin_[L], n), F.param1(p_fnorm_), head(rf_, n), rows(t1_, n),
                         rows(dx_, n), F.grad1(p_fnorm_));
    tick(StepPhase::norms);
  }
  F.reduce_scatter_grad(u_head_);
  F.release(u_head_);
  tick(StepPhase::fsdp_reduce_scatter);
}

/// Backward of block l (recomputing its forward first with activation checkpointing):
/// dx_ in, dx_ out; its unit's gradient reduce-scattered.
template <class S>
void Model<S>::block_backward(int l, std::uint64_t step) {
  auto& F = *fsdp_;
  const int n = rows_, H = cfg_.n_heads;
  const execution_space& sp = space_;
  const bool ckpt = par_.activation_checkpointing;
  const BlockParams& P = bp_[l];
  Acts& A = *acts_[ckpt ? 0 : l];
  auto dx = rows(dx_, n);
  F.gather(u_block_[l]);
  tick(StepPhase::fsdp_gather);
  if (ckpt) {  // recompute the block (same router noise step) instead of storing it
    moe_[l]->set_step(step);
    if (token_offset_ >= 0) moe_[l]->set_token_offset(token_offset_);
    block_forward(l, A, true);
  }
  F.begin_grad(sp, u_block_[l]);
  tick(StepPhase::fsdp_reduce_scatter);
  // x_out = h + moe(m): dh = dx + rmsnorm2^T(moe^T(dx))
  auto dm = rows(t1_, n);
  if (shared_) {  // dm = routed^T(dx) + shared^T(dx), the shared experts while the rows travel
    const auto w = impl::shared_expert_weights(F, P.shared, false);
    const auto dw = impl::shared_expert_weights(F, P.shared, true);
    moe_[l]->backward(dx, dm, [&] { shared_->backward(sp, rows(A.m, n), dx, w, dw, A.shared, rows(t2_, n)); });
    add(sp, dm, rows(t2_, n), dm);
  } else {
    moe_[l]->backward(dx, dm);
  }
  tick(StepPhase::moe);
  auto dh = rows(t2_, n);
  dk::rmsnorm_backward(sp, rows(A.h, n), F.param1(P.moe_norm), head(A.r2, n), dm, dh,
                       F.grad1(P.moe_norm));
  add(sp, dh, dx, dh);
  tick(StepPhase::norms);
  // h = x + attn(a): dx = dh + rmsnorm1^T(attn^T(dh))
  auto da = rows(t1_, n);
  const auto sh = attention_shape(batch_, cfg_);
  auto dO = rows(do_, n), dq = rows(dq_, n), dkk = rows(dk_, n), dv = rows(dv_, n);
  impl::kc::gemm(sp, "N", "T", S(1), dh, F.param2(P.wo), S(0), dO);  // out = o wo
  impl::kc::gemm(sp, "T", "N", S(1), rows(A.o, n), dh, S(1), F.grad2(P.wo));
  tick(StepPhase::projections);
  dk::attention_core_backward(sp, *attn_gemm_, sh, rows(A.q, n), rows(A.k, n), rows(A.v, n), rows(A.p, n * H),
                              rows(A.o, n), dO, dq, dkk, dv, rows(ds_, n * H));
  tick(StepPhase::attention);
  dk::attention_project_qkv_backward(sp, rows(A.a, n), F.param2(P.wq), F.param2(P.wk), F.param2(P.wv), dq, dkk,
                                     dv, da, F.grad2(P.wq), F.grad2(P.wk), F.grad2(P.wv));
  tick(StepPhase::projections);
  dk::rmsnorm_backward(sp, rows(xin_[l], n), F.param1(P.attn_norm), head(A.r1, n), da, dx,
                       F.grad1(P.attn_norm));
  add(sp, dx, dh, dx);
  tick(StepPhase::norms);
  Kokkos::deep_copy(sp, F.grad2(P.router), moe_[l]->router_grad());
  tick(StepPhase::moe);
  F.reduce_scatter_grad(u_block_[l]);
  F.release(u_block_[l]);
  tick(StepPhase::fsdp_reduce_scatter);
}

/// Backward of the embeddings from dx_.
template <class S>
void Model<S>::embedding_backward() {
  auto& F = *fsdp_;
  const int n = rows_;
  F.gather(u_embed_);
  tick(StepPhase::fsdp_gather);
  F.begin_grad(space_, u_embed_);
  tick(StepPhase::fsdp_reduce_scatter);
  if (n > 0)
    dk::embedding_backward(space_, head(tokens_, n), cfg_.seq_len, rows(dx_, n), F.grad2(p_wte_),
                           F.grad2(p_wpe_));
  tick(StepPhase::embedding);
  F.reduce_scatter_grad(u_embed_);
  F.release(u_embed_);
  tick(StepPhase::fsdp_reduce_scatter);
}

/// Expert gradients: summed over the replicas of this expert-parallel group.
template <class S>
void Model<S>::reduce_expert_grads() {
  if (mesh_.dp_size() <= 1) return;
  impl::CollectiveLabel label("experts.grad_allreduce");
  if (!edp_coll_) edp_coll_ = std::make_unique<impl::Collectives<execution_space>>(mesh_.edp(), space_);
  for (int l = 0; l < cfg_.n_layers; ++l) {
    auto& m = *moe_[l];
    for (auto g : {m.w1_grad(), m.w2_grad(), m.w3_grad()})
      if (g.size() > 0) edp_coll_->allreduce_sum(g.data(), g.size());
  }
}

template <class S>
MemoryReport Model<S>::memory() const {
  MemoryReport r;
  const auto& F = *fsdp_;
  r.dense_total_params = F.total_numel();
  r.dense_shard = F.shard_bytes();
  r.dense_grad_shard = F.shard_bytes();
  r.gathered_unit_max = F.gathered_bytes_max_unit();
  r.gathered_peak = F.gathered_bytes_peak();
  r.grad_buffer = F.grad_buffer_bytes();
  const std::size_t per_expert = static_cast<std::size_t>(cfg_.d_model) * cfg_.d_hidden *
                                 (cfg_.activation == Activation::swiglu ? 3 : 2);
  r.expert_total_params = per_expert * cfg_.num_experts * cfg_.n_layers;
  for (const auto& m : moe_) {
    const std::size_t b = (m->w1().size() + m->w2().size() + m->w3().size()) * sizeof(S);
    r.experts += b;
    r.expert_grads += b;
  }
  r.optimizer = 2 * (r.dense_shard + r.experts);
  // Saved dense activations per block: a, q, k, v, o, h, m (rows x d), p (rows*heads x seq), r1, r2,
  // and the shared experts' hidden activations.
  const std::size_t rows = static_cast<std::size_t>(std::max(rows_, 0));
  const std::size_t shared = shared_ ? shared_->saved_per_row() * rows : 0;
  const std::size_t per_block =
      (7 * rows * cfg_.d_model + rows * cfg_.n_heads * cfg_.seq_len + 2 * rows + shared) * sizeof(S);
  const std::size_t inputs = (cfg_.n_layers + 1) * rows * cfg_.d_model * sizeof(S);
  r.activations_without_checkpointing = per_block * cfg_.n_layers + inputs;
  r.activations = per_block * acts_.size() + inputs;
  return r;
}

template class Model<float>;
template class Model<double>;

}  // namespace examoe
