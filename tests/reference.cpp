// Dense double-precision reference of docs/moe-layer.md. See reference.hpp.
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace examoe::test {

namespace {

constexpr double kSqrt2 = 1.4142135623730950488;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2 pi)

double gelu(double s) { return 0.5 * s * (1.0 + std::erf(s / kSqrt2)); }
double gelu_grad(double s) {
  return 0.5 * (1.0 + std::erf(s / kSqrt2)) + s * kInvSqrt2Pi * std::exp(-0.5 * s * s);
}
double sigmoid(double s) { return 1.0 / (1.0 + std::exp(-s)); }
double silu(double s) { return s * sigmoid(s); }
double silu_grad(double s) {
  const double sg = sigmoid(s);
  return sg * (1.0 + s * (1.0 - sg));
}

}  // namespace

double round_to_bf16(double v) {
  const double f = static_cast<double>(static_cast<float>(v));
  if (f == 0.0 || !std::isfinite(f)) return f;
  int e = 0;
  const double m = std::frexp(f, &e);       // f = m 2^e, 0.5 <= |m| < 1
  const double r = std::nearbyint(std::ldexp(m, 8));  // 8 significant bits; ties to even
  return std::ldexp(r, e - 8);
}

double bf16_margin(double v) {
  const double f = static_cast<double>(static_cast<float>(v));
  if (f == 0.0 || !std::isfinite(f)) return std::numeric_limits<double>::infinity();
  int e = 0;
  const double scaled = std::fabs(std::ldexp(std::frexp(f, &e), 8));  // in [128, 256)
  return std::fabs(scaled - std::floor(scaled) - 0.5) / scaled;
}

