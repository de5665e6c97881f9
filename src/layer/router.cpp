// The router of one MoE layer: see router.hpp. Kernels are free functions (nvcc does not
// allow device lambdas in private members).
#include "layer/router.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/watchdog.hpp>

#include <algorithm>
#include <cmath>

namespace examoe::impl {
namespace {

/// W[i/E][i%E] ~ U(-scale, scale), keyed by (seed, tensor 1, element).
template <class Space, class M>
void init_router_weights(const Space& space, const M& W, std::uint64_t seed, double scale) {
  const int E = static_cast<int>(W.extent(1)), n = static_cast<int>(W.size());
  using S = typename M::non_const_value_type;
  Kokkos::parallel_for(
      "examoe::moe::init_router", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
        const double u = uniform01(hash_key(seed, 1, 0, static_cast<std::uint64_t>(i)));
        W(i / E, i % E) = static_cast<S>(scale * (2 * u - 1));
      });
}

/// a += b, element-wise over two [n][m] matrices.
template <class Space, class M>
void accumulate(const Space& space, const M& a, const M& b) {
  const int m = static_cast<int>(a.extent(1)), n = static_cast<int>(a.size());
  Kokkos::parallel_for(
      "examoe::router::accumulate_dWr", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const int i) { a(i / m, i % m) += b(i / m, i % m); });
}

}  // namespace

template <class Scalar>
Router<Scalar>::Router(const MoEConfig& cfg, int ranks, const Space& space, HostReadback<Space>& readback)
    : space_(space), E_(cfg.num_experts), k_(cfg.top_k), d_(cfg.d_model),
      alpha_(cfg.router.aux_loss_coef), beta_(cfg.router.z_loss_coef), readback_(readback) {
  params_.inv_temperature = 1.0 / cfg.router.temperature;
  params_.renormalize = cfg.router.renormalize;
  params_.seed = cfg.router.seed;
  params_.sigmoid = cfg.router.score == RouterScore::sigmoid;
  params_.groups = cfg.router.groups > 0 ? cfg.router.groups : ranks;
  params_.topk_groups = cfg.router.topk_groups;
  if (params_.topk_groups > 0 &&
      (params_.topk_groups > params_.groups || k_ > params_.topk_groups * (E_ / params_.groups)))
    throw Error("examoe::impl::Router::Router: top_k = " + std::to_string(k_) + " experts cannot be chosen from " +
                "router.topk_groups = " + std::to_string(params_.topk_groups) + " of " +
                std::to_string(params_.groups) + " groups of " + std::to_string(E_ / params_.groups) +
                "+ experts" + (cfg.router.groups > 0 ? "" : " (router.groups = 0: one group per expert-parallel rank)"));
  bias_rate_ = cfg.router.bias_rate;
  bias_h_.assign(E_, 0.0);
  counts_since_update_.assign(E_, 0.0);
  if (bias_rate_ > 0) {
    bias_ = SView1("examoe::moe::router_bias", E_);
    bias_staging_ = Kokkos::View<Scalar*, kc::StagingSpace>("examoe::moe::router_bias_host", E_);
    modes_.bias = bias_;
  }
  jitter_ = cfg.router.jitter;
  const std::string p = "examoe::moe::";
  Wr_ = matrix(p + "Wr", d_, E_);
  dWr_ = matrix(p + "dWr", d_, E_);
  dWr_step_ = matrix(p + "dWr_step", d_, E_);
  aux_coef_ = DView1(p + "aux_coef", E_);
  aux_coef_h_ = Kokkos::View<double*, kc::StagingSpace>(p + "aux_coef_host", E_);
  sums_slot_ = readback_.template reserve<double>(static_cast<std::size_t>(E_) + 1);
  red_.assign(2 * static_cast<std::size_t>(E_) + 3, 0.0);
}

template <class Scalar>
void Router<Scalar>::init_weights(std::uint64_t seed) {
  init_router_weights(space_, Wr_, seed, 1.0 / std::sqrt(static_cast<double>(d_)));
}

