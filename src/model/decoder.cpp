// Incremental decoding with a KV cache (docs/model.md, "Decoding with a KV cache"): the
// forward of Model, block by block, for one new position per sequence, the keys and values of
// earlier positions read from the cache. Same kernels and the same order of operations as the
// training forward (src/model/model.cpp), so the logits agree with it up to rounding.
#include "model/decoder.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/dense_kernels.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/workspace.hpp>

#include <algorithm>
#include <map>
#include <string>

namespace examoe::impl {
namespace {
namespace dk = impl::dense;

/// x[b] = wte[t_b] + wpe[s]: the embedding of the tokens fed at position s, one thread per row.
template <class Space, class T, class W, class X>
void embed_at_position(const Space& space, const T& t, int s, const W& wte, const W& wpe, const X& x) {
  const int B = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  Kokkos::parallel_for(
      "examoe::decoder::embedding", Kokkos::RangePolicy<Space>(space, 0, B), KOKKOS_LAMBDA(const int b) {
        for (int c = 0; c < d; ++c) x(b, c) = wte(t(b), c) + wpe(s, c);
      });
}

/// Causal attention of the query at position s over the cached positions r <= s, per
/// sequence b and head j (one thread each, columns [j dh, (j+1) dh)):
///   p_{s,r} = softmax_{r <= s}(<q_s, k_r> / sqrt dh),   o_s = sum_{r <= s} p_{s,r} v_r.
/// q, o: [B][d]; k, v: the cache [S*B][d] with k_r of sequence b in row r*B + b; p: scratch
/// [B*H][S]. The sums run in the order of dk::attention_forward (max, exponentials, their
/// sum, normalisation, then o over r), so the result is that of the full forward's row s.
template <class Space, class Q, class K, class P>
void attention_at_position(const Space& space, int s, int H, const Q& q, const K& k, const K& v,
                           const P& p, const Q& o) {
  using S = typename Q::non_const_value_type;
  const int B = static_cast<int>(q.extent(0)), d = static_cast<int>(q.extent(1));
  const int dh = H > 0 ? d / H : 0;
  const S scale = dh > 0 ? S(1) / kc::sqrt(static_cast<S>(dh)) : S(0);
  Kokkos::parallel_for(
      "examoe::decoder::attention", Kokkos::RangePolicy<Space>(space, 0, B * H), KOKKOS_LAMBDA(const int t) {
        const int b = t / H, j = t % H, c0 = j * dh;
        S m = 0;
        for (int r = 0; r <= s; ++r) {
          const S u = dk::row_dot<S>(q, b, k, r * B + b, c0, dh) * scale;
          p(t, r) = u;
          m = (r == 0 || m < u) ? u : m;
        }
        S sum = 0;
        for (int r = 0; r <= s; ++r) {
          const S e = kc::exp(p(t, r) - m);
          p(t, r) = e;
          sum += e;
        }
        const S inv = S(1) / sum;
        for (int r = 0; r <= s; ++r) p(t, r) *= inv;
        for (int c = 0; c < dh; ++c) o(b, c0 + c) = S(0);
        for (int r = 0; r <= s; ++r) {
          const S pr = p(t, r);
          for (int c = 0; c < dh; ++c) o(b, c0 + c) += pr * v(r * B + b, c0 + c);
        }
      });
}

/// y = a + b (element-wise; y may alias a).
template <class Space, class A, class B, class Y>
void residual(const Space& space, const A& a, const B& b, const Y& y) {
  const int n = static_cast<int>(y.extent(0)), d = static_cast<int>(y.extent(1));
  Kokkos::parallel_for(
      "examoe::decoder::residual", Kokkos::RangePolicy<Space>(space, 0, n), KOKKOS_LAMBDA(const int i) {
        for (int c = 0; c < d; ++c) y(i, c) = a(i, c) + b(i, c);
      });
}

template <class V>
auto first_rows(const V& v, int n) {
  return impl::rows_of(v, static_cast<std::size_t>(n));
}
}  // namespace

template <class S>
IncrementalDecoder<S>::IncrementalDecoder(Model<S>& model, int batch)
    : model_(model), cfg_(model.config()), space_(model.space()), batch_(batch) {
  impl::agree(model_.mesh().world(), [&] {
    if (batch < 0)
      throw Error("examoe::IncrementalDecoder: batch must be >= 0, got " + std::to_string(batch));
  });
  const int d = cfg_.d_model, V = cfg_.vocab, Sq = cfg_.seq_len, H = cfg_.n_heads;
  const int n = std::max(batch_, 1);
  auto alloc = [](const char* name, int r, int c) {
    return matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("examoe::decoder::") + name), r, c);
  };
  x_ = alloc("x", n, d); a_ = alloc("a", n, d); q_ = alloc("q", n, d); o_ = alloc("o", n, d);
  t_ = alloc("t", n, d); h_ = alloc("h", n, d); m_ = alloc("m", n, d); y_ = alloc("y", n, d);
  f_ = alloc("f", n, d); logits_ = alloc("logits", n, V); p_ = alloc("p", n * H, Sq);
  inv_rms_ = vector("examoe::decoder::inv_rms", n);
  tokens_ = ivector("examoe::decoder::tokens", n);
  blocks_.resize(cfg_.n_layers);
  for (Block& blk : blocks_) {
    blk.k_cache = matrix("examoe::decoder::k_cache", static_cast<std::size_t>(Sq) * n, d);
    blk.v_cache = matrix("examoe::decoder::v_cache", static_cast<std::size_t>(Sq) * n, d);
  }
  if (cfg_.num_shared_experts > 0)
    shared_ = std::make_unique<SharedExperts<S>>(cfg_.activation, cfg_.num_shared_experts * cfg_.shared_width());
  copy_dense_parameters();
}

