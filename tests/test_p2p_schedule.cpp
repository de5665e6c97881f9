// P2PSchedule: the host-side plan of the NCCL all-to-all (counts, displacements, grouping),
// checked by hand and by executing every rank's schedule against the others in memory, for
// 1-6 ranks and random count matrices, against MPI_Alltoallv semantics. No communication.
#include <examoe/error.hpp>
#include <examoe/impl/p2p_schedule.hpp>

#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

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

}  // namespace
}  // namespace examoe::test
