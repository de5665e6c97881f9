// The experts of one MoE layer: see experts.hpp. Kernels are free functions (nvcc does not
// allow device lambdas in private members).
#include "layer/experts.hpp"

#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace examoe::impl {
namespace {

/// w[l][..] ~ U(-scale, scale), keyed by (seed, tensor id, global expert id, element): the
/// same expert gets the same weights on whichever rank holds it.
template <class Space, class T3, class IV>
void init_expert_weights(const Space& space, const T3& w, const IV& gids, std::uint64_t seed,
                         std::uint64_t tensor_id, double scale) {
  const int n1 = static_cast<int>(w.extent(1)), n2 = static_cast<int>(w.extent(2));
  const int total = static_cast<int>(w.extent(0)) * n1 * n2;
  using S = typename T3::non_const_value_type;
  Kokkos::parallel_for(
      "examoe::moe::init_experts", Kokkos::RangePolicy<Space>(space, 0, total),
      KOKKOS_LAMBDA(const int i) {
        const int l = i / (n1 * n2), r = i % (n1 * n2);
        const double u = uniform01(hash_key(seed, tensor_id, static_cast<std::uint64_t>(gids(l)),
                                            static_cast<std::uint64_t>(r)));
        w(l, r / n2, r % n2) = static_cast<S>(scale * (2 * u - 1));
      });
}

}  // namespace

template <class Scalar>
Experts<Scalar>::Experts(const MoEConfig& cfg, int num_local, const Space& space)
    : space_(space), d_(cfg.d_model), h_(cfg.d_hidden), nloc_(num_local),
      swiglu_(cfg.activation == Activation::swiglu),
      by_expert_(cfg.expert_schedule == ExpertSchedule::by_expert ||
                 (cfg.expert_schedule == ExpertSchedule::automatic && !kc::device_memory_v<Space>)),
      gemm_(cfg.allow_tf32) {
  const std::string p = "examoe::moe::";
  W1_ = tensor3(p + "W1", nloc_, d_, h_);
  W2_ = tensor3(p + "W2", nloc_, h_, d_);
  W3_ = tensor3(p + "W3", swiglu_ ? nloc_ : 0, d_, h_);
  allocate_grads();
}

template <class Scalar>
void Experts<Scalar>::allocate_grads() {
  dW1_ = tensor3("examoe::moe::dW1", nloc_, d_, h_);
  dW2_ = tensor3("examoe::moe::dW2", nloc_, h_, d_);
  dW3_ = tensor3("examoe::moe::dW3", swiglu_ ? nloc_ : 0, d_, h_);
}

template <class Scalar>
void Experts<Scalar>::init_weights(std::uint64_t seed, const Placement& placement, int me) {
  Kokkos::View<int*, Mem> gids("examoe::moe::global_ids", std::max(1, nloc_));
  auto gh = Kokkos::create_mirror_view(gids);
  for (int l = 0; l < nloc_; ++l) gh(l) = placement.global_expert(me, l);
  Kokkos::deep_copy(space_, gids, gh);
  const double sd = 1.0 / std::sqrt(static_cast<double>(d_)), sh = 1.0 / std::sqrt(static_cast<double>(h_));
  init_expert_weights(space_, W1_, gids, seed, 2, sd);
  init_expert_weights(space_, W2_, gids, seed, 3, sh);
  init_expert_weights(space_, W3_, gids, seed, 4, sd);
  host_sync(space_);  // gids and gh are temporaries
}

template <class Scalar>
auto Experts<Scalar>::inputs(int rows) -> matrix& {
  ws_.reserve(xe_, "xe", rows, d_);
  return xe_;
}

template <class Scalar>
auto Experts<Scalar>::output_grads(int rows) -> matrix& {
  ws_.reserve(dye_, "dye", rows, d_);
  return dye_;
}

template <class Scalar>
void Experts<Scalar>::hidden(const DispatchPlan& plan, ExpertRows which) {
  const int nrows = plan.expert_rows();
  ws_.reserve(hbuf_, "h", nrows, h_);
  if (swiglu_) ws_.reserve(ubuf_, "u", nrows, h_);
  const auto& groups = plan.row_groups(which);
  // h = x W1 (and u = x W3): one grouped GEMM per projection
  grouped_gemm_rows(space_, gemm_, false, Scalar(1), xe_, W1_, Scalar(0), hbuf_, groups);
  if (swiglu_) grouped_gemm_rows(space_, gemm_, false, Scalar(1), xe_, W3_, Scalar(0), ubuf_, groups);
}

