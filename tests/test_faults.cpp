// Fault handling: the collective watchdog changes no result and names what did not arrive, and
// fault injection specs are parsed and checked on every rank. The non-finite steps are in
// test_faults_nonfinite.cpp; the real hangs and SIGKILLs run through mpiexec in
// tests/integration/app/faults.sh.
#include "test_faults.hpp"
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

using examoe::test::FaultEnv;
using examoe::test::remove_dir;
using examoe::test::shared_dir;
using examoe::test::tiny;
using examoe::test::world_rank;
using examoe::test::world_size;

}  // namespace

// ------------------------------------------------------------------ fault injection specs

TEST(FaultsInjection, SpecsParseAndBadOnesAreNamed) {
  namespace fault = examoe::impl::fault;
  EXPECT_EQ(fault::arm("kill:rank=1:step=30"), "kill:rank=1:step=30");
  EXPECT_TRUE(fault::armed());
  EXPECT_EQ(fault::arm("nan:step=2,nan:step=4-5:rank=0:where=loss,hang:rank=1:step=3:phase=moe.dispatch:seconds=2"),
            "nan:step=2,nan:step=4-5:rank=0:where=loss,hang:rank=1:step=3:phase=moe.dispatch:seconds=2");
  EXPECT_EQ(fault::arm("kill:rank=1:checkpoint_write"), "kill:rank=1:checkpoint_write");
  EXPECT_EQ(fault::arm("fill:rank=0:checkpoint_write:step=2"), "fill:rank=0:checkpoint_write:step=2");
  // Poisoning follows rank, step and where.
  fault::arm("nan:step=4-5:rank=1:where=loss");
  double v = 0;
  fault::set_context(1, 3);
  EXPECT_FALSE(fault::poison("loss", v));
  fault::set_context(0, 4);
  EXPECT_FALSE(fault::poison("loss", v));
  fault::set_context(1, 5);
  EXPECT_FALSE(fault::poison("grad", v));
  EXPECT_TRUE(fault::poison("loss", v));
  EXPECT_TRUE(std::isnan(v));
  for (const char* bad : {"boom", "kill:step=3", "hang:step=3", "nan", "nan:step=5-3", "nan:step=x",
                          "nan:step=1:where=weights", "nan:step=1:phase=a", "kill:rank=0:step=1:checkpoint",
                          "nan:step=1:checkpoint_write", "fill:rank=0:step=2", "fill:checkpoint_write",
                          "hang:rank=0:step=1:checkpoint_write"}) {
    try {
      fault::arm(bad);
      ADD_FAILURE() << "accepted EXAMOE_FAULT=" << bad;
    } catch (const examoe::Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(fault::arm(""), "");
  EXPECT_FALSE(fault::armed()) << "an empty spec disarms";
  fault::disarm();
}

TEST(FaultsInjection, TrainRejectsABadSpecOnEveryRank) {
  FaultEnv env("kill:step=3");
  try {
    examoe::train(tiny("/tmp/unused"), MPI_COMM_WORLD, nullptr);
    ADD_FAILURE() << "a bad EXAMOE_FAULT was accepted";
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("EXAMOE_FAULT"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(examoe::impl::fault::armed());
  MPI_Barrier(MPI_COMM_WORLD);
}

// ------------------------------------------------------------------ watchdog

TEST(FaultsWatchdog, LabelsNestAndRestore) {
  using examoe::impl::CollectiveLabel;
  EXPECT_EQ(CollectiveLabel::current(), nullptr);
  {
    CollectiveLabel a("outer");
    EXPECT_STREQ(CollectiveLabel::current(), "outer");
    {
      CollectiveLabel b("inner");
      EXPECT_STREQ(CollectiveLabel::current(), "inner");
    }
    EXPECT_STREQ(CollectiveLabel::current(), "outer");
  }
  EXPECT_EQ(CollectiveLabel::current(), nullptr);
  EXPECT_EQ(examoe::impl::watchdog_seconds(), 0.0) << "the library's default is off";
  {
    examoe::impl::ScopedWatchdogSeconds s(7);
    EXPECT_EQ(examoe::impl::watchdog_seconds(), 7.0);
    EXPECT_EQ(examoe::impl::watchdog_grace_seconds(), 3.5);
  }
  EXPECT_EQ(examoe::impl::watchdog_seconds(), 0.0);
  EXPECT_THROW(examoe::impl::set_watchdog_seconds(-1), examoe::Error);
}

TEST(FaultsWatchdog, ReportNamesTheRanksThatDidNotArrive) {
  using examoe::impl::WatchdogPeerState;
  // Rank 0 of 4 timed out in call #12. Rank 1 is in the same call (answered), rank 2 is
  // blocked in another collective after 11 calls here, rank 3 never answered.
  std::map<int, WatchdogPeerState> peers;
  peers[1].heard = true;
  peers[1].calls = 12;
  peers[1].in_collective = true;
  peers[2].heard = true;
  peers[2].calls = 11;
  peers[2].label = "fsdp.allgather";
  peers[2].op = "MPI_Iallgather";
  auto r = examoe::impl::watchdog_report("moe.dispatch", "MPI_Ialltoallv", 12, 4, 0, 5, peers, {});
  EXPECT_EQ(r.missing, (std::vector<int>{2, 3}));
  EXPECT_NE(r.message.find("collective 'moe.dispatch' (MPI_Ialltoallv, call #12 on a communicator of 4 ranks) "
                           "did not finish within 5 s; ranks that did not arrive: 2, 3"),
            std::string::npos)
      << r.message;
  EXPECT_NE(r.message.find("rank 2 has entered only 11 calls here and is blocked in 'fsdp.allgather'"),
            std::string::npos)
      << r.message;
  // A rank that already left the call (entered more calls) did arrive; world ranks shown
  // when the communicator is not the world.
  peers[2].calls = 13;
  peers[3].heard = true;
  peers[3].calls = 12;
  r = examoe::impl::watchdog_report("optimizer.clip", "MPI_Iallreduce", 12, 4, 1, 2.5, peers, {});
  EXPECT_TRUE(r.missing.size() == 1 && r.missing[0] == 0) << r.message;  // rank 0 is not in `peers`
  r = examoe::impl::watchdog_report(nullptr, "MPI_Ibarrier", 3, 2, 0, 1, {}, {4, 6});
  EXPECT_NE(r.message.find("ranks that did not arrive: 1 (MPI_COMM_WORLD ranks 6)"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("(no label)"), std::string::npos) << r.message;
  peers.clear();
  peers[1].heard = true;
  peers[1].calls = 3;
  r = examoe::impl::watchdog_report("x", "MPI_Ibarrier", 3, 2, 0, 1, peers, {});
  EXPECT_TRUE(r.missing.empty());
  EXPECT_NE(r.message.find("every rank entered it"), std::string::npos) << r.message;
}

// The reporting rank waits until mpiexec has read its report before it aborts the job.
TEST(FaultsWatchdog, WaitsUntilTheReaderHasReadTheOutput) {
  using examoe::impl::wait_until_output_read;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const char text[] = "examoe: watchdog: a report\n";
  ASSERT_EQ(write(fds[1], text, sizeof text), static_cast<ssize_t>(sizeof text));
  // Nobody reads: the wait gives up after its limit.
  EXPECT_FALSE(wait_until_output_read(fds[1], 0.05));
  // A reader that comes 100 ms later: the wait returns once everything is read.
  std::atomic<bool> read_all{false};
  std::thread reader([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    char buf[sizeof text];
    ssize_t got = 0;
    while (got < static_cast<ssize_t>(sizeof text)) got += read(fds[0], buf + got, sizeof text - got);
    read_all = true;
  });
  EXPECT_TRUE(wait_until_output_read(fds[1], 30));
  EXPECT_TRUE(read_all.load());
  reader.join();
  close(fds[0]);
  close(fds[1]);
  // A regular file: nothing to wait for.
  FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  std::fputs(text, f);
  std::fflush(f);
  EXPECT_TRUE(wait_until_output_read(fileno(f), 0));
  std::fclose(f);
}

TEST(FaultsWatchdog, CollectivesGiveTheSameResultsWithADeadline) {
  const int W = world_size(), me = world_rank();
  for (double seconds : {0.0, 60.0}) {
    examoe::impl::ScopedWatchdogSeconds wd(seconds);
    examoe::MpiCommunicator c(MPI_COMM_WORLD);
    examoe::impl::CollectiveLabel label("test.collectives");
    // allreduce (values exact in double), allgather, reduce_scatter, alltoall(v), bcast, exscan.
    std::vector<double> a(5);
    for (int i = 0; i < 5; ++i) a[i] = (me + 1) * (i + 1);
    c.allreduce_sum(a.data(), a.size(), examoe::DataType::f64);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(a[i], W * (W + 1) / 2.0 * (i + 1)) << seconds;
    std::vector<std::int32_t> g(W);
    const std::int32_t mine = 10 * me;
    c.allgather(&mine, g.data(), 1, examoe::DataType::i32);
    for (int r = 0; r < W; ++r) EXPECT_EQ(g[r], 10 * r);
    std::vector<double> rs_in(2 * W), rs_out(2);
    for (int i = 0; i < 2 * W; ++i) rs_in[i] = i + me;
    c.reduce_scatter_sum(rs_in.data(), rs_out.data(), 2, examoe::DataType::f64);
    for (int j = 0; j < 2; ++j) EXPECT_EQ(rs_out[j], W * (2 * me + j) + W * (W - 1) / 2.0);
    std::vector<int> s(W), r(W);
    for (int q = 0; q < W; ++q) s[q] = 100 * me + q;
    c.alltoall_int(s.data(), r.data(), 1);
    for (int q = 0; q < W; ++q) EXPECT_EQ(r[q], 100 * q + me);
    // rows: rank me sends q+1 rows of 3 floats to rank q
    std::vector<int> sc(W), sd(W), rc(W), rd(W);
    int ns = 0, nr = 0;
    for (int q = 0; q < W; ++q) {
      sc[q] = q + 1;
      sd[q] = ns;
      ns += sc[q];
      rc[q] = me + 1;
      rd[q] = nr;
      nr += rc[q];
    }
    std::vector<float> sb(3 * ns), rb(3 * nr, -1);
    for (int q = 0; q < W; ++q)
      for (int i = 0; i < 3 * sc[q]; ++i) sb[3 * sd[q] + i] = static_cast<float>(1000 * me + 10 * q + i);
    c.alltoallv_rows(sb.data(), sc.data(), sd.data(), rb.data(), rc.data(), rd.data(), 3, examoe::DataType::f32);
    for (int q = 0; q < W; ++q)
      for (int i = 0; i < 3 * rc[q]; ++i) EXPECT_EQ(rb[3 * rd[q] + i], static_cast<float>(1000 * q + 10 * me + i));
    int root_value = me == W - 1 ? 42 : 0;
    c.broadcast(&root_value, sizeof root_value, W - 1);
    EXPECT_EQ(root_value, 42);
    EXPECT_EQ(c.exscan_sum(me + 1), static_cast<long long>(me) * (me + 1) / 2);
    EXPECT_EQ(c.first_error(""), "");
    const std::string e = c.first_error(me == W - 1 ? "late rank" : "");
    EXPECT_EQ(e.rfind("late rank", 0), 0u) << e;
    c.barrier();
  }
}

TEST(FaultsWatchdog, TrainingIsBitwiseTheSameWithAndWithoutIt) {
  examoe::TrainConfig a = tiny("/tmp/unused");
  a.train.steps = 4;
  a.parallel.watchdog_seconds = 0;
  examoe::TrainConfig b = a;
  b.parallel.watchdog_seconds = 120;
  const auto ra = examoe::train(a, MPI_COMM_WORLD, nullptr);
  const auto rb = examoe::train(b, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(ra.losses, rb.losses);
  EXPECT_EQ(examoe::impl::watchdog_seconds(), 0.0) << "train() restores the process-wide deadline";
}
