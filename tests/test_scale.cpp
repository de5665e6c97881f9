// Cost against the number of ranks (docs/performance.md, "Cost against the number of ranks"):
// what the placement and the dispatch plan hold per rank, what the count exchange moves, and
// how long exchange_counts takes on the host, measured.
//
// ScaleModel (one process) builds the tables for P = 1, 16, 256, 4096 expert-parallel ranks
// and E = 64, 4096 experts: Placement and DispatchPlan::set_placement need no communicator,
// and a step's exchange_counts runs over a simulated communicator of P ranks in which every
// rank routes like this one. Bytes are counted as they are allocated (operator new for the
// host containers, the Kokkos Tools allocation callback for views), not read from the code.
// ScaleMeasured runs the same step over MPI at the rank count of the ctest (1..16).
#include "layer/dispatch_plan.hpp"
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/placement.hpp>

#include <Kokkos_Core.hpp>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

// ------------------------------------------------------------ host allocation counting
// Every operator new of this executable carries its size in a 16-byte header, so that live
// bytes can be followed through delete.
namespace {
std::int64_t g_heap_live = 0, g_heap_news = 0;

void* counted_new(std::size_t n) {
  void* p = std::malloc(n + 16);
  if (!p) throw std::bad_alloc();
  *static_cast<std::size_t*>(p) = n;
  g_heap_live += static_cast<std::int64_t>(n);
  ++g_heap_news;
  return static_cast<char*>(p) + 16;
}
void counted_delete(void* q) noexcept {
  if (!q) return;
  void* p = static_cast<char*>(q) - 16;
  g_heap_live -= static_cast<std::int64_t>(*static_cast<std::size_t*>(p));
  std::free(p);
}
}  // namespace