template <class Scalar>
void Experts<Scalar>::activate(const DispatchPlan& plan) {
  const int nrows = plan.expert_rows();
  ws_.reserve(abuf_, "a", nrows, h_);
  auto H = rows_of(hbuf_, nrows);
  auto Aa = rows_of(abuf_, nrows);
  if (swiglu_)
    swiglu_forward(space_, H, rows_of(ubuf_, nrows), Aa);
  else
    gelu_forward(space_, H, Aa);
}

template <class Scalar>
void Experts<Scalar>::output(const DispatchPlan& plan, ExpertRows which) {
  ws_.reserve(ye_, "ye", plan.expert_rows(), d_);
  // y = a W2
  grouped_gemm_rows(space_, gemm_, false, Scalar(1), abuf_, W2_, Scalar(0), ye_, plan.row_groups(which));
}

template <class Scalar>
void Experts<Scalar>::hidden_grad(const DispatchPlan& plan, ExpertRows which) {
  const int nrows = plan.expert_rows();
  ws_.reserve(dabuf_, "da", nrows, h_);
  if (swiglu_) ws_.reserve(dubuf_, "du", nrows, h_);
  // da = dy W2^T
  grouped_gemm_rows(space_, gemm_, true, Scalar(1), dye_, W2_, Scalar(0), dabuf_, plan.row_groups(which));
}

template <class Scalar>
void Experts<Scalar>::activation_backward(const DispatchPlan& plan) {
  const int nrows = plan.expert_rows();
  auto H = rows_of(hbuf_, nrows);
  auto dA = rows_of(dabuf_, nrows);
  if (swiglu_)
    swiglu_backward(space_, H, rows_of(ubuf_, nrows), dA, rows_of(dubuf_, nrows));
  else
    gelu_backward(space_, H, dA);
}

template <class Scalar>
void Experts<Scalar>::input_grad(const DispatchPlan& plan, ExpertRows which) {
  ws_.reserve(dxe_, "dxe", plan.expert_rows(), d_);
  const auto& groups = plan.row_groups(which);
  // dx = dh W1^T (+ du W3^T)
  grouped_gemm_rows(space_, gemm_, true, Scalar(1), dabuf_, W1_, Scalar(0), dxe_, groups);
  if (swiglu_) grouped_gemm_rows(space_, gemm_, true, Scalar(1), dubuf_, W3_, Scalar(1), dxe_, groups);
}

template <class Scalar>
void Experts<Scalar>::weight_grads(const DispatchPlan& plan) {
  const std::vector<int>& o = plan.expert_row_offsets();
  // dW2 += a^T dy, dW1 += x^T dh (dW3 += x^T du)
  grouped_gemm_weights(space_, gemm_, Scalar(1), abuf_, dye_, dW2_, o);
  grouped_gemm_weights(space_, gemm_, Scalar(1), xe_, dabuf_, dW1_, o);
  if (swiglu_) grouped_gemm_weights(space_, gemm_, Scalar(1), xe_, dubuf_, dW3_, o);
}

// ------------------------------------------------------------------ the layer's stages
template <class Scalar>
void Experts<Scalar>::forward_kept(const DispatchPlan& plan) {
  if (by_expert_) {
    if (!one_visit()) forward_chunks(plan, ExpertRows::kept, nullptr);
  } else {
    hidden(plan, ExpertRows::kept);
  }
}

template <class Scalar>
void Experts<Scalar>::forward_arrived(const DispatchPlan& plan, ExpertRows which, const WireRows* wire) {
  if (by_expert_) {
    forward_chunks(plan, one_visit() ? ExpertRows::all : which, wire);
  } else {
    hidden(plan, which);
    activate(plan);
    output(plan, which);
  }
}

template <class Scalar>
void Experts<Scalar>::forward_kept_rest(const DispatchPlan& plan) {
  if (!by_expert_) output(plan, ExpertRows::kept);  // by expert, the kept rows are done
}

template <class Scalar>
void Experts<Scalar>::backward_kept(const DispatchPlan& plan) {
  if (by_expert_) {
    if (!one_visit()) backward_chunks(plan, ExpertRows::kept, false, nullptr);
  } else {
    hidden_grad(plan, ExpertRows::kept);
  }
}

