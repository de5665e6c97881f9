// `examoe bench`: one MoE layer, forward + backward, under mpirun. Prints tokens/s, the time
// per phase, and the time of the bare expert GEMMs of the same shapes measured in the same
// run (the bound the layer is compared against).
#include "bench.hpp"
#include "cli_checks.hpp"

#include <examoe/examoe.hpp>
#include <examoe/model.hpp>
#include <examoe/train.hpp>
#include <examoe/impl/host_blas.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/random.hpp>

#include <mpi.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

namespace examoe::app {

void add_bench_command(CLI::App& app, BenchOptions& o) {
  auto* c = app.add_subcommand("bench", "Time one MoE layer (forward + backward) on this communicator");
  // Sizes are int in the layer: at most 2^31 - 1 (integer_in's default bound).
  c->add_option("--d-model", o.d_model, "Model width d")->capture_default_str()->check(integer_in(1));
  c->add_option("--d-hidden", o.d_hidden, "Expert hidden width h")->capture_default_str()->check(integer_in(1));
  c->add_option("--experts", o.num_experts, "Number of experts E (>= ranks)")->capture_default_str()->check(integer_in(1));
  c->add_option("--top-k", o.top_k, "Experts per token k (1 <= k <= E)")->capture_default_str()->check(integer_in(1));
  c->add_option("--tokens", o.tokens, "Tokens per rank T")->capture_default_str()->check(integer_in(0));
  c->add_option("--activation", o.activation, "Expert MLP: gelu or swiglu")->capture_default_str()->check(CLI::IsMember({"gelu", "swiglu"}));
  c->add_option("--dispatch-dtype", o.dispatch_dtype, "Rows on the wire: scalar (--precision) or bf16 (half the bytes)")
      ->capture_default_str()
      ->check(CLI::IsMember({"scalar", "bf16"}));
  c->add_option("--overlap", o.overlap, "Compute the rows that stay on a rank while the others travel: on or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  c->add_option("--expert-schedule", o.expert_schedule,
                 "The experts' GEMMs: by-projection (grouped, the GPU default), by-expert (row chunks through "
                 "GEMM, activation, GEMM in cache, the host default) or auto")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "by-projection", "by-expert"}));
  c->add_option("--tf32", o.tf32, "Float expert GEMMs on TF32 tensor cores (CUDA builds; no effect elsewhere): on or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
  c->add_option("--precision", o.precision, "float or double")->capture_default_str()->check(CLI::IsMember({"float", "double"}));
  c->add_option("--steps", o.steps, "Timed steps")->capture_default_str()->check(integer_in(1));
  c->add_option("--warmup", o.warmup, "Untimed warm-up steps")->capture_default_str()->check(integer_in(0));
  c->add_option("--temperature", o.temperature, "Router softmax temperature")->capture_default_str()->check(positive_number());
  c->add_option("--score", o.score, "Router scores: softmax or sigmoid")->capture_default_str()->check(CLI::IsMember({"softmax", "sigmoid"}));
  c->add_option("--bias-rate", o.bias_rate,
                "Aux-loss-free balancing: the selection bias moves by this much after every step, warm-up included (0 = off)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  c->add_option("--groups", o.groups, "Group-limited routing: expert groups (0 = one per rank)")->capture_default_str()->check(integer_in(0));
  c->add_option("--topk-groups", o.topk_groups, "Group-limited routing: groups each token may use (0 = no limit)")
      ->capture_default_str()
      ->check(integer_in(0));
  c->add_option("--capacity-factor", o.capacity_factor,
                "Expert capacity: each expert keeps at most ceil(f * k * T * ranks / E) assignments per step, the "
                "largest gates (the rest are dropped); 0 = dropless")
      ->capture_default_str()
      ->check(nonnegative_number("dropless"));
  c->add_option("--seed", o.seed, "Seed of inputs and weights")->capture_default_str()->check(unsigned_integer());
  c->add_option("--comm", o.comm, "Collectives backend (auto: nccl on GPU builds with NCCL)")->capture_default_str()->check(CLI::IsMember({"auto", "mpi", "nccl"}));
  c->add_option("--json", o.json, "Append one JSON line with all figures to this file (rank 0)");
  c->add_option("--memory-limit", o.memory_limit,
                "Memory per rank, as train.memory_limit: auto (physical/cgroup memory shared by the node's "
                "ranks), off, or a size like 8GiB; sizes estimated to need more are refused before allocating")
      ->capture_default_str();
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

template <class S>
using Mat = Kokkos::View<S**, Kokkos::LayoutRight>;

template <class S>
void fill_uniform(const Mat<S>& m, std::uint64_t seed, std::uint64_t stream) {
  const int cols = static_cast<int>(m.extent(1));
  Kokkos::parallel_for(
      "examoe::bench::fill", Kokkos::RangePolicy<>(0, static_cast<int>(m.size())),
      KOKKOS_LAMBDA(const int i) {
        const double u = impl::uniform01(impl::hash_key(seed, stream, 0, static_cast<std::uint64_t>(i)));
        m(i / cols, i % cols) = static_cast<S>(2 * u - 1);
      });
}

/// The bare expert GEMMs of one step (forward and backward): blocks[l] are local expert l's
/// row blocks, each a row GEMM of its own as in the layer (its rows from one source rank:
/// LayerStats::rows_per_block), or one block of all its rows (`per_expert`: the GEMMs a layer
/// without that blocking would run). Expert after expert, as the host schedule runs them; the
/// same calls, transposes and operand layouts, nothing else. Each expert's backward follows
/// its forward, its weights still in cache; with `layer_order`, every expert's forward runs
/// first and then every expert's backward, as a layer's forward and backward must.
template <class S>
class BareExpertGemms {
 public:
  BareExpertGemms(const std::vector<std::vector<std::int64_t>>& blocks, int d, int h, bool swiglu, bool layer_order)
      : swiglu_(swiglu), layer_order_(layer_order), ranges_(blocks.size()) {
    for (std::size_t l = 0; l < blocks.size(); ++l) {
      int n = 0;
      for (std::int64_t b : blocks[l]) {
        if (b > 0) ranges_[l].emplace_back(n, n + static_cast<int>(b));
        n += static_cast<int>(b);
      }
      X.emplace_back("X", n, d); Hm.emplace_back("H", n, h); U.emplace_back("U", n, h);
      Y.emplace_back("Y", n, d); DX.emplace_back("DX", n, d);
      W1.emplace_back("W1", d, h); W2.emplace_back("W2", h, d); W3.emplace_back("W3", d, h);
      G1.emplace_back("G1", d, h); G2.emplace_back("G2", h, d); G3.emplace_back("G3", d, h);
      fill_uniform(X.back(), 7, l); fill_uniform(W1.back(), 8, l); fill_uniform(W2.back(), 9, l);
      fill_uniform(W3.back(), 10, l); fill_uniform(Hm.back(), 11, l);
    }
    once();  // warm-up
  }
  /// One pass: every expert's forward and backward GEMMs.
  void once() {
    const auto sp = Kokkos::DefaultExecutionSpace();
    if (layer_order_)
      for (std::size_t l = 0; l < ranges_.size(); ++l) forward(l);
    for (std::size_t l = 0; l < ranges_.size(); ++l) {
      if (!layer_order_) forward(l);
      for (const auto& r : ranges_[l]) {  // backward: da, dx
        impl::kc::gemm(sp, "N", "T", S(1), rows(Y[l], r), W2[l], S(0), rows(U[l], r));
        impl::kc::gemm(sp, "N", "T", S(1), rows(U[l], r), W1[l], S(0), rows(DX[l], r));
        if (swiglu_) impl::kc::gemm(sp, "N", "T", S(1), rows(Hm[l], r), W3[l], S(1), rows(DX[l], r));
      }
      if (ranges_[l].empty()) continue;  // the weight gradients, one GEMM per tensor over all rows
      impl::kc::gemm(sp, "T", "N", S(1), Hm[l], Y[l], S(1), G2[l]);
      impl::kc::gemm(sp, "T", "N", S(1), X[l], U[l], S(1), G1[l]);
      if (swiglu_) impl::kc::gemm(sp, "T", "N", S(1), X[l], Hm[l], S(1), G3[l]);
    }
    sp.fence();
  }

 private:
  static auto rows(const Mat<S>& m, const std::pair<int, int>& r) {
    return Kokkos::subview(m, Kokkos::make_pair(r.first, r.second), Kokkos::ALL);
  }
  void forward(std::size_t l) {
    const auto sp = Kokkos::DefaultExecutionSpace();
    for (const auto& r : ranges_[l]) {  // block by block
      impl::kc::gemm(sp, "N", "N", S(1), rows(X[l], r), W1[l], S(0), rows(Hm[l], r));
      if (swiglu_) impl::kc::gemm(sp, "N", "N", S(1), rows(X[l], r), W3[l], S(0), rows(U[l], r));
      impl::kc::gemm(sp, "N", "N", S(1), rows(Hm[l], r), W2[l], S(0), rows(Y[l], r));
    }
  }
  bool swiglu_, layer_order_;
  std::vector<std::vector<std::pair<int, int>>> ranges_;  // [begin, end) per block
  std::vector<Mat<S>> X, Hm, U, Y, W1, W2, W3, G1, G2, G3, DX;
};

/// The bare router GEMMs of one step: the logits x Wr forward, dWr = x^T dz and dx = dz Wr^T
/// backward, at the layer's shapes (T x d times d x E). They are GEMMs the layer must run too,
/// a fraction E / (2 k h) of the experts' flops (a quarter at d=128, h=256, E=256).
template <class S>
class BareRouterGemms {
 public:
  BareRouterGemms(int tokens, int d, int num_experts)
      : x("examoe::bench::router_x", tokens, d), Wr("examoe::bench::router_Wr", d, num_experts),
        z("examoe::bench::router_z", tokens, num_experts), dWr("examoe::bench::router_dWr", d, num_experts),
        dx("examoe::bench::router_dx", tokens, d) {
    fill_uniform(x, 12, 0);
    fill_uniform(Wr, 13, 0);
    once();  // warm-up
  }
  /// One pass: the three GEMMs.
  void once() {
    const auto sp = Kokkos::DefaultExecutionSpace();
    if (x.extent(0) == 0) return;
    impl::kc::gemm(sp, "N", "N", S(1), x, Wr, S(0), z);
    impl::kc::gemm(sp, "T", "N", S(1), x, z, S(0), dWr);
    impl::kc::gemm(sp, "N", "T", S(1), z, Wr, S(0), dx);
    sp.fence();
  }

 private:
  Mat<S> x, Wr, z, dWr, dx;
};

/// Seconds of one pass of bare GEMMs (BareExpertGemms, BareRouterGemms), and the mean over
/// `steps` passes.
template <class Bare>
double one_pass_seconds(Bare&& bare) {
  const auto t = Clock::now();
  bare.once();
  return seconds_since(t);
}
template <class Bare>
double mean_pass_seconds(Bare&& bare, int steps) {
  const auto t = Clock::now();
  for (int s = 0; s < steps; ++s) bare.once();
  return seconds_since(t) / steps;
}

/// One-way bytes per second of a device-to-device copy of n elements (the best of `steps`).
template <class S>
double copy_bytes_per_second(std::size_t n, int steps) {
  n = std::max<std::size_t>(n, 1 << 20);
  Kokkos::View<S*> a("examoe::bench::copy_a", n), b("examoe::bench::copy_b", n);
  Kokkos::deep_copy(a, S(1));
  Kokkos::deep_copy(b, a);
  Kokkos::fence();
  double best = 1e30;
  for (int s = 0; s < std::max(3, steps); ++s) {
    const auto t = Clock::now();
    Kokkos::deep_copy(b, a);
    Kokkos::fence();
    best = std::min(best, seconds_since(t));
  }
  return static_cast<double>(n * sizeof(S)) / best;
}

std::string human_bytes(double bytes) {
  const char* u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double b = bytes;
  int i = 0;
  while (b >= 1024 && i < 5) {
    b /= 1024;
    ++i;
  }
  char s[64];
  std::snprintf(s, sizeof s, "%.1f %s (%.0f bytes)", b, u[i], bytes);
  return s;
}

/// Refuses, on every rank and before anything is allocated, sizes whose memory per rank
/// exceeds --memory-limit (train's estimate of a MoE layer, estimate_moe_layer_memory, and
/// train's limit, memory_limit_bytes). What the bench allocates besides the layer: x, out,
/// dout and dx; the bare-GEMM run's copies of the local experts (3 weights, 3 gradients) and
/// of their rows; the two buffers of the copy-bandwidth figure.
void check_bench_memory(const BenchOptions& o, MPI_Comm comm, std::size_t sb) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  ModelConfig mc;
  mc.d_model = o.d_model;
  mc.d_hidden = o.d_hidden;
  mc.num_experts = o.num_experts;
  mc.top_k = o.top_k;
  mc.activation = activation_from_string(o.activation);
  mc.capacity_factor = o.capacity_factor;
  const MoELayerMemory layer = estimate_moe_layer_memory(mc, size, o.tokens, sb);
  const double d = o.d_model, h = o.d_hidden, T = o.tokens, A = T * o.top_k, b = static_cast<double>(sb);
  const double local = std::ceil(static_cast<double>(o.num_experts) / size);
  const double layer_bytes = 2.0 * static_cast<double>(layer.experts) + 2 * d * o.num_experts * b +
                             static_cast<double>(layer.buffers);
  const double io = 4 * T * d * b, gemm = (6 * local * d * h + A * (3 * d + 2 * h)) * b,
               copy = 2 * std::max(A * d, 1048576.0) * b;
  const double need = layer_bytes + io + gemm + copy;
  std::string how, err;
  const std::size_t limit = memory_limit_bytes(o.memory_limit, comm, &how);
  if (how.rfind("train.memory_limit", 0) == 0) how.replace(0, 18, "--memory-limit");
  if (limit > 0 && need > static_cast<double>(limit))
    err = "examoe bench: these sizes need about " + human_bytes(need) + " of memory per rank, but " +
          human_bytes(static_cast<double>(limit)) + " are available per rank (" + how +
          "). Estimate: the layer " + human_bytes(layer_bytes) + " (local experts and their gradients, router, rows of " +
          std::to_string(o.tokens) + " tokens x top-k " + std::to_string(o.top_k) + "); x, out, dout, dx " +
          human_bytes(io) + "; the bare-GEMM run " + human_bytes(gemm) + "; the copy figure " + human_bytes(copy) +
          ". Reduce --tokens, --d-model, --d-hidden or --experts, run on more ranks, or set --memory-limit.";
  auto c = make_mpi_communicator(comm);
  throw_if_any(*c, err);
}

/// Mean seconds of a forward + backward step over `o.steps` steps after `o.warmup`, and the
/// mean seconds of each phase in `phase`.
template <class S>
double time_steps(const BenchOptions& o, MPI_Comm comm, MoELayer<S>& layer, const Mat<S>& x,
                  const Mat<S>& out, const Mat<S>& dout, const Mat<S>& dx,
                  std::array<double, kNumPhases>& phase) {
  double step_time = 0;
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    MPI_Barrier(comm);
    const auto t = Clock::now();
    layer.forward(x, out);
    layer.backward(dout, dx);
    Kokkos::fence();
    const double dt = seconds_since(t);
    layer.update_router_bias();  // no-op without --bias-rate
    if (s >= o.warmup) {
      step_time += dt;
      for (int p = 0; p < kNumPhases; ++p) phase[p] += layer.stats().seconds[p];
    }
  }
  for (auto& p : phase) p /= o.steps;
  return step_time / o.steps;
}

