// The communication layer apart from the MoE layer (the NCCL all-to-all's host-side schedule is
// in test_p2p_schedule.cpp):
//  - Comm: the memory-aware collectives through impl::Collectives, direct and through the
//    host staging path that device data takes with a non-GPU-aware MPI, against values
//    computed by hand, at any rank count; backend selection and its errors on every rank.
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/mesh.hpp>

#include <numeric>

namespace examoe::test {
namespace {

// ------------------------------------------------------------------ MPI: collectives
using Space = Kokkos::DefaultExecutionSpace;
using DView = Kokkos::View<double*, Space::memory_space>;

DView to_view(const std::vector<double>& v) {
  DView d("examoe::test::comm", v.size());
  auto h = Kokkos::create_mirror_view(d);
  for (std::size_t i = 0; i < v.size(); ++i) h(i) = v[i];
  Kokkos::deep_copy(d, h);
  return d;
}
std::vector<double> to_vec(const DView& d) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), d);
  return std::vector<double>(h.data(), h.data() + h.size());
}

/// Every collective through impl::Collectives, direct and staged, against hand-computed values.
TEST(Comm, CollectivesDirectAndStagedMatchHandComputed) {
  const int P = world_size(), me = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  for (bool staged : {false, true}) {
    impl::Collectives<Space> c(*comm, Space(), staged);
    EXPECT_EQ(c.staged(), staged);
    const int w = 3;
    // Rank s sends (s + r) % 3 rows to rank r, including itself; row j of the block for r
    // holds 100 s + 10 r + j in every element. Packed by destination.
    std::vector<int> sc(P), sd(P), rc(P), rd(P);
    int ns = 0, nr = 0;
    for (int r = 0; r < P; ++r) {
      sc[r] = (me + r) % 3; sd[r] = ns; ns += sc[r];
      rc[r] = (r + me) % 3; rd[r] = nr; nr += rc[r];
    }
    std::vector<double> sv(static_cast<std::size_t>(ns) * w);
    for (int r = 0; r < P; ++r)
      for (int j = 0; j < sc[r]; ++j)
        for (int e = 0; e < w; ++e) sv[(sd[r] + j) * w + e] = 100.0 * me + 10.0 * r + j;
    DView send = to_view(sv), recv("examoe::test::recv", std::max(1, nr * w));
    c.alltoallv_rows(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(), w);
    Space().fence();
    const auto got = to_vec(recv);
    for (int s = 0; s < P; ++s)
      for (int j = 0; j < rc[s]; ++j)
        for (int e = 0; e < w; ++e)
          ASSERT_EQ(got[(rd[s] + j) * w + e], 100.0 * s + 10.0 * me + j) << "staged " << staged << " from " << s;
    if (staged) {  // exactly the rows that left or reached this rank went through the host
      const std::size_t remote = static_cast<std::size_t>(ns - sc[me] + nr - rc[me]) * w * sizeof(double);
      EXPECT_EQ(c.staged_bytes(), remote);
    }

    // allreduce: element i sums (r + 1) * i over ranks = i P (P + 1) / 2.
    std::vector<double> a(7);
    for (int i = 0; i < 7; ++i) a[i] = (me + 1.0) * i;
    DView av = to_view(a);
    c.allreduce_sum(av.data(), av.size());
    Space().fence();
    const auto ar = to_vec(av);
    for (int i = 0; i < 7; ++i) EXPECT_EQ(ar[i], i * P * (P + 1) / 2.0);

    // allgather of 2 elements per rank.
    DView g = to_view({1.0 * me, -1.0 * me}), ga("examoe::test::ga", 2 * P);
    c.allgather(g.data(), ga.data(), 2);
    Space().fence();
    const auto gr = to_vec(ga);
    for (int r = 0; r < P; ++r) {
      EXPECT_EQ(gr[2 * r], r);
      EXPECT_EQ(gr[2 * r + 1], -r);
    }

    // reduce-scatter of blocks of 2: rank r gets sum over s of (s + 1) * (2 r + e).
    std::vector<double> rs(2 * P);
    for (int i = 0; i < 2 * P; ++i) rs[i] = (me + 1.0) * i;
    DView rsv = to_view(rs), out("examoe::test::rs", 2);
    c.reduce_scatter_sum(rsv.data(), out.data(), 2);
    Space().fence();
    const auto orr = to_vec(out);
    for (int e = 0; e < 2; ++e) EXPECT_EQ(orr[e], (2.0 * me + e) * P * (P + 1) / 2.0);
  }
}

