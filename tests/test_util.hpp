// Helpers shared by the MPI tests: deterministic global inputs (identical on every rank),
// uneven token splits, host <-> view copies, error measures and layer setup.
#pragma once

#include "reference.hpp"

#include <examoe/error.hpp>
#include <examoe/moe_config.hpp>
#include <examoe/moe_layer.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <Kokkos_Core.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace examoe::test {

/// A small double-precision model (2 blocks, d=16, 4 experts, top-2) on the addition corpus
/// that trains 20 steps in well under a second per rank. Tests adjust what they need.
inline examoe::TrainConfig tiny_train_config() {
  examoe::TrainConfig c;
  c.model.d_model = 16;
  c.model.n_layers = 2;
  c.model.n_heads = 2;
  c.model.seq_len = 16;
  c.model.d_hidden = 24;
  c.model.num_experts = 4;
  c.model.top_k = 2;
  c.train.steps = 20;
  c.train.batch = 8;
  c.train.warmup = 5;
  c.train.lr = 1e-2;
  c.train.min_lr = 1e-3;
  c.train.precision = "double";
  c.train.seed = 7;
  c.data.val_problems = 16;
  c.log.quiet = true;
  c.log.eval_interval = 1000;
  return c;
}

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// A fresh directory /tmp/examoe_<area>_<tag>_<pid>_np<P> shared by all ranks (rank 0's pid).
inline std::string make_shared_dir(const std::string& area, const std::string& tag) {
  int pid = static_cast<int>(getpid());
  MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
  const std::string d = "/tmp/examoe_" + area + "_" + tag + "_" + std::to_string(pid) + "_np" +
                        std::to_string(world_size());
  if (world_rank() == 0) {
    std::system(("rm -rf " + d).c_str());
    ::mkdir(d.c_str(), 0755);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return d;
}
/// Removes a make_shared_dir directory once every rank is done with it.
inline void remove_shared_dir(const std::string& d) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) std::system(("rm -rf " + d).c_str());
}

/// splitmix64: small, portable, the same sequence everywhere.
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ULL + 0x1234567ULL) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// uniform in [0, 1)
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }
};

/// How the inputs route tokens.
enum class Routing {
  random,       ///< Wr ~ U(-1, 1), x ~ U(-1, 1)
  all_to_zero,  ///< Wr column 0 large positive, x positive: every token's top-1 is expert 0
};

/// Deterministic global inputs; the same on every rank. With `round_float`, every value is
/// rounded to float (the reference then runs in double on exactly what a float layer sees).
inline RefInputs make_inputs(const MoEConfig& cfg, int T, std::uint64_t seed, Routing routing,
                             bool round_float) {
  const int d = cfg.d_model, h = cfg.d_hidden, E = cfg.num_experts;
  Rng rng(seed);
  RefInputs in;
  in.T = T;
  auto fill = [&](std::vector<double>& v, std::size_t n, double lo, double hi) {
    v.resize(n);
    for (auto& a : v) {
      a = rng.uniform(lo, hi);
      if (round_float) a = static_cast<double>(static_cast<float>(a));
    }
  };
  if (routing == Routing::all_to_zero) {
    // x_i in [0.1, 1): z_0 = 3 sum_i x_i >= 0.3 d > 0.2 d >= |z_e| for e > 0.
    fill(in.x, static_cast<std::size_t>(T) * d, 0.1, 1.0);
    fill(in.Wr, static_cast<std::size_t>(d) * E, -0.2, 0.2);
    for (int i = 0; i < d; ++i) in.Wr[i * E + 0] = 3.0;
  } else {
    fill(in.x, static_cast<std::size_t>(T) * d, -1.0, 1.0);
    fill(in.Wr, static_cast<std::size_t>(d) * E, -1.0, 1.0);
  }
  const double s1 = 2.0 / std::sqrt(static_cast<double>(d));
  const double s2 = 1.0 / std::sqrt(static_cast<double>(h));
  fill(in.W1, static_cast<std::size_t>(E) * d * h, -s1, s1);
  if (cfg.activation == Activation::swiglu) fill(in.W3, static_cast<std::size_t>(E) * d * h, -s1, s1);
  fill(in.W2, static_cast<std::size_t>(E) * h * d, -s2, s2);
  fill(in.dout, static_cast<std::size_t>(T) * d, -1.0, 1.0);
  // A selection bias of the scores' size (router.bias_rate > 0; set into the layer with
  // MoELayer::set_router_bias).
  if (cfg.router.bias_rate > 0) fill(in.bias, static_cast<std::size_t>(E), -0.3, 0.3);
  return in;
}

/// Uneven split of T global tokens over P ranks, contiguous in rank order: rank r gets a
/// share proportional to r + 1 (rank 1 gets nothing when `empty_rank1` and P > 1).
/// Returns offsets[P + 1].
inline std::vector<int> split_tokens(int T, int P, bool empty_rank1) {
  std::vector<double> w(P);
  for (int r = 0; r < P; ++r) w[r] = r + 1.0;
  if (empty_rank1 && P > 1) w[1] = 0.0;
  double wsum = 0.0;
  for (double a : w) wsum += a;
  std::vector<int> off(P + 1, 0);
  for (int r = 0; r < P; ++r) {
    const int n = (r == P - 1) ? T - off[r] : static_cast<int>(std::floor(T * w[r] / wsum));
    off[r + 1] = off[r] + n;
  }
  return off;
}

