#include <examoe/error.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/optimizer.hpp>

#include <cmath>

namespace examoe {

template <class S>
void AdamW<S>::add(const vector& param, const vector& grad, const vector& decay_mask, bool decay) {
  if (param.extent(0) != grad.extent(0) || (decay_mask.extent(0) != 0 && decay_mask.extent(0) != param.extent(0)))
    throw Error("examoe::AdamW::add: parameter, gradient and mask sizes differ");
  Tensor t;
  t.p = param;
  t.g = grad;
  t.mask = decay_mask;
  t.decay = decay;
  t.m = Kokkos::View<S*, memory_space>("examoe::adamw::m", param.extent(0));
  t.v = Kokkos::View<S*, memory_space>("examoe::adamw::v", param.extent(0));
  tensors_.push_back(t);
}

template <class S>
void AdamW<S>::step(const execution_space& space, double lr, double grad_scale) {
  ++t_;
  const double b1 = cfg_.beta1, b2 = cfg_.beta2, eps = cfg_.eps, wd = cfg_.weight_decay;
  const double c1 = 1.0 / (1.0 - std::pow(b1, static_cast<double>(t_)));
  const double c2 = 1.0 / (1.0 - std::pow(b2, static_cast<double>(t_)));
  for (Tensor& t : tensors_) {
    auto p = t.p; auto g = t.g; auto m = t.m; auto v = t.v; auto mask = t.mask;
    const bool use_mask = mask.extent(0) != 0;
    const double dec = t.decay ? 1.0 : 0.0;
    Kokkos::parallel_for(
        "examoe::adamw::step", Kokkos::RangePolicy<execution_space>(space, 0, p.extent(0)),
        KOKKOS_LAMBDA(const std::size_t i) {
          const double gi = static_cast<double>(g(i)) * grad_scale;
          const double mi = b1 * static_cast<double>(m(i)) + (1 - b1) * gi;
          const double vi = b2 * static_cast<double>(v(i)) + (1 - b2) * gi * gi;
          m(i) = static_cast<S>(mi);
          v(i) = static_cast<S>(vi);
          const double decay = use_mask ? static_cast<double>(mask(i)) : dec;
          const double pi = static_cast<double>(p(i));
          p(i) = static_cast<S>(pi - lr * (mi * c1 / (impl::kc::sqrt(vi * c2) + eps) + wd * decay * pi));
        });
  }
  impl::host_sync(space);
}

template <class S>
double AdamW<S>::grad_sum_squares(const execution_space& space) const {
  double s = 0;
  for (const Tensor& t : tensors_) s += sum_squares(space, t.g);
  return s;
}

template <class S>
std::size_t AdamW<S>::state_bytes() const {
  std::size_t n = 0;
  for (const Tensor& t : tensors_) n += 2 * t.p.extent(0) * sizeof(S);
  return n;
}

template <class ExecSpace, class V>
double sum_squares(const ExecSpace& space, const V& v) {
  static_assert(Kokkos::SpaceAccessibility<ExecSpace, typename V::memory_space>::accessible,
                "examoe::sum_squares: the view must be accessible from the execution space");
  double s = 0;
  impl::count_host_sync();  // a reduction into a host value waits for it
  Kokkos::parallel_reduce(
      "examoe::sum_squares", Kokkos::RangePolicy<ExecSpace>(space, 0, v.extent(0)),
      KOKKOS_LAMBDA(const std::size_t i, double& acc) {
        const double x = static_cast<double>(v(i));
        acc += x * x;
      },
      s);
  return s;
}

double lr_schedule(std::int64_t step, std::int64_t total, std::int64_t warmup, double lr, double min_lr) {
  if (warmup > 0 && step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (total <= warmup) return lr;
  const double prog = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(3.14159265358979323846 * prog));
}

template class AdamW<float>;
template class AdamW<double>;
template double sum_squares(const AdamW<float>::execution_space&, const AdamW<float>::vector&);
template double sum_squares(const AdamW<double>::execution_space&, const AdamW<double>::vector&);

}  // namespace examoe
