#include <examoe/error.hpp>
#include <examoe/fsdp.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/watchdog.hpp>

#include <algorithm>
#include <numeric>

namespace examoe {

namespace {
/// a[i] += b[i] for i < n (free function: nvcc forbids device lambdas in private members).
template <class Space, class V>
void add_into(const Space& space, const V& a, const V& b, std::size_t n) {
  Kokkos::parallel_for(
      "examoe::fsdp::accumulate_grad", Kokkos::RangePolicy<Space>(space, 0, n),
      KOKKOS_LAMBDA(const std::size_t i) { a(i) += b(i); });
}
}  // namespace

template <class S>
Fsdp<S>::Fsdp(Communicator& world, bool reshard_after_forward, const execution_space& space)
    : world_(world), reshard_(reshard_after_forward), space_(space),
      coll_(std::make_unique<impl::Collectives<execution_space>>(world, space)) {}
template <class S>
Fsdp<S>::~Fsdp() = default;

template <class S>
int Fsdp<S>::add_unit(const std::string& name) {
  if (finalized_) throw Error("examoe::Fsdp::add_unit: already finalized");
  units_.emplace_back();
  units_.back().name = name;
  return static_cast<int>(units_.size()) - 1;
}

template <class S>
int Fsdp<S>::add_param(int unit, const std::string& name, const std::vector<int>& shape,
                       ParamInit init, bool weight_decay) {
  if (finalized_) throw Error("examoe::Fsdp::add_param: already finalized");
  if (unit < 0 || unit >= num_units()) throw Error("examoe::Fsdp::add_param: no unit " + std::to_string(unit));
  if (shape.empty() || shape.size() > 2)
    throw Error("examoe::Fsdp::add_param: " + name + " must have rank 1 or 2");
  Param p;
  p.name = name;
  p.unit = unit;
  p.shape = shape;
  p.numel = 1;
  for (int s : shape) {
    if (s <= 0) throw Error("examoe::Fsdp::add_param: " + name + " has a non-positive extent");
    p.numel *= static_cast<std::size_t>(s);
  }
  p.init = init;
  p.decay = weight_decay;
  params_.push_back(p);
  units_[unit].params.push_back(static_cast<int>(params_.size()) - 1);
  return static_cast<int>(params_.size()) - 1;
}

template <class S>
void Fsdp<S>::finalize(std::uint64_t seed) {
  const int W = world_.size(), me = world_.rank();
  std::size_t max_padded = 0;
  for (std::size_t u = 0; u < units_.size(); ++u) {
    Unit& U = units_[u];
    U.numel = 0;
    for (int p : U.params) {
      params_[p].offset = U.numel;
      U.numel += params_[p].numel;
    }
    U.padded = (U.numel + W - 1) / W * W;
    U.shard = U.padded / W;
    max_padded = std::max(max_padded, U.padded);
    const std::string lbl = "examoe::fsdp::" + U.name + "::";
    U.shard_param = vector(lbl + "shard", U.shard);
    U.shard_grad = vector(lbl + "shard_grad", U.shard);
    U.decay_mask = vector(lbl + "decay_mask", U.shard);
    // Initial values and decay mask of this rank's shard, element by element.
    auto hp = Kokkos::create_mirror_view(U.shard_param);
    auto hm = Kokkos::create_mirror_view(U.decay_mask);
    const std::size_t first = static_cast<std::size_t>(me) * U.shard;
    std::size_t pi = 0;
    for (std::size_t i = 0; i < U.shard; ++i) {
      const std::size_t g = first + i;
      while (pi < U.params.size() && g >= params_[U.params[pi]].offset + params_[U.params[pi]].numel) ++pi;
      if (pi == U.params.size()) {  // padding
        hp(i) = S(0);
        hm(i) = S(0);
        continue;
      }
      const int pid = U.params[pi];
      const Param& P = params_[pid];
      const std::size_t local = g - P.offset;
      double v = P.init.value;
      if (P.init.kind == ParamInit::uniform)
        v = P.init.value *
            (2 * impl::uniform01(impl::hash_key(seed, 0xF5D9, static_cast<std::uint64_t>(pid), local)) - 1);
      hp(i) = static_cast<S>(v);
      hm(i) = P.decay ? S(1) : S(0);
    }
    Kokkos::deep_copy(space_, U.shard_param, hp);
    Kokkos::deep_copy(space_, U.decay_mask, hm);
    impl::host_sync(space_);  // hp and hm are temporary host mirrors
    if (!reshard_) U.full = vector(lbl + "full", U.padded);
  }
  if (reshard_) pool_ = vector("examoe::fsdp::gather_pool", max_padded);
  gbuf_ = vector("examoe::fsdp::grad_buffer", max_padded);
  finalized_ = true;
}

template <class S>
S* Fsdp<S>::unit_data(int u) const {
  if (!units_[u].gathered)
    throw Error("examoe::Fsdp: unit '" + units_[u].name + "' is used but not gathered");
  return reshard_ ? pool_.data() : units_[u].full.data();
}

template <class S>
void Fsdp<S>::gather(int u) {
  Unit& U = units_[u];
  if (U.gathered) return;
  if (reshard_ && pool_unit_ >= 0 && pool_unit_ != u) units_[pool_unit_].gathered = false;
  S* dst = reshard_ ? pool_.data() : U.full.data();
  impl::CollectiveLabel label("fsdp.allgather");
  coll_->allgather(U.shard_param.data(), dst, U.shard);
  U.gathered = true;
  if (reshard_) pool_unit_ = u;
  account();
}

template <class S>
void Fsdp<S>::release(int u) {
  units_[u].gathered = false;
  if (reshard_ && pool_unit_ == u) pool_unit_ = -1;
}

template <class S>
void Fsdp<S>::account() {
  std::size_t live = 0;
  for (const Unit& U : units_)
    if (U.gathered) live += U.padded * sizeof(S);
  peak_gathered_ = std::max(peak_gathered_, live);
}

template <class S>
auto Fsdp<S>::param1(int p) const -> uvector {
  return uvector(unit_data(params_[p].unit) + params_[p].offset, params_[p].numel);
}
template <class S>
auto Fsdp<S>::param2(int p) const -> umatrix {
  const Param& P = params_[p];
  if (P.shape.size() != 2) throw Error("examoe::Fsdp::param2: " + P.name + " is not a matrix");
  return umatrix(unit_data(P.unit) + P.offset, P.shape[0], P.shape[1]);
}

template <class S>
void Fsdp<S>::begin_grad(const execution_space& space, int u) {
  grad_unit_ = u;
  Kokkos::deep_copy(space, Kokkos::subview(gbuf_, Kokkos::make_pair(std::size_t(0), units_[u].padded)), S(0));
}
template <class S>
auto Fsdp<S>::grad1(int p) const -> uvector {
  if (params_[p].unit != grad_unit_)
    throw Error("examoe::Fsdp::grad1: gradient of " + params_[p].name + " asked outside its unit's backward");
  return uvector(gbuf_.data() + params_[p].offset, params_[p].numel);
}
template <class S>
auto Fsdp<S>::grad2(int p) const -> umatrix {
  const Param& P = params_[p];
  if (P.unit != grad_unit_)
    throw Error("examoe::Fsdp::grad2: gradient of " + P.name + " asked outside its unit's backward");
  return umatrix(gbuf_.data() + P.offset, P.shape[0], P.shape[1]);
}
template <class S>
void Fsdp<S>::reduce_scatter_grad(int u) {
  if (u != grad_unit_) throw Error("examoe::Fsdp::reduce_scatter_grad: unit not in backward");
  impl::CollectiveLabel label("fsdp.reduce_scatter");
  Unit& U = units_[u];
  if (!accumulate_) {
    coll_->reduce_scatter_sum(gbuf_.data(), U.shard_grad.data(), U.shard);
  } else {
    if (acc_.size() == 0) {
      std::size_t max_shard = 0;
      for (const Unit& V : units_) max_shard = std::max(max_shard, V.shard);
      acc_ = vector("examoe::fsdp::grad_accumulation", max_shard);
    }
    coll_->reduce_scatter_sum(gbuf_.data(), acc_.data(), U.shard);
    add_into(space_, U.shard_grad, acc_, U.shard);
  }
  grad_unit_ = -1;
}

template <class S>
std::size_t Fsdp<S>::total_numel() const {
  std::size_t n = 0;
  for (const Unit& U : units_) n += U.numel;
  return n;
}
template <class S>
std::size_t Fsdp<S>::shard_bytes() const {
  std::size_t n = 0;
  for (const Unit& U : units_) n += U.shard;
  return n * sizeof(S);
}
template <class S>
std::size_t Fsdp<S>::gathered_bytes_max_unit() const {
  std::size_t n = 0;
  for (const Unit& U : units_) n = std::max(n, U.padded);
  return n * sizeof(S);
}

template class Fsdp<float>;
template class Fsdp<double>;

}  // namespace examoe