template <class Scalar>
using Matrix = typename MoELayer<Scalar>::matrix;
template <class Scalar>
using Tensor3 = typename MoELayer<Scalar>::tensor3;

/// Rows [r0, r0 + n) of a row-major host array with `cols` columns, as a device matrix.
template <class Scalar>
Matrix<Scalar> make_matrix(const std::vector<double>& v, int r0, int n, int cols,
                           const std::string& label) {
  Matrix<Scalar> m(label, n, cols);
  auto hm = Kokkos::create_mirror_view(m);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < cols; ++c)
      hm(r, c) = static_cast<Scalar>(v[static_cast<std::size_t>(r0 + r) * cols + c]);
  Kokkos::deep_copy(m, hm);
  return m;
}

template <class View>
std::vector<double> to_host(const View& v) {
  static_assert(View::rank >= 1 && View::rank <= 3, "rank 1, 2 or 3");
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  std::vector<double> out;
  out.reserve(v.size());
  if constexpr (View::rank == 1) {
    for (std::size_t i = 0; i < h.extent(0); ++i) out.push_back(static_cast<double>(h(i)));
  } else if constexpr (View::rank == 2) {
    for (std::size_t i = 0; i < h.extent(0); ++i)
      for (std::size_t j = 0; j < h.extent(1); ++j) out.push_back(static_cast<double>(h(i, j)));
  } else {
    for (std::size_t i = 0; i < h.extent(0); ++i)
      for (std::size_t j = 0; j < h.extent(1); ++j)
        for (std::size_t l = 0; l < h.extent(2); ++l)
          out.push_back(static_cast<double>(h(i, j, l)));
  }
  return out;
}

inline std::vector<int> to_host_int(const Kokkos::View<int**, Kokkos::LayoutRight,
                                                        typename MoELayer<double>::memory_space>& v) {
  auto h = Kokkos::create_mirror_view(v);
  Kokkos::deep_copy(h, v);
  std::vector<int> out;
  for (std::size_t i = 0; i < h.extent(0); ++i)
    for (std::size_t j = 0; j < h.extent(1); ++j) out.push_back(h(i, j));
  return out;
}

/// Writes a global row-major array into a device view (rank 2: [a][b], rank 3: [a][b][c]).
template <class View>
void fill_view(const View& v, const std::vector<double>& src) {
  if (v.size() != src.size()) {
    ADD_FAILURE() << "fill_view: view " << v.label() << " has " << v.size()
                  << " elements, expected " << src.size();
    return;
  }
  auto h = Kokkos::create_mirror_view(v);
  std::size_t n = 0;
  if constexpr (View::rank == 2) {
    for (std::size_t i = 0; i < h.extent(0); ++i)
      for (std::size_t j = 0; j < h.extent(1); ++j)
        h(i, j) = static_cast<typename View::value_type>(src[n++]);
  } else {
    for (std::size_t i = 0; i < h.extent(0); ++i)
      for (std::size_t j = 0; j < h.extent(1); ++j)
        for (std::size_t l = 0; l < h.extent(2); ++l)
          h(i, j, l) = static_cast<typename View::value_type>(src[n++]);
  }
  Kokkos::deep_copy(v, h);
}

/// The slices [e][...] of a per-expert global array for the experts local to `rank`, in
/// local index order.
inline std::vector<double> local_expert_slices(const std::vector<double>& global,
                                               const Placement& pl, int rank,
                                               std::size_t per_expert) {
  std::vector<double> out;
  for (int l = 0; l < pl.num_local(rank); ++l) {
    const int e = pl.global_expert(rank, l);
    out.insert(out.end(), global.begin() + e * per_expert, global.begin() + (e + 1) * per_expert);
  }
  return out;
}

/// Sets the router weight (full) and this rank's expert weights from the global arrays.
template <class Scalar>
void set_layer_weights(MoELayer<Scalar>& layer, const RefInputs& in) {
  const MoEConfig& cfg = layer.config();
  const int d = cfg.d_model, h = cfg.d_hidden;
  const int rank = layer.communicator().rank();
  const Placement& pl = layer.placement();
  fill_view(layer.router_weight(), in.Wr);
  const std::size_t dh = static_cast<std::size_t>(d) * h;
  fill_view(layer.w1(), local_expert_slices(in.W1, pl, rank, dh));
  fill_view(layer.w2(), local_expert_slices(in.W2, pl, rank, dh));
  if (cfg.activation == Activation::swiglu)
    fill_view(layer.w3(), local_expert_slices(in.W3, pl, rank, dh));
}

