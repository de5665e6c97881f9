// The MoE decoder on a dp x ep mesh: FSDP for every dense parameter, expert parallelism for
// the experts. Equations and parameter layout: docs/model.md.
#include <examoe/error.hpp>
#include <examoe/impl/dense_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/impl/workspace.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/model.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace examoe {

void ModelConfig::validate() const {
  const std::string f = "examoe::ModelConfig::validate: ";
  auto positive = [&](const char* name, int v) {
    if (v <= 0) throw Error(f + name + " must be positive (got " + std::to_string(v) + ")");
  };
  if (vocab != 256) throw Error(f + "vocab must be 256 (byte-level model), got " + std::to_string(vocab));
  positive("d_model", d_model);
  positive("n_layers", n_layers);
  positive("n_heads", n_heads);
  positive("seq_len", seq_len);
  if (d_model % n_heads != 0)
    throw Error(f + "d_model (" + std::to_string(d_model) + ") must be a multiple of n_heads (" +
                std::to_string(n_heads) + ")");
  if (!(norm_eps > 0)) throw Error(f + "norm_eps must be positive");
  MoEConfig m;
  m.d_model = d_model;
  m.d_hidden = d_hidden;
  m.num_experts = num_experts;
  m.top_k = top_k;
  m.activation = activation;
  m.router = router;
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
/// y = a + b (element-wise); y may alias a.
template <class A, class B, class Y>
void add(const A& a, const B& b, const Y& y) {
  const int n = static_cast<int>(y.extent(0)), d = static_cast<int>(y.extent(1));
  Kokkos::parallel_for(
      "examoe::model::residual", Kokkos::RangePolicy<>(0, n), KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < d; ++c) y(i, c) = a(i, c) + b(i, c);
      });
}
/// Sum of an int view (free function: nvcc forbids device lambdas in private members).
template <class Space, class V>
long long sum_ints(const Space& space, const V& v) {
  long long c = 0;
  Kokkos::parallel_reduce("examoe::model::count_correct",
                          Kokkos::RangePolicy<Space>(space, 0, static_cast<int>(v.extent(0))),
                          KOKKOS_LAMBDA(const int i, long long& acc) { acc += v(i); }, c);
  return c;
}
}  // namespace

/// Saved activations of one block (rows = batch * seq).
template <class S>
struct Model<S>::Acts {
  Acts() {}  // see Fsdp::Unit: never value-initialise an aggregate holding Views
  matrix a, q, k, v, o, h, m, p;
  vector r1, r2;
  int cap = 0;
};

template <class S>
Model<S>::Model(const ModelConfig& cfg, const ParallelConfig& par, Mesh& mesh, std::uint64_t seed)
    : cfg_(cfg), par_(par), mesh_(mesh) {
  std::string err;
  try {
    cfg_.validate();
  } catch (const Error& e) {
    err = e.what();
  }
  throw_if_any(mesh_.world(), err);
  const int d = cfg_.d_model, V = cfg_.vocab, E = cfg_.num_experts;
  const double sd = 1.0 / std::sqrt(static_cast<double>(d));
  fsdp_ = std::make_unique<Fsdp<S>>(mesh_.world(), par_.reshard_after_forward);
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
  F.finalize(seed);

  for (int l = 0; l < cfg_.n_layers; ++l) {
    MoEConfig m;
    m.d_model = d;
    m.d_hidden = cfg_.d_hidden;
    m.num_experts = E;
    m.top_k = cfg_.top_k;
    m.activation = cfg_.activation;
    m.router = cfg_.router;
    m.router.seed = seed + 1000003ull * static_cast<std::uint64_t>(l + 1);
    m.reduce_router_grad = false;  // FSDP reduce-scatters the router gradient
    // Non-finite activations in training are the trainer's policy (train.nonfinite), not an
    // input error of the layer.
    m.check_finite_inputs = false;
    // Every layer shares the mesh's communicators (one NCCL communicator per group, not per layer).
    moe_.push_back(std::make_unique<MoELayer<S>>(m, mesh_.ep_shared(), mesh_.world_shared()));
    moe_.back()->init_parameters(m.router.seed);
  }
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
      row.shape = {E, static_cast<int>(w.extent(1)), static_cast<int>(w.extent(2))};
      table_.push_back(row);
    }
  const int nacts = par_.activation_checkpointing ? 1 : cfg_.n_layers;
  for (int i = 0; i < nacts; ++i) acts_.push_back(std::make_unique<Acts>());
  xin_.resize(cfg_.n_layers + 1);
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
  growv(rf_, "rf", n);
  growv(tokens_, "tokens", n); growv(targets_, "targets", n); growv(correct_, "correct", n);
  if (rows_ > 0) {
    auto ht = Kokkos::create_mirror_view(tokens_);
    auto hg = Kokkos::create_mirror_view(targets_);
    for (int i = 0; i < rows_; ++i) {
      const int t = b.tokens[i];
      if (t < 0 || t >= V) throw Error("examoe::Model: token " + std::to_string(t) + " outside [0, 256)");
      ht(i) = t;
      hg(i) = b.targets[i];
    }
    Kokkos::deep_copy(tokens_, ht);
    Kokkos::deep_copy(targets_, hg);
  }
}