RefResult reference_moe(const MoEConfig& cfg, const RefInputs& in, const RefWire* wire) {
  const int T = in.T, d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts, k = cfg.top_k;
  const bool swiglu = cfg.activation == Activation::swiglu;
  const double temp = cfg.router.temperature;
  const double alpha = cfg.router.aux_loss_coef, beta = cfg.router.z_loss_coef;
  if (static_cast<int>(in.x.size()) != T * d || static_cast<int>(in.dout.size()) != T * d ||
      static_cast<int>(in.Wr.size()) != d * E || static_cast<int>(in.W1.size()) != E * d * h ||
      static_cast<int>(in.W2.size()) != E * h * d ||
      (swiglu && static_cast<int>(in.W3.size()) != E * d * h) || k < 1 || k > E)
    throw std::invalid_argument("reference_moe: inconsistent input sizes");

  RefResult r;
  r.out.assign(T * d, 0.0);
  r.probs.assign(T * E, 0.0);
  r.lse.assign(T, 0.0);
  r.topk.assign(T * k, -1);
  r.gates.assign(T * k, 0.0);
  r.counts.assign(E, 0);
  r.dx.assign(T * d, 0.0);
  r.dWr.assign(d * E, 0.0);
  r.dW1.assign(E * d * h, 0.0);
  r.dW2.assign(E * h * d, 0.0);
  if (swiglu) r.dW3.assign(E * d * h, 0.0);
  r.min_topk_gap = std::numeric_limits<double>::infinity();

  // Per (token, slot) expert intermediates, kept for backward.
  std::vector<double> s1(T * k * h), s3(swiglu ? T * k * h : 0), act(T * k * h), y(T * k * d);

  // ---------------- router ----------------
  const bool sig = cfg.router.score == RouterScore::sigmoid;
  const int G = cfg.router.groups, M = cfg.router.topk_groups;
  if (M > 0 && G <= 0) throw std::invalid_argument("reference_moe: group-limited routing needs router.groups > 0");
  const bool plain = !sig && in.bias.empty() && M == 0;
  // group g = experts [first[g], first[g + 1]): contiguous, the first E % G one larger
  std::vector<int> first(1, 0), group(E);
  if (M > 0) {
    for (int g = 0; g < G; ++g) first.push_back(first.back() + E / G + (g < E % G ? 1 : 0));
    for (int g = 0; g < G; ++g)
      for (int e = first[g]; e < first[g + 1]; ++e) group[e] = g;
  }
  std::vector<double> q(static_cast<std::size_t>(T) * E);  // softmax of u (the z-loss's)
  std::vector<double> ssum(T, 1.0);                        // sum_e s_e
  for (int t = 0; t < T; ++t) {
    const double* xt = &in.x[t * d];
    std::vector<double> u(E);
    for (int e = 0; e < E; ++e) {
      double z = 0.0;
      for (int i = 0; i < d; ++i) z += xt[i] * in.Wr[i * E + e];
      u[e] = z / temp;
    }
    const double m = *std::max_element(u.begin(), u.end());
    double sum = 0.0;
    for (int e = 0; e < E; ++e) sum += std::exp(u[e] - m);
    for (int e = 0; e < E; ++e) q[t * E + e] = std::exp(u[e] - m) / sum;
    for (int e = 0; e < E; ++e) r.probs[t * E + e] = sig ? sigmoid(u[e]) : q[t * E + e];
    r.lse[t] = m + std::log(sum);
    if (sig) {
      ssum[t] = 0.0;
      for (int e = 0; e < E; ++e) ssum[t] += r.probs[t * E + e];
    }

    // the selection key: s + b (u itself for plain softmax, the same order)
    std::vector<double> key(E);
    for (int e = 0; e < E; ++e)
      key[e] = plain ? u[e] : r.probs[t * E + e] + (in.bias.empty() ? 0.0 : in.bias[e]);
    std::vector<bool> allowed(E, true);
    if (M > 0) {  // groups by the sum of their top two keys (one for a group of one)
      std::vector<double> score(G);
      for (int g = 0; g < G; ++g) {
        std::vector<double> v(key.begin() + first[g], key.begin() + first[g + 1]);
        std::sort(v.rbegin(), v.rend());
        score[g] = v.size() > 1 ? v[0] + v[1] : v[0];
      }
      std::vector<int> gorder(G);
      std::iota(gorder.begin(), gorder.end(), 0);
      std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int b) { return score[a] > score[b]; });
      if (M < G) r.min_topk_gap = std::min(r.min_topk_gap, score[gorder[M - 1]] - score[gorder[M]]);
      std::vector<bool> in_group(G, false);
      for (int j = 0; j < M; ++j) in_group[gorder[j]] = true;
      for (int e = 0; e < E; ++e) allowed[e] = in_group[group[e]];
    }
    // top-k: descending key among the allowed experts, ties to the lower expert id.
    std::vector<int> order;
    for (int e = 0; e < E; ++e)
      if (allowed[e]) order.push_back(e);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key[a] > key[b]; });
    // The order of the k chosen is a decision too (topk_experts() lists them by key): every
    // adjacent pair of the first k + 1 counts.
    for (int j = 0; j < k && j + 1 < static_cast<int>(order.size()); ++j)
      r.min_topk_gap = std::min(r.min_topk_gap, key[order[j]] - key[order[j + 1]]);
    double S = 0.0;
    for (int j = 0; j < k; ++j) {
      r.topk[t * k + j] = order[j];
      S += r.probs[t * E + order[j]];
      r.counts[order[j]] += 1;
    }
    for (int j = 0; j < k; ++j) {
      const double p = r.probs[t * E + order[j]];
      r.gates[t * k + j] = cfg.router.renormalize ? (S > 0 ? p / S : 0.0) : p;
    }
  }

  // ---------------- capacity ----------------
  // Each expert keeps at most C = ceil(cf k T / E) of the assignments to it: the largest
  // gates, ties to the lower token index. The losses below count the router's choices.
  r.kept.assign(T * k, 1);
  r.dropped.assign(E, 0);
  r.min_capacity_gap = std::numeric_limits<double>::infinity();
  if (cfg.capacity_factor > 0) {
    r.capacity = static_cast<long long>(
        std::ceil(cfg.capacity_factor * static_cast<double>(k) * static_cast<double>(T) / E));
    for (int e = 0; e < E; ++e) {
      std::vector<int> mine;  // assignments t*k+j to e, in token order
      for (int tj = 0; tj < T * k; ++tj)
        if (r.topk[tj] == e) mine.push_back(tj);
      if (static_cast<long long>(mine.size()) <= r.capacity) continue;
      std::stable_sort(mine.begin(), mine.end(), [&](int a, int b) { return r.gates[a] > r.gates[b]; });
      for (std::size_t i = static_cast<std::size_t>(r.capacity); i < mine.size(); ++i) r.kept[mine[i]] = 0;
      r.dropped[e] = static_cast<std::int64_t>(mine.size()) - r.capacity;
      if (r.capacity > 0)
        r.min_capacity_gap = std::min(r.min_capacity_gap, r.gates[mine[r.capacity - 1]] - r.gates[mine[r.capacity]]);
    }
  }

  // ---------------- losses ----------------
  const double Tg = static_cast<double>(T);
  std::vector<double> f(E, 0.0), P(E, 0.0);
  if (T > 0) {
    for (int e = 0; e < E; ++e) {
      f[e] = static_cast<double>(r.counts[e]) / (static_cast<double>(k) * Tg);
      double s = 0.0;  // of the scores normalised over the experts (softmax: already)
      for (int t = 0; t < T; ++t) s += r.probs[t * E + e] / ssum[t];
      P[e] = s / Tg;
    }
    double a = 0.0;
    for (int e = 0; e < E; ++e) a += f[e] * P[e];
    r.aux = alpha * E * a;
    double zz = 0.0;
    for (int t = 0; t < T; ++t) zz += r.lse[t] * r.lse[t];
    r.z = beta * zz / Tg;
  }

  // Whether assignment (t, e) crosses ranks (only with `wire`), and row v as it arrives.
  auto crosses = [&](int t, int e) { return wire && wire->token_rank[t] != wire->expert_rank[e]; };
  r.min_bf16_margin = std::numeric_limits<double>::infinity();
  auto arrive = [&](bool cross, std::vector<double>& v) {
    if (cross)
      for (double& a : v) {
        r.min_bf16_margin = std::min(r.min_bf16_margin, bf16_margin(a));
        a = round_to_bf16(a);
      }
  };
  auto expert_input = [&](int t, int e) {
    std::vector<double> v(in.x.begin() + t * d, in.x.begin() + (t + 1) * d);
    arrive(crosses(t, e), v);
    return v;
  };

  // ---------------- experts + combine ----------------
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int e = r.topk[t * k + j];
      const int tj = t * k + j;
      if (!r.kept[tj]) continue;  // dropped: no expert row, y stays 0
      const std::vector<double> xin = expert_input(t, e);
      const double* xt = xin.data();
      const double* W1e = &in.W1[static_cast<std::size_t>(e) * d * h];
      const double* W2e = &in.W2[static_cast<std::size_t>(e) * h * d];
      for (int c = 0; c < h; ++c) {
        double a1 = 0.0;
        for (int i = 0; i < d; ++i) a1 += xt[i] * W1e[i * h + c];
        s1[tj * h + c] = a1;
        if (swiglu) {
          const double* W3e = &in.W3[static_cast<std::size_t>(e) * d * h];
          double a3 = 0.0;
          for (int i = 0; i < d; ++i) a3 += xt[i] * W3e[i * h + c];
          s3[tj * h + c] = a3;
          act[tj * h + c] = silu(a1) * a3;
        } else {
          act[tj * h + c] = gelu(a1);
        }
      }
      std::vector<double> yrow(d);
      for (int o = 0; o < d; ++o) {
        double v = 0.0;
        for (int c = 0; c < h; ++c) v += act[tj * h + c] * W2e[c * d + o];
        yrow[o] = v;
      }
      arrive(crosses(t, e), yrow);
      std::copy(yrow.begin(), yrow.end(), y.begin() + tj * d);
    }
    for (int j = 0; j < k; ++j)
      if (r.kept[t * k + j])
        for (int o = 0; o < d; ++o) r.out[t * d + o] += r.gates[t * k + j] * y[(t * k + j) * d + o];
  }

  // ---------------- backward ----------------
  for (int t = 0; t < T; ++t) {
    const double* xt = &in.x[t * d];
    const double* dot = &in.dout[t * d];
    double* dxt = &r.dx[t * d];
    std::vector<double> dg(k, 0.0), dp(E, 0.0), du(E, 0.0);

    for (int j = 0; j < k; ++j) {
      const int e = r.topk[t * k + j];
      const int tj = t * k + j;
      if (!r.kept[tj]) continue;  // dropped: dg = 0, no expert backward, no part of dx
      const double g = r.gates[tj];
      const bool cross = crosses(t, e);
      const std::vector<double> xin = expert_input(t, e);
      std::vector<double> dxe(d, 0.0);  // this assignment's part of dx, returned as a row
      const double* W1e = &in.W1[static_cast<std::size_t>(e) * d * h];
      const double* W2e = &in.W2[static_cast<std::size_t>(e) * h * d];
      double* dW1e = &r.dW1[static_cast<std::size_t>(e) * d * h];
      double* dW2e = &r.dW2[static_cast<std::size_t>(e) * h * d];
      // dg = <dout, y>, dy = g dout
      double acc = 0.0;
      for (int o = 0; o < d; ++o) acc += dot[o] * y[tj * d + o];
      dg[j] = acc;
      std::vector<double> dy(d), da(h);
      for (int o = 0; o < d; ++o) dy[o] = g * dot[o];
      arrive(cross, dy);
      // dW2 += a^T dy, da = dy W2^T
      for (int c = 0; c < h; ++c) {
        double v = 0.0;
        for (int o = 0; o < d; ++o) {
          dW2e[c * d + o] += act[tj * h + c] * dy[o];
          v += dy[o] * W2e[c * d + o];
        }
        da[c] = v;
      }
      if (!swiglu) {
        for (int c = 0; c < h; ++c) {
          const double ds = da[c] * gelu_grad(s1[tj * h + c]);
          for (int i = 0; i < d; ++i) {
            dW1e[i * h + c] += xin[i] * ds;
            dxe[i] += ds * W1e[i * h + c];
          }
        }
      } else {
        const double* W3e = &in.W3[static_cast<std::size_t>(e) * d * h];
        double* dW3e = &r.dW3[static_cast<std::size_t>(e) * d * h];
        for (int c = 0; c < h; ++c) {
          const double a1 = s1[tj * h + c], a3 = s3[tj * h + c];
          const double ds1 = da[c] * a3 * silu_grad(a1);
          const double ds3 = da[c] * silu(a1);
          for (int i = 0; i < d; ++i) {
            dW1e[i * h + c] += xin[i] * ds1;
            dW3e[i * h + c] += xin[i] * ds3;
            dxe[i] += ds1 * W1e[i * h + c] + ds3 * W3e[i * h + c];
          }
        }
      }
      arrive(cross, dxe);
      for (int i = 0; i < d; ++i) dxt[i] += dxe[i];
    }

    // gates -> dp (dL/ds)
    if (cfg.router.renormalize) {
      double S = 0.0, dgg = 0.0;
      for (int j = 0; j < k; ++j) {
        S += r.probs[t * E + r.topk[t * k + j]];
        dgg += dg[j] * r.gates[t * k + j];
      }
      if (S > 0)
        for (int j = 0; j < k; ++j) dp[r.topk[t * k + j]] += (dg[j] - dgg) / S;
    } else {
      for (int j = 0; j < k; ++j) dp[r.topk[t * k + j]] += dg[j];
    }
    if (!sig) {
      // aux
      for (int e = 0; e < E; ++e) dp[e] += alpha * E * f[e] / Tg;
      // softmax
      double pdp = 0.0;
      for (int e = 0; e < E; ++e) pdp += r.probs[t * E + e] * dp[e];
      for (int e = 0; e < E; ++e) du[e] = r.probs[t * E + e] * (dp[e] - pdp);
    } else {
      // aux of s' = s / sum s: d/ds_e sum_i a_i s'_i = (a_e - sum_i a_i s'_i) / sum s
      double as = 0.0;
      for (int e = 0; e < E; ++e) as += alpha * E * f[e] / Tg * r.probs[t * E + e] / ssum[t];
      for (int e = 0; e < E; ++e) dp[e] += (alpha * E * f[e] / Tg - as) / ssum[t];
      // sigmoid
      for (int e = 0; e < E; ++e) du[e] = dp[e] * r.probs[t * E + e] * (1.0 - r.probs[t * E + e]);
    }
    // z-loss (of softmax(u) whatever the score)
    for (int e = 0; e < E; ++e) du[e] += 2.0 * beta * r.lse[t] * q[t * E + e] / Tg;
    // dz, dWr, dx
    for (int e = 0; e < E; ++e) {
      const double dz = du[e] / temp;
      for (int i = 0; i < d; ++i) {
        r.dWr[i * E + e] += xt[i] * dz;
        dxt[i] += dz * in.Wr[i * E + e];
      }
    }
  }
  return r;
}

}  // namespace examoe::test