template <class Scalar>
void Experts<Scalar>::backward_arrived(const DispatchPlan& plan, ExpertRows which, const WireRows* wire) {
  if (by_expert_) {
    // and the weight gradients, expert after expert
    backward_chunks(plan, one_visit() ? ExpertRows::all : which, true, wire);
  } else {
    hidden_grad(plan, which);
    activation_backward(plan);
    input_grad(plan, which);
  }
}

template <class Scalar>
void Experts<Scalar>::backward_rest(const DispatchPlan& plan, bool overlap) {
  if (by_expert_) return;  // the weight gradients ran with each expert's last rows
  if (overlap) input_grad(plan, ExpertRows::kept);
  weight_grads(plan);
}

// ------------------------------------------------------------------ by expert (host backends)
namespace {
/// What the by-expert schedule keeps in cache at a time: a chunk's rows, or one expert's weights.
constexpr std::size_t kCacheBytes = std::size_t{1} << 20;
}  // namespace

/// Rows per chunk: as many as fit in kCacheBytes of a chunk's xe, h (u), a and ye. Fewer than
/// 256 do not pay (every chunk repacks the weights for its GEMMs, about 12 / rows of their
/// work): then a block is one chunk, whatever its size.
template <class Scalar>
int Experts<Scalar>::chunk_rows() const {
  const std::size_t row_bytes = sizeof(Scalar) * static_cast<std::size_t>(2 * d_ + (swiglu_ ? 3 : 2) * h_);
  const std::size_t fit = kCacheBytes / std::max<std::size_t>(1, row_bytes);
  return fit >= 256 ? static_cast<int>(fit) : std::numeric_limits<int>::max();
}

/// Whether, by expert, every local expert is visited once per direction, its kept and received
/// rows together after the exchange (no kept rows while it travels): where the weights fit in
/// kCacheBytes. A second visit would fetch them again from memory, which costs more than a host
/// exchange hides (at d=128, h=256, E=256 on 2 ranks: 82 ms per step in one visit, 94 ms in
/// two). Larger weights are fetched per chunk either way.
template <class Scalar>
bool Experts<Scalar>::one_visit() const {
  return by_expert_ && weights_fit_in_cache();
}
template <class Scalar>
bool Experts<Scalar>::weights_fit_in_cache() const {
  return sizeof(Scalar) * static_cast<std::size_t>(d_) * h_ * (swiglu_ ? 3 : 2) <= kCacheBytes;
}

/// Local expert l's weights streamed into the cache before its GEMMs, where they fit in
/// kCacheBytes (small experts): each GEMM call repacks them, and a pack that fetches cold
/// weights line by line is several times slower than this one front-to-back read (at d=128,
/// h=256, E=256 on 2 ranks: 12.6 ms of a 94 ms step in packing, 4 ms after; docs/performance.md).
/// Large experts' GEMMs have enough rows to hide the fetch.
template <class Scalar>
void Experts<Scalar>::stream_weights(int l) const {
  if constexpr (kc::device_memory_v<Space>) return;  // by expert on a GPU (asked for): no host reads
  if (!weights_fit_in_cache()) return;
  const std::size_t n = static_cast<std::size_t>(d_) * h_, bytes = sizeof(Scalar) * n;
  host::stream_into_cache(W1_.data() + l * n, bytes);
  host::stream_into_cache(W2_.data() + l * n, bytes);
  if (swiglu_) host::stream_into_cache(W3_.data() + l * n, bytes);
}

template <class Scalar>
void Experts<Scalar>::reserve_forward(int rows) {
  ws_.reserve(hbuf_, "h", rows, h_);
  if (swiglu_) ws_.reserve(ubuf_, "u", rows, h_);
  ws_.reserve(abuf_, "a", rows, h_);
  ws_.reserve(ye_, "ye", rows, d_);
}

template <class Scalar>
void Experts<Scalar>::reserve_backward(int rows) {
  ws_.reserve(dabuf_, "da", rows, h_);
  if (swiglu_) ws_.reserve(dubuf_, "du", rows, h_);
  ws_.reserve(dxe_, "dxe", rows, d_);
}