/// The bound measured in paired rounds: each round times one layer step and then the bare
/// GEMMs of the same shapes, so that both see the machine in the same state (on a shared VM
/// the GEMM rate drifts by 20-40 % within a minute, and the means above, taken one after the
/// other, drift with it). Per round, (bare expert + router GEMMs) / layer step, each the
/// slowest rank's; the median and the range over `o.steps` rounds.
struct PairedRounds {
  double median = 0, low = 0, high = 0;
};
template <class S>
PairedRounds paired_rounds(const BenchOptions& o, MPI_Comm comm, MoELayer<S>& layer, const Mat<S>& x,
                           const Mat<S>& out, const Mat<S>& dout, const Mat<S>& dx, BareExpertGemms<S>& bare,
                           BareRouterGemms<S>& bare_router) {
  std::vector<double> fractions;
  for (int s = 0; s < o.steps; ++s) {
    MPI_Barrier(comm);
    const auto t = Clock::now();
    layer.forward(x, out);
    layer.backward(dout, dx);
    Kokkos::fence();
    double mine[3] = {seconds_since(t), 0, 0}, slowest[3] = {0, 0, 0};
    layer.update_router_bias();
    MPI_Barrier(comm);
    mine[1] = one_pass_seconds(bare);
    mine[2] = one_pass_seconds(bare_router);
    MPI_Allreduce(mine, slowest, 3, MPI_DOUBLE, MPI_MAX, comm);
    if (slowest[0] > 0) fractions.push_back((slowest[1] + slowest[2]) / slowest[0]);
  }
  PairedRounds r;
  if (fractions.empty()) return r;
  std::sort(fractions.begin(), fractions.end());
  const std::size_t n = fractions.size();
  r.median = n % 2 ? fractions[n / 2] : 0.5 * (fractions[n / 2 - 1] + fractions[n / 2]);
  r.low = fractions.front();
  r.high = fractions.back();
  return r;
}