template <class S>
void Model<S>::block_forward(int l, Acts& A, bool training) {
  auto& F = *fsdp_;
  const BlockParams& P = bp_[l];
  const int n = rows_;
  const execution_space sp;
  dk::AttentionShape sh;
  sh.batch = batch_;
  sh.seq = cfg_.seq_len;
  sh.heads = cfg_.n_heads;
  auto x = rows(xin_[l], n);
  dk::rmsnorm_forward(sp, x, F.param1(P.attn_norm), cfg_.norm_eps, rows(A.a, n), head(A.r1, n));
  dk::attention_forward(sp, sh, rows(A.a, n), F.param2(P.wq), F.param2(P.wk), F.param2(P.wv),
                        F.param2(P.wo), rows(A.q, n), rows(A.k, n), rows(A.v, n),
                        rows(A.p, n * cfg_.n_heads), rows(A.o, n), rows(t1_, n));
  add(x, rows(t1_, n), rows(A.h, n));
  dk::rmsnorm_forward(sp, rows(A.h, n), F.param1(P.moe_norm), cfg_.norm_eps, rows(A.m, n), head(A.r2, n));
  Kokkos::deep_copy(moe_[l]->router_weight(), F.param2(P.router));
  moe_[l]->forward(rows(A.m, n), rows(t2_, n), training);
  add(rows(A.h, n), rows(t2_, n), rows(xin_[l + 1], n));
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

template <class S>
StepStats Model<S>::run(const Batch& local, long long global_valid, bool training,
                        std::uint64_t step, std::vector<int>* correct,
                        std::vector<float>* logits_out) {
  std::string err;
  try {
    prepare(local);
  } catch (const Error& e) {
    err = e.what();
  }
  {
    impl::CollectiveLabel label("model.check_batch");
    throw_if_any(mesh_.world(), err);
  }
  auto& F = *fsdp_;
  const int n = rows_, L = cfg_.n_layers, H = cfg_.n_heads;
  const execution_space sp;
  const bool ckpt = par_.activation_checkpointing;
  StepStats st;

  // ---- forward
  F.gather(u_embed_);
  if (n > 0)
    dk::embedding_forward(sp, head(tokens_, n), cfg_.seq_len, F.param2(p_wte_), F.param2(p_wpe_),
                          rows(xin_[0], n));
  if (par_.reshard_after_forward || !training) F.release(u_embed_);
  for (int l = 0; l < L; ++l) {
    F.gather(u_block_[l]);
    if (training) moe_[l]->set_step(step);
    block_forward(l, *acts_[ckpt ? 0 : l], training);
    if (par_.reshard_after_forward || !training) F.release(u_block_[l]);
    st.aux += moe_[l]->losses().aux;
    st.z += moe_[l]->losses().z;
  }
  F.gather(u_head_);
  dk::rmsnorm_forward(sp, rows(xin_[L], n), F.param1(p_fnorm_), cfg_.norm_eps, rows(f_, n), head(rf_, n));
  auto lg = rows(logits_, n);
  impl::kc::gemm(sp, "N", "N", S(1), rows(f_, n), F.param2(p_head_), S(0), lg);
  const double scale = global_valid > 0 ? 1.0 / static_cast<double>(global_valid) : 0.0;
  long long valid = 0;
  if (logits_out) {  // before cross_entropy turns them into gradients in place
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), lg);
    logits_out->assign(h.data(), h.data() + static_cast<std::size_t>(n) * cfg_.vocab);
  }
  st.ce_sum = n > 0 ? dk::cross_entropy(sp, lg, head(targets_, n), scale, lg, head(correct_, n), &valid) : 0.0;
  st.valid = valid;
  if (n > 0) {
    auto cv = head(correct_, n);
    st.correct = sum_ints(sp, cv);
    if (correct) {
      auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), cv);
      correct->assign(h.data(), h.data() + n);
    }
  } else if (correct) {
    correct->clear();
  }
  if (!training) {
    F.release(u_head_);
    return st;
  }

  // ---- backward (dlogits is in logits_)
  for (int l = 0; l < L; ++l) moe_[l]->zero_grad();
  F.begin_grad(u_head_);
  auto dx = rows(dx_, n);
  if (n > 0) {
    impl::kc::gemm(sp, "T", "N", S(1), rows(f_, n), lg, S(1), F.grad2(p_head_));
    impl::kc::gemm(sp, "N", "T", S(1), lg, F.param2(p_head_), S(0), rows(t1_, n));
    dk::rmsnorm_backward(sp, rows(xin_[L], n), F.param1(p_fnorm_), head(rf_, n), rows(t1_, n), dx,
                         F.grad1(p_fnorm_));
  }
  F.reduce_scatter_grad(u_head_);
  F.release(u_head_);

  dk::AttentionShape sh;
  sh.batch = batch_;
  sh.seq = cfg_.seq_len;
  sh.heads = H;
  for (int l = L - 1; l >= 0; --l) {
    const BlockParams& P = bp_[l];
    Acts& A = *acts_[ckpt ? 0 : l];
    F.gather(u_block_[l]);
    if (ckpt) {  // recompute the block (same router noise step) instead of storing it
      moe_[l]->set_step(step);
      block_forward(l, A, true);
    }
    F.begin_grad(u_block_[l]);
    // x_out = h + moe(m): dh = dx + rmsnorm2^T(moe^T(dx))
    auto dm = rows(t1_, n);
    moe_[l]->backward(dx, dm);
    auto dh = rows(t2_, n);
    dk::rmsnorm_backward(sp, rows(A.h, n), F.param1(P.moe_norm), head(A.r2, n), dm, dh,
                         F.grad1(P.moe_norm));
    add(dh, dx, dh);
    // h = x + attn(a): dx = dh + rmsnorm1^T(attn^T(dh))
    auto da = rows(t1_, n);
    dk::attention_backward(sp, sh, rows(A.a, n), F.param2(P.wq), F.param2(P.wk), F.param2(P.wv),
                           F.param2(P.wo), rows(A.q, n), rows(A.k, n), rows(A.v, n),
                           rows(A.p, n * H), rows(A.o, n), dh, da, F.grad2(P.wq), F.grad2(P.wk),
                           F.grad2(P.wv), F.grad2(P.wo), rows(dq_, n), rows(dk_, n), rows(dv_, n),
                           rows(do_, n));
    dk::rmsnorm_backward(sp, rows(xin_[l], n), F.param1(P.attn_norm), head(A.r1, n), da, dx,
                         F.grad1(P.attn_norm));
    add(dx, dh, dx);
    Kokkos::deep_copy(F.grad2(P.router), moe_[l]->router_grad());
    F.reduce_scatter_grad(u_block_[l]);
    F.release(u_block_[l]);
  }
  F.gather(u_embed_);
  F.begin_grad(u_embed_);
  if (n > 0)
    dk::embedding_backward(sp, head(tokens_, n), cfg_.seq_len, dx, F.grad2(p_wte_), F.grad2(p_wpe_));
  F.reduce_scatter_grad(u_embed_);
  F.release(u_embed_);

  // Expert gradients: summed over the replicas of this expert-parallel group.
  if (mesh_.dp_size() > 1) {
    impl::CollectiveLabel label("experts.grad_allreduce");
    if (!edp_coll_)
      edp_coll_ = std::make_unique<impl::Collectives<execution_space>>(mesh_.edp(), execution_space());
    for (int l = 0; l < L; ++l) {
      auto& m = *moe_[l];
      for (auto g : {m.w1_grad(), m.w2_grad(), m.w3_grad()})
        if (g.size() > 0) edp_coll_->allreduce_sum(g.data(), g.size());
    }
  }
  Kokkos::fence();
  return st;
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
  // Saved dense activations per block: a, q, k, v, o, h, m (rows x d), p (rows*heads x seq), r1, r2.
  const std::size_t rows = static_cast<std::size_t>(std::max(rows_, 0));
  const std::size_t per_block =
      (7 * rows * cfg_.d_model + rows * cfg_.n_heads * cfg_.seq_len + 2 * rows) * sizeof(S);
  const std::size_t inputs = (cfg_.n_layers + 1) * rows * cfg_.d_model * sizeof(S);
  r.activations_without_checkpointing = per_block * cfg_.n_layers + inputs;
  r.activations = per_block * acts_.size() + inputs;
  return r;
}

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
std::pair<double, double> moe_layer_values(const ModelConfig& cfg, int ep_size, double rows) {
  const double d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts, k = cfg.top_k;
  const double per_expert = d * h * (cfg.activation == Activation::swiglu ? 3 : 2);
  const double local_experts = std::ceil(E / std::max(ep_size, 1));  // balanced blocks
  const double A = rows * k;
  return {local_experts * per_expert, rows * (3 * E + 3 * k) + A * (8 * d + 5 * h)};
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
                             int ep_size, long long rows, std::size_t scalar_bytes) {
  // Same layout as Model: units embed [wte, wpe], block l [attn_norm, wq, wk, wv, wo,
  // moe_norm, router], head [final_norm, lm_head], each padded to a multiple of the world.
  // In doubles: every product stays exact up to 2^53 and cannot overflow.
  const double d = cfg.d_model, V = cfg.vocab, Sq = cfg.seq_len, E = cfg.num_experts,
               L = cfg.n_layers, h = cfg.d_hidden, H = cfg.n_heads, W = std::max(world_size, 1),
               sb = static_cast<double>(scalar_bytes), r = static_cast<double>(std::max(rows, 0LL));
  auto padded = [&](double n) { return std::ceil(n / W) * W; };
  const double embed = V * d + Sq * d, block = 2 * d + 4 * d * d + d * E, head = d + d * V;
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
  m.grad_buffer = saturate(max_padded * sb);
  m.experts = saturate(local_expert_values * L * sb);
  m.expert_grads = m.experts;
  m.optimizer = saturate(2 * (shard + local_expert_values * L) * sb);
  const double per_block = 7 * r * d + r * H * Sq + 2 * r;
  const double inputs = (L + 1) * r * d;
  m.activations_without_checkpointing = saturate((per_block * L + inputs) * sb);
  m.activations = saturate((per_block * (par.activation_checkpointing ? 1 : L) + inputs) * sb);
  // Logits, 8 activation-gradient/scratch matrices, and per MoE layer its router state and
  // the rows of its k assignments per token (dispatch, expert input/output and their
  // gradients, hidden activations).
  m.buffers = saturate((r * V + 8 * r * d + r + L * moe) * sb);
  return m;
}

template class Model<float>;
template class Model<double>;

}  // namespace examoe