/// Every dense parameter out of its gathered FSDP unit into the decoder's own copy (one
/// gather per unit, collective); the router weights into their MoE layers.
template <class S>
void IncrementalDecoder<S>::copy_dense_parameters() {
  auto& F = model_.fsdp();
  std::map<std::string, int> id;
  for (int p = 0; p < F.num_params(); ++p) id[F.param_name(p)] = p;
  auto find = [&](const std::string& name) {
    const auto it = id.find(name);
    if (it == id.end()) throw Error("examoe::IncrementalDecoder: the model has no parameter '" + name + "'");
    return it->second;
  };
  auto copy2 = [&](const std::string& name) {
    const auto src = F.param2(find(name));
    matrix m(Kokkos::view_alloc(Kokkos::WithoutInitializing, "examoe::decoder::" + name), src.extent(0), src.extent(1));
    Kokkos::deep_copy(space_, m, src);
    return m;
  };
  auto copy1 = [&](const std::string& name) {
    const auto src = F.param1(find(name));
    vector v(Kokkos::view_alloc(Kokkos::WithoutInitializing, "examoe::decoder::" + name), src.extent(0));
    Kokkos::deep_copy(space_, v, src);
    return v;
  };
  for (int u = 0; u < F.num_units(); ++u) {
    const bool was_gathered = F.is_gathered(u);
    F.gather(u);
    const std::string unit = F.unit_name(u);
    if (unit == "embed") {
      wte_ = copy2("embed.wte");
      wpe_ = copy2("embed.wpe");
    } else if (unit == "head") {
      final_norm_ = copy1("final_norm");
      lm_head_ = copy2("lm_head");
    } else {
      for (int l = 0; l < cfg_.n_layers; ++l) {
        if (unit != "block" + std::to_string(l)) continue;
        const std::string b = unit + ".";
        Block& blk = blocks_[l];
        blk.attn_norm = copy1(b + "attn_norm");
        blk.wq = copy2(b + "attn.wq");
        blk.wk = copy2(b + "attn.wk");
        blk.wv = copy2(b + "attn.wv");
        blk.wo = copy2(b + "attn.wo");
        blk.moe_norm = copy1(b + "moe_norm");
        if (cfg_.num_shared_experts > 0) {
          blk.shared_w1 = copy2(b + "moe.shared.w1");
          blk.shared_w2 = copy2(b + "moe.shared.w2");
          if (cfg_.activation == Activation::swiglu) blk.shared_w3 = copy2(b + "moe.shared.w3");
        }
        Kokkos::deep_copy(space_, model_.moe(l).router_weight(), F.param2(find(b + "moe.router")));
      }
    }
    impl::host_sync(space_);  // the copies read the shared gather buffer, which the next gather overwrites
    if (!was_gathered) F.release(u);
  }
}