/// What one forward and one backward make, counted (impl/host_sync.hpp): host waits, kernel
/// launches (Kokkos Tools callbacks) and GEMM calls.
struct StepWork {
  impl::WorkCounts forward, backward;
};
template <class S>
StepWork count_step(MoELayer<S>& layer, const Mat<S>& x, const Mat<S>& out, const Mat<S>& dout, const Mat<S>& dx) {
  StepWork w;
  impl::KernelLaunchCounter launches;
  const impl::WorkCounts t0 = impl::work_counts();
  layer.forward(x, out);
  const impl::WorkCounts t1 = impl::work_counts();
  layer.backward(dout, dx);
  const impl::WorkCounts t2 = impl::work_counts();
  Kokkos::fence();
  w.forward = t1 - t0;
  w.backward = t2 - t1;
  return w;
}

std::string counts_text(const impl::WorkCounts& c) {
  return std::to_string(c.host_syncs) + " host syncs, " + std::to_string(c.kernel_launches) + " kernel launches, " +
         std::to_string(c.gemm_calls) + " GEMM calls";
}
std::string counts_json(const impl::WorkCounts& c) {
  return "{\"host_syncs\":" + std::to_string(c.host_syncs) + ",\"kernel_launches\":" +
         std::to_string(c.kernel_launches) + ",\"gemm_calls\":" + std::to_string(c.gemm_calls) + "}";
}