template <class Scalar>
void Router<Scalar>::set_step(std::uint64_t step) {
  step_ = step;
  step_set_ = true;
}

template <class Scalar>
void Router<Scalar>::forward(const const_matrix& x, bool training, Communicator& stats_comm) {
  T_ = static_cast<int>(x.extent(0));
  if (!step_set_) ++step_;
  step_set_ = false;
  params_.step = step_;
  params_.jitter = training ? jitter_ : 0.0;
  params_.token_offset = params_.jitter > 0 ? (token_offset_set_ ? token_offset_ : stats_comm.exscan_sum(T_)) : 0;
  token_offset_set_ = false;

  ws_.reserve(probs_, "probs", T_, E_);
  ws_.reserve(lse_, "lse", T_);
  ws_.reserve(topk_, "topk", T_, k_);
  ws_.reserve(gates_, "gates", T_, k_);
  reserve_mode_views();
  training_ = training;
  auto p = rows_of(probs_, T_);
  auto l = head(lse_, T_);
  impl::kc::gemm(space_, "N", "N", Scalar(1), x, Wr_, Scalar(0), p);
  router_softmax_topk(space_, params_, p, l, topk(), gates(), modes_);
  // Every step rewrites the slot, also at T = 0: no sum of an earlier step survives.
  const auto sums = readback_.template device<double>(sums_slot_);
  if (T_ > 0) {
    const auto n = modes_.inv_sum;
    RouterStatsFunctor<Space, decltype(p), decltype(l), decltype(n)> f(p, l, n);
    Kokkos::parallel_reduce("examoe::router::stats", Kokkos::RangePolicy<Space>(space_, 0, T_), f, sums);
  } else {
    Kokkos::deep_copy(space_, sums, 0.0);
  }
}

/// The per-token views of the modes in use, sized for this forward's T (the bias stays).
template <class Scalar>
void Router<Scalar>::reserve_mode_views() {
  if (params_.sigmoid) {
    ws_.reserve(q_, "softmax_of_logits", T_, E_);
    ws_.reserve(inv_sum_, "inv_score_sum", T_);
    modes_.q = rows_of(q_, T_);
    modes_.inv_sum = head(inv_sum_, T_);
  }
  if (params_.topk_groups > 0) {
    ws_.reserve(chosen_, "chosen_groups", T_, params_.topk_groups);
    modes_.chosen = rows_of(chosen_, T_);
  }
}

template <class Scalar>
void Router<Scalar>::set_bias(const std::vector<double>& b) {
  if (static_cast<int>(b.size()) != E_)
    throw Error("examoe::impl::Router::set_bias: expected " + std::to_string(E_) + " values, got " +
                std::to_string(b.size()));
  if (bias_rate_ <= 0) return;  // off: the bias stays 0
  bias_h_ = b;
  for (int e = 0; e < E_; ++e) bias_staging_(e) = static_cast<Scalar>(bias_h_[e]);
  Kokkos::deep_copy(space_, bias_, bias_staging_);
  host_sync(space_);  // the staging buffer may be rewritten by the next update
}

template <class Scalar>
void Router<Scalar>::update_bias() {
  if (bias_rate_ <= 0) return;
  double mean = 0;
  for (double c : counts_since_update_) mean += c;
  mean /= E_;
  std::vector<double> b = bias_h_;
  for (int e = 0; e < E_; ++e) {
    const double gap = mean - counts_since_update_[e];
    b[e] += bias_rate_ * static_cast<double>((gap > 0) - (gap < 0));
  }
  counts_since_update_.assign(E_, 0.0);
  set_bias(b);
}

