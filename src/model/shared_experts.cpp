// The shared experts of a block (shared_experts.hpp): GEMMs through Kokkos Kernels and the
// routed experts' element-wise kernels (impl/expert_kernels.hpp), so a shared expert computes
// exactly what a routed expert of the same weights computes for the same rows.
#include "model/shared_experts.hpp"

#include <examoe/impl/expert_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/workspace.hpp>

#include <cmath>
#include <string>

namespace examoe::impl {

template <class S>
void SharedExperts<S>::grow(matrix& v, const char* name, int rows) {
  if (v.extent(0) >= static_cast<std::size_t>(rows) && v.extent(1) == static_cast<std::size_t>(width_)) return;
  v = matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("examoe::shared_experts::") + name), rows,
             width_);
  ++allocations_;
}

template <class S>
void SharedExperts<S>::forward(const execution_space& space, const const_matrix& m, const Weights& w, Saved& saved,
                               const matrix& y) {
  kc::ScopedRegion region("examoe::shared_experts::forward");
  const int n = static_cast<int>(m.extent(0));
  if (n == 0) return;
  grow(saved.g, "g", n);
  grow(saved.a, "a", n);
  if (swiglu_) grow(saved.u, "u", n);
  auto g = rows_of(saved.g, n), a = rows_of(saved.a, n);
  // g = m W1 (u = m W3), a = gelu(g) or silu(g) * u, y = a W2
  kc::gemm(space, "N", "N", S(1), m, w.w1, S(0), g);
  if (swiglu_) {
    auto u = rows_of(saved.u, n);
    kc::gemm(space, "N", "N", S(1), m, w.w3, S(0), u);
    swiglu_forward(space, g, u, a);
  } else {
    gelu_forward(space, g, a);  // g becomes gelu'(g)
  }
  kc::gemm(space, "N", "N", S(1), a, w.w2, S(0), y);
}

template <class S>
void SharedExperts<S>::backward(const execution_space& space, const const_matrix& m, const const_matrix& dy,
                                const Weights& w, const Weights& dw, Saved& saved, const matrix& dm) {
  kc::ScopedRegion region("examoe::shared_experts::backward");
  const int n = static_cast<int>(m.extent(0));
  if (n == 0) return;
  grow(da_, "da", n);
  if (swiglu_) grow(du_, "du", n);
  auto g = rows_of(saved.g, n), a = rows_of(saved.a, n), da = rows_of(da_, n);
  // da = dy W2^T, dW2 += a^T dy
  kc::gemm(space, "N", "T", S(1), dy, w.w2, S(0), da);
  kc::gemm(space, "T", "N", S(1), a, dy, S(1), dw.w2);
  if (swiglu_) {
    auto u = rows_of(saved.u, n), du = rows_of(du_, n);
    swiglu_backward(space, g, u, da, du);  // da becomes dg
    kc::gemm(space, "T", "N", S(1), m, da, S(1), dw.w1);
    kc::gemm(space, "T", "N", S(1), m, du, S(1), dw.w3);
    kc::gemm(space, "N", "T", S(1), da, w.w1, S(0), dm);
    kc::gemm(space, "N", "T", S(1), du, w.w3, S(1), dm);
  } else {
    gelu_backward(space, g, da);  // da becomes dg
    kc::gemm(space, "T", "N", S(1), m, da, S(1), dw.w1);
    kc::gemm(space, "N", "T", S(1), da, w.w1, S(0), dm);
  }
}

template <class S>
std::array<int, 3> add_shared_expert_params(Fsdp<S>& F, int unit, int layer, const ModelConfig& cfg) {
  const int d = cfg.d_model, hs = cfg.shared_width(), width = cfg.num_shared_experts * hs;
  const double sd = 1.0 / std::sqrt(static_cast<double>(d)), sh = 1.0 / std::sqrt(static_cast<double>(hs));
  const std::string b = "block" + std::to_string(layer) + ".moe.shared.";
  std::array<int, 3> ids{{-1, -1, -1}};
  ids[0] = F.add_param(unit, b + "w1", {d, width}, {ParamInit::uniform, sd}, true);
  ids[1] = F.add_param(unit, b + "w2", {width, d}, {ParamInit::uniform, sh}, true);
  if (cfg.activation == Activation::swiglu) ids[2] = F.add_param(unit, b + "w3", {d, width}, {ParamInit::uniform, sd}, true);
  return ids;
}

template <class S>
typename SharedExperts<S>::Weights shared_expert_weights(const Fsdp<S>& F, const std::array<int, 3>& ids, bool grads) {
  auto view = [&](int p) { return p < 0 ? typename Fsdp<S>::umatrix() : grads ? F.grad2(p) : F.param2(p); };
  return {view(ids[0]), view(ids[1]), view(ids[2])};
}

template class SharedExperts<float>;
template class SharedExperts<double>;
template std::array<int, 3> add_shared_expert_params<float>(Fsdp<float>&, int, int, const ModelConfig&);
template std::array<int, 3> add_shared_expert_params<double>(Fsdp<double>&, int, int, const ModelConfig&);
template SharedExperts<float>::Weights shared_expert_weights<float>(const Fsdp<float>&, const std::array<int, 3>&, bool);
template SharedExperts<double>::Weights shared_expert_weights<double>(const Fsdp<double>&, const std::array<int, 3>&,
                                                                      bool);

}  // namespace examoe::impl