namespace {
// Rows [b, e) of a row matrix, and expert l's matrix of a weight tensor (as the grouped GEMMs').
template <class M>
auto chunk_of(const M& m, int b, int e) {
  return detail::group_rows(m, b, e);
}
template <class T3>
auto expert_of(const T3& w, int l) {
  return detail::group_matrix(w, l);
}
/// Rows [b, e) of group g on the wire: of `wire` (a buffer of the exchange), from the block's
/// row there, `wire_row`.
template <class M>
auto wire_chunk(const M& wire, int wire_row, const RowGroup& g, int b, int e) {
  return chunk_of(wire, wire_row + (b - g.begin), wire_row + (e - g.begin));
}
/// Where rows [b, e) of group g write their results: rows of `own` (ye or dxe), or, for a
/// received block (`wire_row` >= 0) with the exchange's buffers, the combine's send buffer.
template <class M, class WireRows>
auto output_rows(const M& own, const WireRows* wire, int wire_row, const RowGroup& g, int b, int e) {
  if (wire != nullptr && wire_row >= 0) return wire_chunk(wire->send_back, wire_row, g, b, e);
  return chunk_of(own, b, e);
}
/// Copies a received block's rows [b, e) (wire_row >= 0) from the dispatch's receive buffer into
/// `own` (xe or dye) where the experts read them from the wire (WireRows); else `own` has them.
template <class Space, class M, class WireRows>
void copy_arrived_rows(const Space& space, const M& own, const WireRows* wire, int wire_row, const RowGroup& g,
                       int b, int e) {
  if (wire != nullptr && wire_row >= 0)
    Kokkos::deep_copy(space, chunk_of(own, b, e), wire_chunk(wire->arrived, wire_row, g, b, e));
}
/// f(b, e) for the chunks [b, e) of at most `step` rows of group g, from its first row.
template <class F>
void for_each_chunk(const RowGroup& g, int step, const F& f) {
  for (int b = g.begin, e = 0; b < g.end; b = e) {
    e = g.end - b > step ? b + step : g.end;
    f(b, e);
  }
}
}  // namespace

template <class Scalar>
void Experts<Scalar>::forward_chunks(const DispatchPlan& plan, ExpertRows which, const WireRows* wire) {
  reserve_forward(plan.expert_rows());
  for (int p = 0; p < (swiglu_ ? 3 : 2); ++p) count_gemm_call();  // one grouped call per projection
  const int step = chunk_rows();
  const Scalar one(1), zero(0);
  const std::vector<RowGroup>& groups = plan.row_groups(which);  // ordered by local expert
  const std::vector<int>& wire_row = plan.row_group_wire_row(which);
  int streamed = -1;
  for (std::size_t i = 0; i < groups.size(); ++i) {
    const RowGroup& g = groups[i];
    if (g.w != streamed) stream_weights(streamed = g.w);
    for_each_chunk(g, step, [&](int b, int e) {
      copy_arrived_rows(space_, xe_, wire, wire_row[i], g, b, e);
      auto x = chunk_of(xe_, b, e), hc = chunk_of(hbuf_, b, e), ac = chunk_of(abuf_, b, e);
      kc::gemm_uncounted(space_, "N", "N", one, x, expert_of(W1_, g.w), zero, hc);
      if (swiglu_) {
        auto uc = chunk_of(ubuf_, b, e);
        kc::gemm_uncounted(space_, "N", "N", one, x, expert_of(W3_, g.w), zero, uc);
        swiglu_forward(space_, hc, uc, ac);
      } else {
        gelu_forward(space_, hc, ac);
      }
      kc::gemm_uncounted(space_, "N", "N", one, ac, expert_of(W2_, g.w), zero,
                         output_rows(ye_, wire, wire_row[i], g, b, e));
    });
  }
}