/// Every rank gets the same examoe::Error, naming the problem.
template <class F>
void expect_error_on_every_rank(F&& f, const std::string& needle) {
  std::string msg;
  try {
    f();
  } catch (const Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find(needle), std::string::npos) << "message: '" << msg << "'";
  int ok = msg.find(needle) != std::string::npos ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  EXPECT_EQ(ok, 1) << "some rank did not get the error";
}

/// The row exchange in two halves, direct and staged, with and without the watchdog: the same
/// rows as the blocking call, an allreduce may run while it is in flight, progress() may
/// complete it early, and a second start before finish is refused.
TEST(Comm, StartedExchangeMatchesHandComputed) {
  const int P = world_size(), me = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  for (double watchdog : {0.0, 30.0}) {
    impl::ScopedWatchdogSeconds deadline(watchdog);
    for (bool staged : {false, true}) {
      impl::Collectives<Space> c(*comm, Space(), staged);
      const int w = 2;
      // Rank s sends s + r + 1 rows to rank r (none to itself when staged is false), row j of
      // the block holding 1000 s + 10 r + j.
      std::vector<int> sc(P), sd(P), rc(P), rd(P);
      int ns = 0, nr = 0;
      for (int r = 0; r < P; ++r) {
        sc[r] = r == me && !staged ? 0 : me + r + 1; sd[r] = ns; ns += sc[r];
        rc[r] = r == me && !staged ? 0 : r + me + 1; rd[r] = nr; nr += rc[r];
      }
      std::vector<double> sv(static_cast<std::size_t>(ns) * w);
      for (int r = 0; r < P; ++r)
        for (int j = 0; j < sc[r]; ++j)
          for (int e = 0; e < w; ++e) sv[(sd[r] + j) * w + e] = 1000.0 * me + 10.0 * r + j;
      DView send = to_view(sv), recv("examoe::test::recv", std::max(1, nr * w));
      Kokkos::deep_copy(recv, -1.0);
      c.start_alltoallv_rows(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(), w);
      // While it travels: another collective, and the refusal of a second exchange.
      std::vector<double> a{1.0 * me};
      DView av = to_view(a);
      c.allreduce_sum(av.data(), 1);
      c.progress_alltoallv_rows();
      EXPECT_THROW(
          c.start_alltoallv_rows(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(), w),
          Error)
          << "a second exchange started before the first finished";
      c.finish_alltoallv_rows();
      c.finish_alltoallv_rows();  // nothing in flight: a no-op
      Space().fence();
      EXPECT_EQ(to_vec(av)[0], P * (P - 1) / 2.0);
      const auto got = to_vec(recv);
      for (int s = 0; s < P; ++s)
        for (int j = 0; j < rc[s]; ++j)
          for (int e = 0; e < w; ++e)
            ASSERT_EQ(got[(rd[s] + j) * w + e], 1000.0 * s + 10.0 * me + j)
                << "staged " << staged << " watchdog " << watchdog << " from " << s;
    }
  }
}

TEST(Comm, BackendSelection) {
  CommOptions o;
  EXPECT_EQ(resolve_backend(o, false), "mpi");
  EXPECT_EQ(resolve_backend(o, true), have_nccl() ? "nccl" : "mpi");
  o.backend = CommBackend::mpi;
  EXPECT_EQ(resolve_backend(o, true), "mpi");
  auto c = make_communicator(MPI_COMM_WORLD, o, false);
  EXPECT_EQ(c->backend(), "mpi");
  EXPECT_EQ(c->size(), world_size());
  EXPECT_TRUE(c->accepts(Memory::host));
  EXPECT_FALSE(c->accepts(Memory::device));
  // GPU-aware MPI is a property of device data only.
  o.gpu_aware_mpi = GpuAwareMpi::yes;
  EXPECT_TRUE(make_communicator(MPI_COMM_WORLD, o, true)->accepts(Memory::device));
  EXPECT_FALSE(make_communicator(MPI_COMM_WORLD, o, false)->accepts(Memory::device));
}