template <class S>
int run(const BenchOptions& o) {
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  auto world = make_mpi_communicator(comm);
  // The --json file is opened (rank 0) before the run and checked after the write: a file that
  // cannot be written is an error on every rank, not figures silently lost.
  std::string err;
  std::ofstream js;
  if (rank == 0 && !o.json.empty()) {
    js.open(o.json, std::ios::app);
    if (!js) err = "examoe bench: cannot open --json file '" + clip_for_message(o.json) + "': " + std::strerror(errno);
  }
  throw_if_any(*world, err);
  check_bench_memory(o, comm, sizeof(S));

  MoEConfig cfg;
  cfg.d_model = o.d_model;
  cfg.d_hidden = o.d_hidden;
  cfg.num_experts = o.num_experts;
  cfg.top_k = o.top_k;
  cfg.activation = activation_from_string(o.activation);
  cfg.dispatch_dtype = dispatch_dtype_from_string(o.dispatch_dtype);
  cfg.overlap_exchange = o.overlap == "on";
  cfg.expert_schedule = expert_schedule_from_string(o.expert_schedule);
  cfg.allow_tf32 = o.tf32 == "on";
  cfg.router.temperature = o.temperature;
  cfg.router.score = router_score_from_string(o.score);
  cfg.router.bias_rate = o.bias_rate;
  cfg.router.groups = o.groups;
  cfg.router.topk_groups = o.topk_groups;
  cfg.router.seed = o.seed;
  cfg.capacity_factor = o.capacity_factor;
  cfg.time_phases = true;  // no fences: host clocks, or CUDA events on the stream
  MoELayerOptions lopts;
  lopts.comm = comm;
  lopts.comm_options.backend = comm_backend_from_string(o.comm);  // one of its spellings (checked by CLI11)
  MoELayer<S> layer(cfg, lopts);

  Mat<S> x("examoe::bench::x", o.tokens, o.d_model), out("examoe::bench::out", o.tokens, o.d_model);
  Mat<S> dout("examoe::bench::dout", o.tokens, o.d_model), dx("examoe::bench::dx", o.tokens, o.d_model);
  fill_uniform(x, o.seed, 100 + rank);
  fill_uniform(dout, o.seed, 200 + rank);

  std::array<double, kNumPhases> phase{};
  const double step_time = time_steps(o, comm, layer, x, out, dout, dx, phase);
  const StepWork work = count_step(layer, x, out, dout, dx);  // rank 0's counts are printed

  // A copy: the paired rounds below run further steps, and what is printed is this step's.
  const LayerStats st = layer.stats();
  // The bare GEMMs over the layer's blocks (the bound), and with one block per expert.
  const int nloc = static_cast<int>(st.rows_per_local_expert.size());
  std::vector<std::vector<std::int64_t>> blocks(nloc), whole(nloc);
  for (int l = 0; l < nloc; ++l) {
    blocks[l].assign(st.rows_per_block.begin() + static_cast<std::ptrdiff_t>(l) * size,
                     st.rows_per_block.begin() + static_cast<std::ptrdiff_t>(l + 1) * size);
    whole[l] = {st.rows_per_local_expert[l]};
  }
  const bool swiglu = cfg.activation == Activation::swiglu;
  const double gemm_whole = mean_pass_seconds(BareExpertGemms<S>(whole, o.d_model, o.d_hidden, swiglu, false), o.steps);
  const double gemm_ordered = mean_pass_seconds(BareExpertGemms<S>(blocks, o.d_model, o.d_hidden, swiglu, true), o.steps);
  BareExpertGemms<S> bare(blocks, o.d_model, o.d_hidden, swiglu, false);
  BareRouterGemms<S> bare_router(o.tokens, o.d_model, o.num_experts);
  const double gemm = mean_pass_seconds(bare, o.steps);
  const double router_gemm = mean_pass_seconds(bare_router, o.steps);
  const PairedRounds paired = paired_rounds(o, comm, layer, x, out, dout, dx, bare, bare_router);
  // The slowest rank sets the pace of a collective step.
  double step_max = 0, gemm_max = 0, router_max = 0, whole_max = 0, ordered_max = 0;
  MPI_Allreduce(&step_time, &step_max, 1, MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(&gemm, &gemm_max, 1, MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(&gemm_whole, &whole_max, 1, MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(&gemm_ordered, &ordered_max, 1, MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(&router_gemm, &router_max, 1, MPI_DOUBLE, MPI_MAX, comm);
  const double bound = gemm_max + router_max;  // every GEMM of the layer, nothing else
  std::array<double, kNumPhases> phase_max{};
  MPI_Allreduce(phase.data(), phase_max.data(), kNumPhases, MPI_DOUBLE, MPI_MAX, comm);
  long long sent = st.bytes_sent_dispatch, sent_sum = 0, rows = st.expert_rows, rows_max = 0;
  MPI_Allreduce(&sent, &sent_sum, 1, MPI_LONG_LONG, MPI_SUM, comm);
  MPI_Allreduce(&rows, &rows_max, 1, MPI_LONG_LONG, MPI_MAX, comm);
  long long rows_sum = 0, routed = 0, dropped = 0;
  MPI_Allreduce(&rows, &rows_sum, 1, MPI_LONG_LONG, MPI_SUM, comm);
  for (auto n : st.tokens_per_expert) routed += n;  // global already (the router's counts)
  for (auto n : st.dropped_per_expert) dropped += n;
  const double kept_imbalance = rows_sum > 0 ? static_cast<double>(rows_max) * size / static_cast<double>(rows_sum) : 1.0;
  const double dropped_fraction = routed > 0 ? static_cast<double>(dropped) / static_cast<double>(routed) : 0.0;
  long long mem_rows_local = st.rows_local, local_sum = 0;
  MPI_Allreduce(&mem_rows_local, &local_sum, 1, MPI_LONG_LONG, MPI_SUM, comm);
  // Data movement: dispatch, combine and the dispatch of dy move every assignment's row once
  // each (3 x T k d values per step; the gather of dx sits in bwd_router and is left out),
  // against one device copy of the same size.
  const double move_s = phase_max[static_cast<int>(Phase::pack)] + phase_max[static_cast<int>(Phase::alltoall)] +
                        phase_max[static_cast<int>(Phase::combine)] + phase_max[static_cast<int>(Phase::bwd_combine)] +
                        phase_max[static_cast<int>(Phase::bwd_alltoall)];
  const double move_bytes = 3.0 * st.assignments * o.d_model * sizeof(S);
  const double copy_rate = copy_bytes_per_second<S>(static_cast<std::size_t>(st.assignments) * o.d_model, o.steps);
  double copy_min = 0;
  MPI_Allreduce(&copy_rate, &copy_min, 1, MPI_DOUBLE, MPI_MIN, comm);

  if (rank == 0) {
    const double tokens = static_cast<double>(o.tokens) * size;
    const double flops_per_row = 2.0 * o.d_model * o.d_hidden * (cfg.activation == Activation::swiglu ? 3 : 2) * 3;
    const char* schedule = o.expert_schedule != "auto" ? o.expert_schedule.c_str()
                           : impl::kc::device_memory_v<Kokkos::DefaultExecutionSpace> ? "by-projection"
                                                                                      : "by-expert";
    std::printf("examoe bench: %d ranks, %s, d=%d h=%d E=%d k=%d T=%d/rank, %s, rows on the wire: %s, overlap %s, "
                "experts %s\n",
                size, o.precision.c_str(), o.d_model, o.d_hidden, o.num_experts, o.top_k, o.tokens,
                o.activation.c_str(), o.dispatch_dtype.c_str(), o.overlap.c_str(), schedule);
    std::printf("  step (fwd+bwd)      %10.4f s   %12.0f tokens/s\n", step_max,
                step_max > 0 ? tokens / step_max : 0.0);
    for (int p = 0; p < kNumPhases; ++p)
      std::printf("  %-18s  %10.4f s   %5.1f %%\n", phase_name(static_cast<Phase>(p)), phase_max[p],
                  100.0 * phase_max[p] / step_max);
    std::printf("  expert GEMMs alone  %10.4f s   (the layer's blocks, no MoE machinery; %.1f GFLOP/s)\n",
                gemm_max, gemm_max > 0 ? flops_per_row * rows_max / gemm_max * 1e-9 : 0.0);
    std::printf("    one per expert    %10.4f s   (all of an expert's rows in one GEMM: %.1f %% faster)\n", whole_max,
                whole_max > 0 ? 100.0 * (gemm_max / whole_max - 1.0) : 0.0);
    std::printf("    in layer order    %10.4f s   (every forward, then every backward: weights leave the caches "
                "between; layer at %.1f %% of this + router)\n",
                ordered_max, step_max > 0 ? 100.0 * (ordered_max + router_max) / step_max : 0.0);
    std::printf("  router GEMMs alone  %10.4f s   (x Wr, x^T dz, dz Wr^T: %.1f %% of the expert GEMMs' flops)\n",
                router_max, 100.0 * o.num_experts / (2.0 * o.top_k * o.d_hidden * (cfg.activation == Activation::swiglu ? 1.5 : 1.0)));
    std::printf("  layer / GEMM bound  %10.1f %%   (expert + router GEMMs; expert GEMMs only: %.1f %%)\n",
                step_max > 0 ? 100.0 * bound / step_max : 0.0, step_max > 0 ? 100.0 * gemm_max / step_max : 0.0);
    std::printf("  paired rounds       %10.1f %%   (median of %d rounds of one layer step, then its GEMMs alone: "
                "%.1f-%.1f %%)\n",
                100.0 * paired.median, o.steps, 100.0 * paired.low, 100.0 * paired.high);
    std::printf("  dispatch: %lld bytes sent in all (%lld rows stayed local), imbalance %.3f\n",
                sent_sum, local_sum, st.imbalance);
    std::printf("  ranks per token: %.3f on average, %lld at most (rank 0, own rank included)\n", st.ranks_per_token,
                static_cast<long long>(st.max_ranks_per_token));
    if (o.capacity_factor > 0)
      std::printf("  capacity: factor %g, C = %lld per expert, dropped %lld of %lld assignments (%.2f %%), "
                  "imbalance of the kept rows %.3f\n",
                  o.capacity_factor, static_cast<long long>(st.capacity), dropped, routed, 100 * dropped_fraction,
                  kept_imbalance);
    std::printf("  data movement       %10.2f GB/s (dispatch + combine + dy dispatch, rank 0) vs device copy %.2f GB/s: %.1f %%\n",
                move_s > 0 ? move_bytes / move_s * 1e-9 : 0.0, copy_min * 1e-9,
                move_s > 0 && copy_min > 0 ? 100.0 * move_bytes / move_s / copy_min : 0.0);
    std::printf("  per forward:  %s (rank 0)\n", counts_text(work.forward).c_str());
    std::printf("  per backward: %s (rank 0)\n", counts_text(work.backward).c_str());
    const bool host_gemms = !impl::kc::device_memory_v<Kokkos::DefaultExecutionSpace>;
    const std::string blas = host_gemms && !impl::host::blas_core().empty()
                                 ? ", GEMMs with OpenBLAS's " + impl::host::blas_core() + " kernels"
                                 : std::string();
    std::printf("  backend: %s on %s%s%s%s\n", layer.communicator().backend().c_str(), Kokkos::DefaultExecutionSpace::name(),
                host_gemms ? ", float activations with " : "", host_gemms ? impl::host::vector_isa() : "", blas.c_str());
    if (!o.json.empty()) {
      errno = 0;
      js << "{\"bench\":\"moe_layer\",\"ranks\":" << size << ",\"precision\":\"" << o.precision
         << "\",\"d_model\":" << o.d_model << ",\"d_hidden\":" << o.d_hidden
         << ",\"experts\":" << o.num_experts << ",\"top_k\":" << o.top_k
         << ",\"tokens_per_rank\":" << o.tokens << ",\"dispatch_dtype\":\"" << o.dispatch_dtype
         << "\",\"overlap\":\"" << o.overlap << "\",\"expert_schedule\":\"" << o.expert_schedule << "\",\"tf32\":\"" << o.tf32 << "\",\"activation\":\"" << o.activation
         << "\",\"step_s\":" << step_max << ",\"tokens_per_s\":" << tokens / step_max
         << ",\"gemm_only_s\":" << gemm_max << ",\"gemm_one_per_expert_s\":" << whole_max
         << ",\"gemm_layer_order_s\":" << ordered_max
         << ",\"router_gemm_s\":" << router_max
         << ",\"fraction_of_gemm_bound\":" << bound / step_max
         << ",\"fraction_of_expert_gemm_bound\":" << gemm_max / step_max
         << ",\"fraction_of_gemm_bound_paired\":" << paired.median
         << ",\"fraction_of_gemm_bound_paired_range\":[" << paired.low << "," << paired.high << "]"
         << ",\"bytes_sent\":" << sent_sum << ",\"imbalance\":" << st.imbalance
         << ",\"score\":\"" << o.score << "\",\"bias_rate\":" << o.bias_rate << ",\"groups\":" << o.groups
         << ",\"topk_groups\":" << o.topk_groups << ",\"ranks_per_token\":" << st.ranks_per_token
         << ",\"max_ranks_per_token\":" << st.max_ranks_per_token
         << ",\"capacity_factor\":" << o.capacity_factor << ",\"capacity\":" << st.capacity
         << ",\"dropped_fraction\":" << dropped_fraction << ",\"kept_imbalance\":" << kept_imbalance
         << ",\"comm\":\"" << layer.communicator().backend() << "\",\"space\":\""
         << Kokkos::DefaultExecutionSpace::name() << "\",\"host_vector_isa\":\"" << impl::host::vector_isa()
         << "\",\"blas_core\":\"" << impl::host::blas_core()
         << "\",\"move_bytes_per_s\":" << (move_s > 0 ? move_bytes / move_s : 0.0)
         << ",\"copy_bytes_per_s\":" << copy_min << ",\"forward_counts\":" << counts_json(work.forward)
         << ",\"backward_counts\":" << counts_json(work.backward) << ",\"phases_s\":{";
      for (int p = 0; p < kNumPhases; ++p)
        js << (p ? "," : "") << "\"" << phase_name(static_cast<Phase>(p)) << "\":" << phase_max[p];
      js << "}}\n";
      js.flush();
      if (!js)
        err = "examoe bench: cannot write --json file '" + clip_for_message(o.json) + "'" +
              (errno != 0 ? std::string(": ") + std::strerror(errno) : std::string());
    }
  }
  throw_if_any(*world, err);
  return 0;
}

}  // namespace

int run_bench(const BenchOptions& o) {
  // Checked like train.memory_limit (the CLI takes any text).
  std::size_t bytes = 0;
  if (o.memory_limit != "auto" && o.memory_limit != "off" && !parse_memory_size(o.memory_limit, bytes))
    throw Error("examoe bench: --memory-limit must be auto, off or a size such as 8GiB, 512MiB or 2e9, got '" +
                clip_for_message(o.memory_limit) + "'");
  return o.precision == "double" ? run<double>(o) : run<float>(o);
}

}  // namespace examoe::app
