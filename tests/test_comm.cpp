// The communication layer apart from the MoE layer:
//  - P2PSchedule: the host-side plan of the NCCL all-to-all (counts, displacements, grouping),
//    checked by hand and by executing every rank's schedule against the others in memory;
//  - Comm: the memory-aware collectives through impl::Collectives, direct and through the
//    host staging path that device data takes with a non-GPU-aware MPI, against values
//    computed by hand, at any rank count; backend selection and its errors on every rank.
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/collectives.hpp>
#include <examoe/impl/p2p_schedule.hpp>
#include <examoe/mesh.hpp>

#include <map>
#include <numeric>
#include <random>
#include <tuple>

namespace examoe::test {
namespace {

using impl::P2POp;

TEST(P2PSchedule, HandComputedExample) {
  // Rank 1 of 4, rows of 3 elements. Sends: 2 rows to rank 0 (at row 0), 1 to itself (row 2),
  // none to rank 2, 4 to rank 3 (row 3). Receives: 1 from rank 0, 1 from itself, 5 from rank 2,
  // none from rank 3, packed in that order.
  const int sc[4] = {2, 1, 0, 4}, sd[4] = {0, 2, 3, 3};
  const int rc[4] = {1, 1, 5, 0}, rd[4] = {0, 1, 2, 7};
  const auto ops = impl::alltoallv_schedule(1, 4, sc, sd, rc, rd, 3);
  // copy to itself first; then ring order: send to 2 (none), recv from 0; send to 3, recv from
  // 3 (none); send to 0, recv from 2.
  ASSERT_EQ(ops.size(), 5u);
  EXPECT_EQ(ops[0].kind, P2POp::copy);
  EXPECT_EQ(ops[0].offset, 6u);
  EXPECT_EQ(ops[0].dst_offset, 3u);
  EXPECT_EQ(ops[0].count, 3u);
  const std::vector<std::tuple<P2POp::Kind, int, std::size_t, std::size_t>> want = {
      {P2POp::recv, 0, 0, 3}, {P2POp::send, 3, 9, 12}, {P2POp::send, 0, 0, 6}, {P2POp::recv, 2, 6, 15}};
  for (std::size_t i = 0; i < want.size(); ++i) {
    const auto& op = ops[i + 1];
    EXPECT_EQ(op.kind, std::get<0>(want[i])) << "op " << i + 1;
    EXPECT_EQ(op.peer, std::get<1>(want[i])) << "op " << i + 1;
    EXPECT_EQ(op.offset, std::get<2>(want[i])) << "op " << i + 1;
    EXPECT_EQ(op.count, std::get<3>(want[i])) << "op " << i + 1;
  }
}

TEST(P2PSchedule, ZeroCountsAndZeroWidthIssueNothing) {
  const int z[3] = {0, 0, 0}, d[3] = {0, 0, 0};
  EXPECT_TRUE(impl::alltoallv_schedule(2, 3, z, d, z, d, 64).empty());
  const int one[3] = {1, 1, 1}, dd[3] = {0, 1, 2};
  EXPECT_TRUE(impl::alltoallv_schedule(0, 3, one, dd, one, dd, 0).empty());
}

TEST(P2PSchedule, ElementOffsetsDoNotOverflow) {
  // 2^30 rows of 4096 elements: 2^42 elements, far beyond int.
  const int big = 1 << 30;
  const int sc[2] = {0, big}, sd[2] = {0, big - 1}, rc[2] = {0, big}, rd[2] = {0, 0};
  const auto ops = impl::alltoallv_schedule(0, 2, sc, sd, rc, rd, 4096);
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[0].count, std::size_t(1) << 42);
  EXPECT_EQ(ops[0].offset, (std::size_t(big) - 1) * 4096);
}

TEST(P2PSchedule, RejectsInconsistentInput) {
  const int sc[2] = {1, 0}, rc[2] = {2, 0}, d[2] = {0, 0};
  try {
    impl::alltoallv_schedule(0, 2, sc, d, rc, d, 4);
    ADD_FAILURE() << "no error for self counts 1 vs 2";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sends 1 rows to itself but expects 2"), std::string::npos) << e.what();
  }
  const int neg[2] = {0, -1};
  EXPECT_THROW(impl::alltoallv_schedule(0, 2, neg, d, d, d, 4), Error);
  EXPECT_THROW(impl::alltoallv_schedule(2, 2, d, d, d, d, 4), Error);
}

/// Runs every rank's schedule of a random all-to-all "in memory": each send must meet exactly
/// one receive on its peer with the same size, in the same order per pair (what NCCL requires
/// within a group), and the data must land where MPI_Alltoallv semantics put it.
TEST(P2PSchedule, ExecutedScheduleEqualsAlltoallvSemantics) {
  std::mt19937 gen(42);
  for (int P = 1; P <= 6; ++P) {
    for (int trial = 0; trial < 20; ++trial) {
      const int w = 1 + static_cast<int>(gen() % 5);
      // counts[s][r]: rows rank s sends to rank r (some zero).
      std::vector<std::vector<int>> cnt(P, std::vector<int>(P));
      for (auto& row : cnt)
        for (int& c : row) c = gen() % 3 == 0 ? 0 : static_cast<int>(gen() % 7);
      // Send layout: a gap of one row between peers, in reverse peer order (arbitrary displs).
      std::vector<std::vector<int>> sd(P, std::vector<int>(P)), rd(P, std::vector<int>(P));
      std::vector<std::vector<double>> send(P), recv(P), want(P);
      for (int s = 0; s < P; ++s) {
        int off = 0;
        for (int r = P - 1; r >= 0; --r) { sd[s][r] = off; off += cnt[s][r] + 1; }
        send[s].resize(static_cast<std::size_t>(off) * w);
        for (std::size_t i = 0; i < send[s].size(); ++i) send[s][i] = 1000.0 * s + static_cast<double>(i);
      }
      for (int r = 0; r < P; ++r) {
        int off = 0;
        for (int s = 0; s < P; ++s) { rd[r][s] = off; off += cnt[s][r]; }
        recv[r].assign(static_cast<std::size_t>(off) * w, -1.0);
        want[r] = recv[r];
        for (int s = 0; s < P; ++s)
          for (int i = 0; i < cnt[s][r] * w; ++i)
            want[r][static_cast<std::size_t>(rd[r][s]) * w + i] = send[s][static_cast<std::size_t>(sd[s][r]) * w + i];
      }
      // Each rank's schedule, from its own view of the counts.
      std::map<std::pair<int, int>, std::vector<P2POp>> sends, recvs;  // (src, dst)
      for (int me = 0; me < P; ++me) {
        std::vector<int> sc(P), rc(P), rdd(P);
        for (int r = 0; r < P; ++r) { sc[r] = cnt[me][r]; rc[r] = cnt[r][me]; rdd[r] = rd[me][r]; }
        for (const P2POp& op : impl::alltoallv_schedule(me, P, sc.data(), sd[me].data(), rc.data(), rdd.data(), w)) {
          ASSERT_GT(op.count, 0u);
          if (op.kind == P2POp::copy) {
            ASSERT_EQ(op.peer, me);
            std::copy_n(send[me].begin() + op.offset, op.count, recv[me].begin() + op.dst_offset);
          } else if (op.kind == P2POp::send) {
            ASSERT_NE(op.peer, me);
            sends[{me, op.peer}].push_back(op);
          } else {
            ASSERT_NE(op.peer, me);
            recvs[{op.peer, me}].push_back(op);
          }
        }
      }
      ASSERT_EQ(sends.size(), recvs.size());
      for (const auto& [pair, ss] : sends) {
        const auto& rr = recvs[pair];
        ASSERT_EQ(ss.size(), 1u);
        ASSERT_EQ(rr.size(), 1u);
        ASSERT_EQ(ss[0].count, rr[0].count);
        std::copy_n(send[pair.first].begin() + ss[0].offset, ss[0].count, recv[pair.second].begin() + rr[0].offset);
      }
      for (int r = 0; r < P; ++r) ASSERT_EQ(recv[r], want[r]) << "P " << P << " trial " << trial << " rank " << r;
    }
  }
}

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

TEST(Comm, BackendSelection) {
  CommOptions o;
  EXPECT_EQ(resolve_backend(o, false), "mpi");
  EXPECT_EQ(resolve_backend(o, true), have_nccl() ? "nccl" : "mpi");
  o.backend = "mpi";
  EXPECT_EQ(resolve_backend(o, true), "mpi");
  auto c = make_communicator(MPI_COMM_WORLD, o, false);
  EXPECT_EQ(c->backend(), "mpi");
  EXPECT_EQ(c->size(), world_size());
  EXPECT_TRUE(c->accepts(Memory::host));
  EXPECT_FALSE(c->accepts(Memory::device));
  // GPU-aware MPI is a property of device data only.
  o.gpu_aware_mpi = "true";
  EXPECT_TRUE(make_communicator(MPI_COMM_WORLD, o, true)->accepts(Memory::device));
  EXPECT_FALSE(make_communicator(MPI_COMM_WORLD, o, false)->accepts(Memory::device));
}

TEST(Comm, BadBackendOptionsFailOnEveryRank) {
  CommOptions o;
  o.backend = "ncl";
  expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, false); },
                             "unknown communication backend 'ncl'");
  o.backend = "auto";
  o.gpu_aware_mpi = "maybe";
  expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, true); },
                             "gpu_aware_mpi must be auto, true or false");
  // A bad value on one rank only: still every rank.
  o.gpu_aware_mpi = world_rank() == world_size() - 1 ? "maybe" : "auto";
  expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, true); }, "gpu_aware_mpi");
  o.gpu_aware_mpi = "auto";
  o.backend = "nccl";
  if (!have_nccl()) {
    expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, true); },
                               "built without NCCL");
  } else if (!impl::kc::device_memory_v<Space>) {
    expect_error_on_every_rank([&] { make_communicator(MPI_COMM_WORLD, o, false); },
                               "needs data in GPU memory");
  }
  // The mesh passes its options on, so `examoe train --parallel.comm` reports the same way.
  o.backend = "nccl";
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