/// max|got - ref| / max(1e-30, max|ref|), with the position of the largest difference.
struct ErrReport {
  double rel = 0.0, max_diff = 0.0, max_ref = 0.0;
  std::size_t where = 0;
  bool size_mismatch = false;
};
inline ErrReport rel_error(const std::vector<double>& got, const std::vector<double>& ref) {
  ErrReport e;
  if (got.size() != ref.size()) {
    e.size_mismatch = true;
    e.rel = std::numeric_limits<double>::infinity();
    return e;
  }
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double diff = std::fabs(got[i] - ref[i]);
    if (!(diff <= e.max_diff)) {  // also catches NaN
      e.max_diff = diff;
      e.where = i;
    }
    e.max_ref = std::max(e.max_ref, std::fabs(ref[i]));
  }
  e.rel = e.max_diff / std::max(1e-30, e.max_ref);
  if (std::isnan(e.max_diff)) e.rel = std::numeric_limits<double>::infinity();
  return e;
}

inline ::testing::AssertionResult close_to(const std::string& what, const std::vector<double>& got,
                                           const std::vector<double>& ref, double tol) {
  const ErrReport e = rel_error(got, ref);
  if (std::getenv("EXAMOE_TEST_VERBOSE"))
    std::printf("[rank %d] %-40s rel. error %.3e (tol %.1e)\n", world_rank(), what.c_str(), e.rel,
                tol);
  if (e.size_mismatch)
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << " != reference size " << ref.size();
  if (e.rel <= tol) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << what << ": relative error " << e.rel << " > " << tol << " (max|diff| " << e.max_diff
     << " at flat index " << e.where << ": got " << got[e.where] << ", reference "
     << ref[e.where] << "; max|ref| " << e.max_ref << ")";
  return ::testing::AssertionFailure() << os.str();
}

inline ::testing::AssertionResult scalar_close(const std::string& what, double got, double ref,
                                               double tol) {
  const double diff = std::fabs(got - ref);
  if (std::getenv("EXAMOE_TEST_VERBOSE"))
    std::printf("[rank %d] %-40s rel. error %.3e (tol %.1e)\n", world_rank(), what.c_str(),
                diff / std::max(1e-30, std::fabs(ref)), tol);
  if (diff <= tol * std::max(1e-30, std::fabs(ref))) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << what << ": got " << got << ", reference " << ref << " (relative error "
     << diff / std::max(1e-30, std::fabs(ref)) << " > " << tol << ")";
  return ::testing::AssertionFailure() << os.str();
}

inline bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

/// Logical AND of a flag over MPI_COMM_WORLD.
inline bool all_ranks(bool ok) {
  int v = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all != 0;
}

inline double allreduce_sum(double v) {
  double s = 0.0;
  MPI_Allreduce(&v, &s, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return s;
}

/// Gathers each rank's row-major block of doubles to rank 0 (concatenated in rank order).
inline std::vector<double> gather_to_root(const std::vector<double>& local) {
  const int P = world_size(), rank = world_rank();
  int n = static_cast<int>(local.size());
  std::vector<int> counts(P, 0), displs(P, 0);
  MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int total = 0;
  if (rank == 0)
    for (int r = 0; r < P; ++r) {
      displs[r] = total;
      total += counts[r];
    }
  std::vector<double> all(rank == 0 ? total : 0);
  MPI_Gatherv(local.data(), n, MPI_DOUBLE, all.data(), counts.data(), displs.data(), MPI_DOUBLE,
              0, MPI_COMM_WORLD);
  return all;
}

/// Slice [r0, r0 + n) rows of a row-major array with `cols` columns.
inline std::vector<double> rows_of(const std::vector<double>& v, int r0, int n, int cols) {
  return std::vector<double>(v.begin() + static_cast<std::size_t>(r0) * cols,
                             v.begin() + static_cast<std::size_t>(r0 + n) * cols);
}

/// A base config used by several tests.
inline MoEConfig small_config(int E, int k, Activation act, int d = 8, int h = 12) {
  MoEConfig c;
  c.d_model = d;
  c.d_hidden = h;
  c.num_experts = E;
  c.top_k = k;
  c.activation = act;
  c.router.temperature = 1.0;
  c.router.renormalize = true;
  c.router.jitter = 0.0;
  c.router.aux_loss_coef = 1e-2;
  c.router.z_loss_coef = 1e-3;
  return c;
}

/// Finds a seed (starting at `seed`) whose inputs keep every top-k decision at least
/// `min_gap` (in u) away from a tie. Same answer on every rank (pure function of inputs).
inline std::uint64_t seed_with_margin(const MoEConfig& cfg, int T, std::uint64_t seed,
                                      Routing routing, bool round_float, double min_gap) {
  for (int tries = 0; tries < 200; ++tries, ++seed) {
    const RefInputs in = make_inputs(cfg, T, seed, routing, round_float);
    if (reference_moe(cfg, in).min_topk_gap >= min_gap) return seed;
  }
  ADD_FAILURE() << "no seed with top-k margin " << min_gap << " found";
  return seed;
}

}  // namespace examoe::test