template <class Scalar>
void Router<Scalar>::reduce_statistics(const DispatchPlan& plan, const Placement& placement,
                                       Communicator& stats_comm, LayerStats& stats) {
  const int E = E_, P = placement.num_ranks();
  const auto sums = readback_.template host<double>(sums_slot_);
  for (int e = 0; e < E; ++e) red_[e] = plan.assignments_to(e);
  for (int i = 0; i <= E; ++i) red_[E + i] = sums(i);
  red_[2 * E + 2] = 0;
  red_[2 * E + 1] = T_;
  stats_comm.allreduce_sum(red_.data(), red_.size(), DataType::f64);
  adopt_step_sums();
  const double Tg = red_[2 * E + 1];
  double aux = 0;
  if (training_ && bias_rate_ > 0)
    for (int e = 0; e < E; ++e) counts_since_update_[e] += red_[e];
  for (int e = 0; e < E; ++e) {
    stats.tokens_per_expert[e] = static_cast<std::int64_t>(red_[e]);
    const double f = Tg > 0 ? red_[e] / (k_ * Tg) : 0.0;
    const double Pe = Tg > 0 ? red_[E + e] / Tg : 0.0;
    aux += f * Pe;
    aux_coef_h_(e) = Tg > 0 ? alpha_ * E * f / Tg : 0.0;
  }
  losses_.aux = alpha_ * E * aux;
  losses_.z = Tg > 0 ? beta_ * red_[2 * E] / Tg : 0.0;
  zcoef_ = Tg > 0 ? 2.0 * beta_ / Tg : 0.0;
  Kokkos::deep_copy(space_, aux_coef_, aux_coef_h_);
  // Imbalance of expert rows per rank, from the global counts.
  double mx = 0, sum = 0;
  for (int r = 0; r < P; ++r) {
    double rr = 0;
    for (int lx = 0; lx < placement.num_local(r); ++lx) rr += red_[placement.global_expert(r, lx)];
    mx = std::max(mx, rr);
    sum += rr;
  }
  stats.imbalance = sum > 0 ? mx / (sum / P) : 1.0;
}

template <class Scalar>
void Router<Scalar>::backward(const const_matrix& x, Collectives<Space>* reduce, const matrix& dx) {
  ws_.reserve(dz_, "dz", T_, E_);
  auto dzv = rows_of(dz_, T_);
  if (params_.sigmoid)
    router_backward_sigmoid(space_, params_, rows_of(probs_, T_), head(lse_, T_), topk(), gates(),
                            rows_of(dgate_, T_), aux_coef_, zcoef_, modes_.q, modes_.inv_sum, dzv);
  else
    router_backward_softmax(space_, params_, rows_of(probs_, T_), head(lse_, T_), topk(), gates(),
                            rows_of(dgate_, T_), aux_coef_, zcoef_, dzv);
  if (T_ > 0)
    impl::kc::gemm(space_, "T", "N", Scalar(1), x, dzv, Scalar(0), dWr_step_);
  else
    Kokkos::deep_copy(space_, dWr_step_, Scalar(0));
  if (reduce) {
    CollectiveLabel scope("moe.router_grad");
    reduce->allreduce_sum(dWr_step_.data(), dWr_step_.size());
  }
  accumulate(space_, dWr_, dWr_step_);
  impl::kc::gemm(space_, "N", "T", Scalar(1), dzv, Wr_, Scalar(0), dx);
}

template <class Scalar>
void Router<Scalar>::adopt_step_sums() {
  const int E = E_;
  sums_.assignments.assign(red_.begin(), red_.begin() + E);
  sums_.probabilities.assign(red_.begin() + E, red_.begin() + 2 * E);
  sums_.lse_squares = red_[2 * E];
  sums_.tokens = red_[2 * E + 1];
  if (!use_step_sums_) return;
  std::copy(step_sums_.assignments.begin(), step_sums_.assignments.end(), red_.begin());
  std::copy(step_sums_.probabilities.begin(), step_sums_.probabilities.end(), red_.begin() + E);
  red_[2 * E] = step_sums_.lse_squares;
  red_[2 * E + 1] = step_sums_.tokens;
}

template class Router<float>;
template class Router<double>;

}  // namespace examoe::impl