TEST(Comm, BadBackendOptionsFailOnEveryRank) {
  // The options are parsed once, where they are read (the config, the bench command line);
  // an unknown spelling is refused there, and agreed like any error one rank may see.
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  CommOptions o;
  expect_error_on_every_rank([&] { impl::agree(*world, [&] { o.backend = comm_backend_from_string("ncl"); }); },
                             "unknown communication backend 'ncl'");
  expect_error_on_every_rank(
      [&] { impl::agree(*world, [&] { o.gpu_aware_mpi = gpu_aware_mpi_from_string("maybe"); }); },
      "gpu_aware_mpi must be auto, true or false");
  // A bad value on one rank only: still every rank.
  const std::string mine = world_rank() == world_size() - 1 ? "maybe" : "auto";
  expect_error_on_every_rank([&] { impl::agree(*world, [&] { o.gpu_aware_mpi = gpu_aware_mpi_from_string(mine); }); },
                             "gpu_aware_mpi");
  o.gpu_aware_mpi = GpuAwareMpi::automatic;
  o.backend = CommBackend::nccl;
  if (!have_nccl()) {
    expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, true); },
                               "built without NCCL");
  } else if (!impl::kc::device_memory_v<Space>) {
    expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, false); },
                               "needs data in GPU memory");
  }
  // The mesh passes its options on, so `examoe train --parallel.comm` reports the same way.
  o.backend = CommBackend::nccl;
  if (!have_nccl())
    expect_error_on_every_rank([&] { Mesh m(MPI_COMM_WORLD, 0, o); }, "built without NCCL");
}

/// Layers built on a communicator the caller shares (how Model shares the mesh's, one NCCL
/// communicator for all layers) give bitwise the output of a layer with its own duplicate.
TEST(Comm, LayerOnSharedCommunicatorMatchesOwnCommunicator) {
  const int P = world_size();
  MoEConfig cfg = small_config(std::max(4, P), 2, Activation::gelu);
  auto shared = std::shared_ptr<Communicator>(make_mpi_communicator(MPI_COMM_WORLD));
  MoELayerOptions on_shared;
  on_shared.shared_comm = on_shared.shared_stats_comm = shared;
  MoELayer<double> a(cfg, MPI_COMM_WORLD), b(cfg, on_shared), c(cfg, on_shared);
  a.init_parameters(3);
  b.init_parameters(3);
  c.init_parameters(3);
  const int T = 5 + world_rank();
  std::vector<double> xv(static_cast<std::size_t>(T) * cfg.d_model);
  for (std::size_t i = 0; i < xv.size(); ++i) xv[i] = std::sin(0.37 * i + world_rank());
  auto x = make_matrix<double>(xv, 0, T, cfg.d_model, "x");
  Matrix<double> ya("ya", T, cfg.d_model), yb("yb", T, cfg.d_model), yc("yc", T, cfg.d_model);
  a.forward(x, ya);
  b.forward(x, yb);
  c.forward(x, yc);  // a second layer on the same communicator, interleaved use
  EXPECT_TRUE(all_ranks(bitwise_equal(to_host(ya), to_host(yb))));
  EXPECT_TRUE(all_ranks(bitwise_equal(to_host(ya), to_host(yc))));
  EXPECT_EQ(&b.communicator(), shared.get());
  MoELayerOptions null_comm;
  null_comm.shared_stats_comm = shared;
  EXPECT_THROW(MoELayer<double>(cfg, null_comm), Error);
}

}  // namespace
}  // namespace examoe::test

// ------------------------------------------------------------------ device selection
namespace examoe::test {
namespace {

TEST(Comm, DeviceFromNodeLocalRank) {
  // All test ranks share this node: node-local rank = world rank.
  const NodeLocal n = node_local(MPI_COMM_WORLD);
  EXPECT_EQ(n.rank, world_rank());
  EXPECT_EQ(n.size, world_size());
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 2), world_rank() % 2);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 4), world_rank() % 4);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 0), -1);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, -1), -1);
  ::setenv("EXAMOE_DEVICE_ID", "1", 1);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 4), 1);
  // Out of range on the last rank only: every rank gets the error.
  ::setenv("EXAMOE_DEVICE_ID", world_rank() == world_size() - 1 ? "7" : "1", 1);
  expect_error_on_every_rank([] { device_for_rank(MPI_COMM_WORLD, 4); },
                             "EXAMOE_DEVICE_ID='7' is not a device id in [0, 4)");
  ::unsetenv("EXAMOE_DEVICE_ID");
  // Kokkos is already initialized by the test main: nothing happens.
  EXPECT_FALSE(initialize_kokkos(MPI_COMM_WORLD));
}

}  // namespace
}  // namespace examoe::test