/// Block l for the rows in x_ at position pos_: h = x + Attn(RMSNorm(x)) with this
/// position's k and v written into the cache, x = h + MoE(RMSNorm(h)).
template <class S>
void IncrementalDecoder<S>::block_step(int l) {
  const int B = batch_, s = pos_;
  const Block& blk = blocks_[l];
  const execution_space& sp = space_;
  auto x = first_rows(x_, B);
  auto a = first_rows(a_, B);
  auto kr = Kokkos::subview(blk.k_cache, Kokkos::make_pair(std::size_t(s) * B, std::size_t(s + 1) * B), Kokkos::ALL);
  auto vr = Kokkos::subview(blk.v_cache, Kokkos::make_pair(std::size_t(s) * B, std::size_t(s + 1) * B), Kokkos::ALL);
  dk::rmsnorm_forward(sp, x, blk.attn_norm, cfg_.norm_eps, a, impl::head(inv_rms_, B));
  kc::gemm(sp, "N", "N", S(1), a, blk.wq, S(0), first_rows(q_, B));
  kc::gemm(sp, "N", "N", S(1), a, blk.wk, S(0), kr);
  kc::gemm(sp, "N", "N", S(1), a, blk.wv, S(0), vr);
  attention_at_position(sp, s, cfg_.n_heads, first_rows(q_, B), blk.k_cache, blk.v_cache,
                        first_rows(p_, B * cfg_.n_heads), first_rows(o_, B));
  kc::gemm(sp, "N", "N", S(1), first_rows(o_, B), blk.wo, S(0), first_rows(t_, B));
  residual(sp, x, first_rows(t_, B), first_rows(h_, B));
  dk::rmsnorm_forward(sp, first_rows(h_, B), blk.moe_norm, cfg_.norm_eps, first_rows(m_, B), impl::head(inv_rms_, B));
  if (shared_) {  // y = routed(m) + shared(m), as in training
    using U = typename SharedExperts<S>::umatrix;
    auto u = [](const matrix& w) { return U(w.data(), w.extent(0), w.extent(1)); };
    const typename SharedExperts<S>::Weights w{u(blk.shared_w1), u(blk.shared_w2), u(blk.shared_w3)};
    model_.moe(l).forward(first_rows(m_, B), first_rows(y_, B), false,
                          [&] { shared_->forward(sp, first_rows(m_, B), w, shared_saved_, first_rows(t_, B)); });
    residual(sp, first_rows(y_, B), first_rows(t_, B), first_rows(y_, B));
  } else {
    model_.moe(l).forward(first_rows(m_, B), first_rows(y_, B), false);
  }
  residual(sp, first_rows(h_, B), first_rows(y_, B), x);
}

template <class S>
void IncrementalDecoder<S>::step(const std::vector<int>& tokens, std::vector<S>& logits) {
  const int B = batch_, V = cfg_.vocab, L = cfg_.n_layers;
  impl::agree(model_.mesh().world(), [&] {
    const std::string f = "examoe::IncrementalDecoder::step: ";
    if (pos_ >= cfg_.seq_len)
      throw Error(f + "the cache is full: the model was trained with seq_len " + std::to_string(cfg_.seq_len) +
                  " and has no position embedding beyond it");
    if (static_cast<int>(tokens.size()) != B)
      throw Error(f + std::to_string(tokens.size()) + " tokens for a batch of " + std::to_string(B));
    for (int b = 0; b < B; ++b)
      if (tokens[b] < 0 || tokens[b] >= V)
        throw Error(f + "token " + std::to_string(tokens[b]) + " (sequence " + std::to_string(b) +
                    ") is outside the vocabulary [0, " + std::to_string(V) + ")");
  });
  kc::ScopedRegion region("examoe::decoder::step");
  if (B > 0) {
    auto ht = Kokkos::create_mirror_view(tokens_);
    for (int b = 0; b < B; ++b) ht(b) = tokens[b];
    Kokkos::deep_copy(space_, tokens_, ht);
    impl::host_sync(space_);  // ht is a temporary host mirror
    embed_at_position(space_, impl::head(tokens_, B), pos_, wte_, wpe_, first_rows(x_, B));
  }
  for (int l = 0; l < L; ++l) block_step(l);
  auto f = first_rows(f_, B);
  dk::rmsnorm_forward(space_, first_rows(x_, B), final_norm_, cfg_.norm_eps, f, impl::head(inv_rms_, B));
  auto lg = first_rows(logits_, B);
  kc::gemm(space_, "N", "N", S(1), f, lm_head_, S(0), lg);
  logits.assign(static_cast<std::size_t>(B) * V, S(0));
  if (B > 0) {
    auto h = impl::host_copy_of(lg);
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < V; ++c) logits[static_cast<std::size_t>(b) * V + c] = h(b, c);
  }
  ++pos_;
}

template class IncrementalDecoder<float>;
template class IncrementalDecoder<double>;

}  // namespace examoe::impl