// nvcc declares the global operator new/delete __host__ __device__; these replace only the host
// ones (no device code of this file allocates), so its warning about the host calls is moot.
#if defined(__CUDACC__)
#pragma nv_diag_suppress 20011
#endif
void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try { return counted_new(n); } catch (...) { return nullptr; }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try { return counted_new(n); } catch (...) { return nullptr; }
}
void operator delete(void* p) noexcept { counted_delete(p); }
void operator delete[](void* p) noexcept { counted_delete(p); }
void operator delete(void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_delete(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_delete(p); }
#if defined(__CUDACC__)
#pragma nv_diag_default 20011
#endif

namespace examoe::test {
namespace {

using impl::DispatchPlan;
using Space = Kokkos::DefaultExecutionSpace;

// ------------------------------------------------------------ view allocation counting
std::int64_t g_view_live = 0;
void on_view_alloc(Kokkos::Tools::SpaceHandle, const char*, const void*, std::uint64_t n) {
  g_view_live += static_cast<std::int64_t>(n);
}
void on_view_free(Kokkos::Tools::SpaceHandle, const char*, const void*, std::uint64_t n) {
  g_view_live -= static_cast<std::int64_t>(n);
}

/// Bytes that a piece of code leaves allocated: host containers and Kokkos views.
struct Retained {
  std::int64_t heap = 0, views = 0;
  std::int64_t total() const { return heap + views; }
};
template <class F>
Retained retained_by(F&& f) {
  Kokkos::Tools::Experimental::set_allocate_data_callback(&on_view_alloc);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(&on_view_free);
  const std::int64_t h0 = g_heap_live, v0 = g_view_live;
  f();
  Kokkos::Tools::Experimental::set_allocate_data_callback(nullptr);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(nullptr);
  return {g_heap_live - h0, g_view_live - v0};
}

// ------------------------------------------------------------ communicators
/// A communicator that meters its count exchange: bytes sent and seconds inside it.
class Metered : public Communicator {
 public:
  std::int64_t bytes_sent = 0;
  double alltoall_seconds = 0;
};

/// P ranks seen from rank `me`, every rank routing like this one: rank r sends to `me` what
/// `me` sends to itself. Only the count exchange is needed; it counts the bytes it moves.
class SimulatedComm final : public Metered {
 public:
  SimulatedComm(int P, int me) : P_(P), me_(me) {}
  int rank() const override { return me_; }
  int size() const override { return P_; }
  std::string backend() const override { return "simulated"; }
  void alltoall_int(const int*, int*, int) override { fail("alltoall_int"); }
  /// The count exchange only (one-int rows on the host): every rank sends `me` what `me`
  /// sends itself.
  void alltoallv_rows(const void* send, const int* sc, const int* sd, void* recv, const int* rc,
                      const int* rd, int w, DataType t, Memory m) override {
    if (w != 1 || t != DataType::i32 || m != Memory::host) fail("alltoallv_rows of data rows");
    const int* s = static_cast<const int*>(send);
    int* r = static_cast<int*>(recv);
    for (int src = 0; src < P_; ++src) {
      if (rc[src] != sc[me_]) fail("alltoallv_rows with counts that do not route like this rank");
      std::copy(s + sd[me_], s + sd[me_] + sc[me_], r + rd[src]);
    }
    for (int q = 0; q < P_; ++q) bytes_sent += 4LL * sc[q];
  }
  void allreduce_sum(void*, std::size_t, DataType, Memory) override { fail("allreduce_sum"); }
  void allgather(const void*, void*, std::size_t, DataType, Memory) override { fail("allgather"); }
  void reduce_scatter_sum(const void*, void*, std::size_t, DataType, Memory) override {
    fail("reduce_scatter_sum");
  }
  std::string first_error(const std::string& e) override { return e; }
  void broadcast(void*, std::size_t, int) override { fail("broadcast"); }
  long long exscan_sum(long long v) override { return v * me_; }
  void barrier() override {}
  MPI_Comm mpi_comm() const override { return MPI_COMM_SELF; }

 private:
  [[noreturn]] static void fail(const char* what) {
    throw Error(std::string("SimulatedComm: ") + what + " is not simulated");
  }
  int P_, me_;
};

/// The MPI communicator with the count exchange's bytes counted.
class CountingComm final : public Metered {
 public:
  explicit CountingComm(Communicator& c) : c_(c) {}
  int rank() const override { return c_.rank(); }
  int size() const override { return c_.size(); }
  std::string backend() const override { return c_.backend(); }
  void alltoall_int(const int* send, int* recv, int n) override { c_.alltoall_int(send, recv, n); }
  /// The count exchange (one-int rows on the host) metered; data rows passed through.
  void alltoallv_rows(const void* s, const int* sc, const int* sd, void* r, const int* rc, const int* rd,
                      int w, DataType t, Memory m) override {
    const bool counts = w == 1 && t == DataType::i32 && m == Memory::host;
    const auto t0 = std::chrono::steady_clock::now();
    c_.alltoallv_rows(s, sc, sd, r, rc, rd, w, t, m);
    if (!counts) return;
    alltoall_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int q = 0; q < c_.size(); ++q) bytes_sent += 4LL * sc[q];
  }
  void allreduce_sum(void* b, std::size_t n, DataType t, Memory m) override { c_.allreduce_sum(b, n, t, m); }
  void allgather(const void* s, void* r, std::size_t n, DataType t, Memory m) override { c_.allgather(s, r, n, t, m); }
  void reduce_scatter_sum(const void* s, void* r, std::size_t n, DataType t, Memory m) override {
    c_.reduce_scatter_sum(s, r, n, t, m);
  }
  std::string first_error(const std::string& e) override { return c_.first_error(e); }
  void broadcast(void* b, std::size_t n, int root) override { c_.broadcast(b, n, root); }
  long long exscan_sum(long long v) override { return c_.exscan_sum(v); }
  void barrier() override { c_.barrier(); }
  MPI_Comm mpi_comm() const override { return c_.mpi_comm(); }

 private:
  Communicator& c_;
};

// ------------------------------------------------------------ one plan step
/// T tokens, k distinct uniformly random experts each.
DispatchPlan::TopkView random_topk(int T, int k, int E, std::uint64_t seed) {
  DispatchPlan::TopkView topk("examoe::test::topk", T, k);
  auto h = Kokkos::create_mirror_view(topk);
  std::mt19937_64 rng(seed);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      int e = 0;
      bool again = true;
      while (again) {
        e = static_cast<int>(rng() % static_cast<std::uint64_t>(E));
        again = false;
        for (int i = 0; i < j; ++i) again = again || h(t, i) == e;
      }
      h(t, j) = e;
    }
  Kokkos::deep_copy(topk, h);
  return topk;
}

struct StepCost {
  Retained placement, plan;       // bytes left by Placement and by DispatchPlan::set_placement
  Retained first_step;            // bytes the first sort + exchange_counts leave (workspace)
  std::int64_t count_bytes = 0;   // sent by the count exchange of one step
  std::int64_t step_news = 0;     // operator new calls in a steady-state sort + exchange_counts
  double exchange_us = 0;         // median time of exchange_counts
  double host_us = 0;             // the same without the time inside the count exchange
};

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

/// Builds the placement and the plan, then times `reps` steady-state steps' exchange_counts.
template <class MakePlacement>
StepCost measure(MakePlacement&& make_placement, int me, Metered& comm, const DispatchPlan::TopkView& topk,
                 int reps) {
  const Space space;
  StepCost c;
  std::unique_ptr<Placement> pl;
  c.placement = retained_by([&] { pl = std::make_unique<Placement>(make_placement()); });
  DispatchPlan plan;
  c.plan = retained_by([&] { plan.set_placement(space, *pl, me); });
  c.first_step = retained_by([&] {  // warm-up: the workspace grows here
    plan.sort(space, topk);
    plan.exchange_counts(space, comm);
  });
  std::vector<double> us, host;
  const std::int64_t news0 = g_heap_news, bytes0 = comm.bytes_sent;
  for (int i = 0; i < reps; ++i) {
    plan.sort(space, topk);
    plan.fetch_counts(space);
    comm.barrier();
    const double in0 = comm.alltoall_seconds;
    const auto t0 = std::chrono::steady_clock::now();
    plan.exchange_counts(space, comm);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    host.push_back(us.back() - 1e6 * (comm.alltoall_seconds - in0));
  }
  c.step_news = (g_heap_news - news0) / reps;
  c.count_bytes = (comm.bytes_sent - bytes0) / reps;
  c.exchange_us = median(us);
  c.host_us = median(host);
  return c;
}

void print_row(const char* what, int P, int E, int nloc, int ml, const StepCost& c) {
  std::printf("[ scale ] %-15s ep %4d E %4d nloc %4d max_local %4d: placement %8lld B, plan %8lld B host + "
              "%8lld B views (+ %6lld B first step), count exchange %8lld B sent, exchange_counts %9.1f us (%8.1f us host), "
              "%lld news/step\n",
              what, P, E, nloc, ml, static_cast<long long>(c.placement.total()),
              static_cast<long long>(c.plan.heap), static_cast<long long>(c.plan.views),
              static_cast<long long>(c.first_step.total()), static_cast<long long>(c.count_bytes), c.exchange_us, c.host_us, static_cast<long long>(c.step_news));
  std::fflush(stdout);
}

constexpr int kTokens = 256, kTopK = 2;
// What a rank may hold per expert-parallel rank and per expert (bytes), placement and plan
// together, balanced: the model (docs/performance.md) gives about 80 per expert and 64 per rank
// (placement 12 E + 4 ep; the plan's host tables 24 E + 28 ep, its views 44 E + 32 ep); 128 each
// is allowed, so that any ep x ep or E x ep table fails at ep = 4096.
constexpr std::int64_t kBytesPerRankOrExpert = 128, kFixedBytes = 16384;

// ------------------------------------------------------------ the model, one process
TEST(ScaleModel, PlacementAndPlanGrowAsPPlusE) {
  {  // the process's first plan step allocates once-only things (profiling labels): not counted
    SimulatedComm comm(1, 0);
    measure([] { return Placement::balanced(4, 1); }, 0, comm, random_topk(8, 2, 4, 1), 1);
  }
  std::int64_t news = -1;
  for (int E : {64, 4096}) {
    const auto topk = random_topk(kTokens, kTopK, E, 7 + E);
    for (int P : {1, 2, 16, 256, 4096}) {
      const int ep = std::min(P, E);  // expert parallelism never exceeds E: the rest is dp
      const int me = ep / 2;
      SimulatedComm comm(ep, me);
      const StepCost c = measure([&] { return Placement::balanced(E, ep); }, me, comm, topk, 5);
      const Placement pl = Placement::balanced(E, ep);
      print_row(("balanced P" + std::to_string(P)).c_str(), ep, E, pl.num_local(me), pl.max_local(), c);
      SCOPED_TRACE("E " + std::to_string(E) + ", ep " + std::to_string(ep));
      EXPECT_EQ(c.count_bytes, 4LL * E) << "the count exchange sends each rank its own experts' counts: E ints";
      EXPECT_EQ(c.placement.heap, 4LL * (3 * E + ep + 1) + static_cast<std::int64_t>(sizeof(Placement)))
          << "owner, local index, experts by key; rank offsets";
      EXPECT_LE(c.placement.total() + c.plan.total() + c.first_step.total(),
                kFixedBytes + kBytesPerRankOrExpert * (ep + E))
          << "placement + plan grow faster than O(P + E)";
      // The same few host allocations whatever P and E: none per rank or expert.
      if (news < 0) news = c.step_news;
      EXPECT_EQ(c.step_news, news) << "host allocations of a steady-state step depend on P or E";
    }
  }
}

// Half the experts got no tokens (a collapsed router): rebalance_lpt hands every idle expert to
// the least-loaded rank, ties to the lowest, so rank 0 ends up with E / 2 of them. The count
// exchange still sends E ints per rank (each rank gets the counts of its own experts, nothing
// padded to max_local), and the owner's block lay-out is linear in its nloc x ep blocks.
// Printed, with the host time of rebalance_lpt itself (O(E log P)); asserted: the bytes are
// what the model says (docs/performance.md, "Cost against the number of ranks").
TEST(ScaleModel, IdleExpertsDoNotPadTheCountExchange) {
  const int E = 4096;
  const auto topk = random_topk(kTokens, kTopK, E, 11);
  std::vector<double> load(E);
  for (int e = 0; e < E; ++e) load[e] = e % 2 == 0 ? 1.0 + e % 7 : 0.0;
  for (int P : {16, 256, 1024, 4096}) {
    const auto t0 = std::chrono::steady_clock::now();
    const Placement pl = Placement::rebalance_lpt(load, P);
    const double lpt_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GE(pl.max_local(), E / 2 - P) << "one rank owns the idle experts (those not needed to fill empty ranks)";
    SimulatedComm comm(P, 1);
    const StepCost c = measure([&] { return pl; }, 1, comm, topk, 3);
    print_row("idle half LPT", P, E, pl.num_local(1), pl.max_local(), c);
    std::printf("[ scale ] idle half LPT   ep %4d E %4d: rebalance_lpt %.1f ms\n", P, E, lpt_ms);
    EXPECT_EQ(c.count_bytes, 4LL * E);
    if (P <= 256) {  // the owner of the idle experts: nloc x ep blocks
      int owner = 0;
      for (int r = 0; r < P; ++r) owner = pl.num_local(r) > pl.num_local(owner) ? r : owner;
      SimulatedComm oc(P, owner);
      print_row("idle LPT owner", P, E, pl.num_local(owner), pl.max_local(), measure([&] { return pl; }, owner, oc, topk, 1));
    }
  }
}

// ------------------------------------------------------------ measured over MPI
TEST(ScaleMeasured, CountExchangeAtThisRankCount) {
  const int P = world_size(), me = world_rank();
  std::unique_ptr<Communicator> mpi(make_mpi_communicator(MPI_COMM_WORLD));
  CountingComm comm(*mpi);
  for (int E : {64, 4096}) {
    const auto topk = random_topk(kTokens, kTopK, E, 100 + me);
    const StepCost c = measure([&] { return Placement::balanced(E, P); }, me, comm, topk, 20);
    const Placement pl = Placement::balanced(E, P);
    // The model's simulated step at this P, for comparison (no MPI in it).
    SimulatedComm sim(P, me);
    const StepCost s = measure([&] { return Placement::balanced(E, P); }, me, sim, topk, 20);
    double worst[2] = {c.exchange_us, c.host_us};
    MPI_Allreduce(MPI_IN_PLACE, worst, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (me == 0) {
      print_row("mpi", P, E, pl.num_local(me), pl.max_local(), c);
      print_row("simulated", P, E, pl.num_local(me), pl.max_local(), s);
      std::printf("[ scale ] mpi             ep %4d E %4d: slowest rank: exchange_counts %.1f us, %.1f us host\n", P, E,
                  worst[0], worst[1]);
    }
    SCOPED_TRACE("E " + std::to_string(E));
    EXPECT_EQ(c.count_bytes, 4LL * E);
    EXPECT_EQ(c.placement.total(), s.placement.total()) << "the model's placement differs from the real one";
    EXPECT_EQ(c.plan.total(), s.plan.total()) << "the model's plan differs from the real one";
    EXPECT_EQ(c.step_news, s.step_news) << "the MPI communicator's step allocates on the host";
  }
}

}  // namespace
}  // namespace examoe::test