template <class Scalar>
void Experts<Scalar>::backward_chunks(const DispatchPlan& plan, ExpertRows which, bool weight_grads,
                                      const WireRows* wire) {
  reserve_backward(plan.expert_rows());
  for (int p = 0; p < (swiglu_ ? 3 : 2) * (weight_grads ? 2 : 1); ++p) count_gemm_call();
  const int step = chunk_rows();
  const Scalar one(1), zero(0);
  const std::vector<RowGroup>& groups = plan.row_groups(which);  // ordered by local expert
  const std::vector<int>& wire_row = plan.row_group_wire_row(which);
  std::size_t next = 0;
  for (int l = 0; l < nloc_; ++l) {
    if (next < groups.size() && groups[next].w == l) stream_weights(l);
    for (; next < groups.size() && groups[next].w == l; ++next) {
      for_each_chunk(groups[next], step, [&](int b, int e) {
        copy_arrived_rows(space_, dye_, wire, wire_row[next], groups[next], b, e);
        auto hc = chunk_of(hbuf_, b, e), dac = chunk_of(dabuf_, b, e);
        auto dx = output_rows(dxe_, wire, wire_row[next], groups[next], b, e);
        kc::gemm_uncounted(space_, "N", "T", one, chunk_of(dye_, b, e), expert_of(W2_, l), zero, dac);
        if (swiglu_) {
          auto uc = chunk_of(ubuf_, b, e), duc = chunk_of(dubuf_, b, e);
          swiglu_backward(space_, hc, uc, dac, duc);
          kc::gemm_uncounted(space_, "N", "T", one, dac, expert_of(W1_, l), zero, dx);
          kc::gemm_uncounted(space_, "N", "T", one, duc, expert_of(W3_, l), one, dx);
        } else {
          gelu_backward(space_, hc, dac);
          kc::gemm_uncounted(space_, "N", "T", one, dac, expert_of(W1_, l), zero, dx);
        }
      });
    }
    if (weight_grads) expert_weight_grads(plan, l);  // while this expert's last rows are in cache
  }
}

/// dW2 += a^T dye, dW1 += xe^T dh (dW3 += xe^T du) of local expert l: one GEMM per tensor over
/// all its rows.
template <class Scalar>
void Experts<Scalar>::expert_weight_grads(const DispatchPlan& plan, int l) {
  const std::vector<int>& o = plan.expert_row_offsets();
  if (o[l] == o[l + 1]) return;
  const Scalar one(1);
  auto x = chunk_of(xe_, o[l], o[l + 1]), dh = chunk_of(dabuf_, o[l], o[l + 1]);
  kc::gemm_uncounted(space_, "T", "N", one, chunk_of(abuf_, o[l], o[l + 1]), chunk_of(dye_, o[l], o[l + 1]), one,
                     expert_of(dW2_, l));
  kc::gemm_uncounted(space_, "T", "N", one, x, dh, one, expert_of(dW1_, l));
  if (swiglu_) kc::gemm_uncounted(space_, "T", "N", one, x, chunk_of(dubuf_, o[l], o[l + 1]), one, expert_of(dW3_, l));
}

template <class Scalar>
void Experts<Scalar>::migrate(const MigrationPlan& plan, Collectives<Space>& coll,
                              std::vector<flat_vector>& state) {
  const std::size_t block = static_cast<std::size_t>(d_) * h_;
  auto move3 = [&](tensor3& w) {
    auto flat = migrate_blocks(space_, coll, plan, w.data(), block);
    tensor3 nw(Kokkos::view_alloc(Kokkos::WithoutInitializing, w.label()), plan.new_local(),
               w.extent(1), w.extent(2));
    Kokkos::deep_copy(space_, Kokkos::View<Scalar*, Mem, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(nw.data(), nw.size()), flat);
    w = nw;
  };
  move3(W1_);
  move3(W2_);
  if (swiglu_) move3(W3_);
  for (auto& t : state) t = migrate_blocks(space_, coll, plan, t.data(), block);
  nloc_ = plan.new_local();
  allocate_grads();
}

template <class Scalar>
auto Experts<Scalar>::weights(ExpertTensor t) const -> const tensor3& {
  return t == ExpertTensor::w1 ? W1_ : t == ExpertTensor::w2 ? W2_ : W3_;
}
template <class Scalar>
auto Experts<Scalar>::grads(ExpertTensor t) const -> const tensor3& {
  return t == ExpertTensor::w1 ? dW1_ : t == ExpertTensor::w2 ? dW2_ : dW3_;
}

template <class Scalar>
void Experts<Scalar>::zero_grad() {
  Kokkos::deep_copy(space_, dW1_, Scalar(0));
  Kokkos::deep_copy(space_, dW2_, Scalar(0));
  Kokkos::deep_copy(space_, dW3_, Scalar(0));
}

template class Experts<float>;
template class Experts<double>;

}  // namespace examoe::impl
