// Fault handling: non-finite steps are skipped exactly (or stop with a checkpoint of the last
// good state), the collective watchdog changes no result and names what did not arrive, fault
// injection specs, and incomplete checkpoint files are ignored and removed. The real hangs and SIGKILLs run through
// mpiexec in tests/integration/app/faults.sh.
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/comm.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace {

using examoe::test::world_rank;
using examoe::test::world_size;

/// Sets EXAMOE_FAULT on every rank for one scope.
struct FaultEnv {
  explicit FaultEnv(const std::string& spec) { setenv("EXAMOE_FAULT", spec.c_str(), 1); }
  ~FaultEnv() { unsetenv("EXAMOE_FAULT"); }
};

std::string shared_dir(const std::string& tag) { return examoe::test::make_shared_dir("faults", tag); }
void remove_dir(const std::string& d) { examoe::test::remove_shared_dir(d); }

examoe::TrainConfig tiny(const std::string& dir) {
  examoe::TrainConfig c = examoe::test::tiny_train_config();
  c.train.steps = 8;
  c.train.warmup = 2;
  c.train.seed = 5;
  c.checkpoint.dir = dir;
  c.checkpoint.keep = 10;
  return c;
}

/// Expects bitwise equal losses a[i] == b[i - offset_b] for steps first..last (1-based).
void expect_bitwise(const std::vector<double>& a, long long a_first, const std::vector<double>& b,
                    long long b_first, long long first, long long last, const std::string& what) {
  for (long long s = first; s <= last; ++s) {
    const long long ia = s - a_first, ib = s - b_first;
    ASSERT_TRUE(ia >= 0 && ia < static_cast<long long>(a.size()) && ib >= 0 &&
                ib < static_cast<long long>(b.size()))
        << what << ": step " << s << " missing";
    EXPECT_EQ(a[ia], b[ib]) << what << ": step " << s;
  }
}

#if EXAMOE_ENABLE_HDF5
/// Every dataset of groups params, adam_m and adam_v as raw doubles, and an attribute.
struct CkptData {
  std::map<std::string, std::vector<double>> tensors;
  long long step = -1, adam_step = -1;
};
CkptData read_ckpt(const std::string& path) {
  CkptData d;
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) {
    ADD_FAILURE() << "cannot open " << path;
    return d;
  }
  for (auto [name, dst] : {std::pair<const char*, long long*>{"step", &d.step}, {"adam_step", &d.adam_step}}) {
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    H5Aread(a, H5T_NATIVE_LLONG, dst);
    H5Aclose(a);
  }
  for (const char* group : {"params", "adam_m", "adam_v"}) {
    hid_t g = H5Gopen2(f, group, H5P_DEFAULT);
    hsize_t n = 0;
    H5Gget_num_objs(g, &n);
    for (hsize_t i = 0; i < n; ++i) {
      char name[256];
      H5Gget_objname_by_idx(g, i, name, sizeof name);
      hid_t ds = H5Dopen2(g, name, H5P_DEFAULT);
      hid_t sp = H5Dget_space(ds);
      std::vector<double> v(static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp)));
      H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
      d.tensors[std::string(group) + "/" + name] = v;
      H5Sclose(sp);
      H5Dclose(ds);
    }
    H5Gclose(g);
  }
  H5Fclose(f);
  return d;
}
/// Identical weights and AdamW moments, bit for bit.
void expect_same_state(const CkptData& a, const CkptData& b, const std::string& what) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << what;
  ASSERT_GT(a.tensors.size(), 0u) << what;
  for (const auto& [name, va] : a.tensors) {
    auto it = b.tensors.find(name);
    ASSERT_NE(it, b.tensors.end()) << what << ": " << name;
    ASSERT_EQ(va.size(), it->second.size()) << what << ": " << name;
    EXPECT_EQ(std::memcmp(va.data(), it->second.data(), va.size() * sizeof(double)), 0)
        << what << ": " << name << " differs";
  }
  EXPECT_EQ(a.adam_step, b.adam_step) << what << ": AdamW step count";
}
#endif

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

// ------------------------------------------------------------------ non-finite steps

#if EXAMOE_ENABLE_HDF5
TEST(FaultsNonfinite, SkippedStepChangesNothingAndTheRunGoesOnExactly) {
  // Checkpoint writes are what costs time at 3-4 oversubscribed ranks: three in all.
  const int W = world_size();
  const std::string dir = shared_dir("skip");
  // A: clean run of the first 3 steps, checkpoint at 3.
  auto ca = tiny(dir + "/a");
  ca.train.steps = 3;
  ca.checkpoint.interval = 3;
  const auto a = examoe::train(ca, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(a.losses.size(), 3u);
  EXPECT_EQ(a.skipped_steps, 0);

  // B: a NaN in one gradient element of the last rank at step 4 of 6: the update is skipped.
  auto cb = tiny(dir + "/b");
  cb.train.steps = 6;
  cb.checkpoint.interval = 6;
  examoe::TrainResult b;
  {
    FaultEnv env("nan:step=4:rank=" + std::to_string(W - 1));
    b = examoe::train(cb, MPI_COMM_WORLD, nullptr);
  }
  EXPECT_EQ(b.skipped_steps, 1);
  EXPECT_EQ(b.skipped, (std::vector<long long>{4}));
  EXPECT_FALSE(b.stopped_nonfinite);
  ASSERT_EQ(b.losses.size(), 6u);
  expect_bitwise(b.losses, 1, a.losses, 1, 1, 3, "skip run vs clean run before the bad step");

  // Reference: the clean run's state after step 3 relabelled as step 4, i.e. a run in which
  // step 4's update never happened (built without the skipping code), resumed to step 6.
  const std::string ref = dir + "/r/step-00000004.h5";
  if (world_rank() == 0) {
    ::mkdir((dir + "/r").c_str(), 0755);
    std::ifstream in(examoe::checkpoint_path(dir + "/a", 3), std::ios::binary);
    std::ofstream out(ref, std::ios::binary);
    out << in.rdbuf();
    out.close();
    hid_t f = H5Fopen(ref.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t at = H5Aopen(f, "step", H5P_DEFAULT);
    const long long four = 4;
    H5Awrite(at, H5T_NATIVE_LLONG, &four);
    H5Aclose(at);
    H5Fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // Edited with HDF5: seal it again (new whole-file checksum), as tools that edit checkpoints do.
  examoe::seal_checkpoint_file(ref, MPI_COMM_WORLD);
  auto cr = tiny(dir + "/r");
  cr.train.steps = 6;
  cr.checkpoint.resume = ref;
  const auto r = examoe::train(cr, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(r.first_step, 4);
  expect_bitwise(b.losses, 1, r.losses, 5, 5, 6, "skip run vs a run without step 4's update");

  // The weights after the run are finite; 5 updates in 6 steps.
  if (world_rank() == 0) {
    const CkptData end = read_ckpt(examoe::checkpoint_path(dir + "/b", 6));
    EXPECT_EQ(end.adam_step, 5);
    for (const auto& [name, v] : end.tensors)
      for (double x : v) ASSERT_TRUE(std::isfinite(x)) << name;
  }

  // stop: +Inf in the loss at step 4 on every rank. The checkpoint holds the last good state
  // (bitwise the clean run's after step 3), then --resume latest continues as the skip run.
  auto cs = tiny(dir + "/s");
  cs.train.steps = 6;
  cs.train.nonfinite = "stop";
  examoe::TrainResult s;
  {
    FaultEnv env("inf:step=4:where=loss");
    s = examoe::train(cs, MPI_COMM_WORLD, nullptr);
  }
  EXPECT_TRUE(s.stopped_nonfinite);
  EXPECT_EQ(s.last_step, 4);
  EXPECT_EQ(s.last_checkpoint, examoe::checkpoint_path(dir + "/s", 4));
  EXPECT_NE(s.stop_message.find("non-finite loss (train.nonfinite = stop)"), std::string::npos) << s.stop_message;
  expect_bitwise(s.losses, 1, a.losses, 1, 1, 3, "stop run vs clean run");
  if (world_rank() == 0) {
    const CkptData good = read_ckpt(examoe::checkpoint_path(dir + "/a", 3));
    const CkptData stop = read_ckpt(s.last_checkpoint);
    EXPECT_EQ(stop.step, 4);
    EXPECT_EQ(stop.adam_step, 3) << "the AdamW step count did not advance";
    expect_same_state(stop, good, "checkpoint of the stopped run vs the clean run after step 3");
    // What a crash during a later write leaves behind, and an unrelated file.
    std::ofstream(examoe::checkpoint_path(dir + "/s", 5) + ".tmp") << "partial";
    std::ofstream(dir + "/s/notes.tmp") << "keep";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // --resume latest ignores (and removes) the incomplete file and continues as the skip run.
  EXPECT_EQ(examoe::latest_checkpoint(dir + "/s"), s.last_checkpoint);
  auto cs2 = cs;
  cs2.train.nonfinite = "skip";
  cs2.checkpoint.resume = "latest";
  const auto s2 = examoe::train(cs2, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(s2.first_step, 4);
  expect_bitwise(s2.losses, 5, b.losses, 1, 5, 6, "resumed stop run vs skip run");
  MPI_Barrier(MPI_COMM_WORLD);
  struct stat st;
  EXPECT_NE(::stat((examoe::checkpoint_path(dir + "/s", 5) + ".tmp").c_str(), &st), 0) << "not removed";
  EXPECT_EQ(::stat((dir + "/s/notes.tmp").c_str(), &st), 0) << "removed a file that is not a checkpoint";
  remove_dir(dir);
}

TEST(FaultsNonfinite, TooManySkippedStepsInARowStop) {
  const std::string dir = shared_dir("maxskip");
  auto c = tiny(dir);
  c.train.steps = 6;
  c.train.max_skipped = 2;
  examoe::TrainResult r;
  {
    // Steps 2, 4 and 5: the count of steps in a row restarts after step 3.
    FaultEnv env("nan:step=2:rank=0,nan:step=4-5:where=loss");
    r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  }
  EXPECT_TRUE(r.stopped_nonfinite);
  EXPECT_EQ(r.skipped, (std::vector<long long>{2, 4, 5}));
  EXPECT_EQ(r.last_step, 5);
  EXPECT_NE(r.stop_message.find("2 steps in a row (train.max_skipped = 2)"), std::string::npos) << r.stop_message;
  // The checkpoint holds the state after step 3 (2 updates) and resumes.
  const auto info = examoe::read_checkpoint_info(r.last_checkpoint, MPI_COMM_WORLD);
  EXPECT_EQ(info.step, 5);
  if (world_rank() == 0) EXPECT_EQ(read_ckpt(r.last_checkpoint).adam_step, 2);
  auto c2 = c;
  c2.checkpoint.resume = "latest";
  const auto r2 = examoe::train(c2, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(r2.first_step, 5);
  EXPECT_EQ(r2.losses.size(), 1u);
  EXPECT_EQ(r2.skipped_steps, 0);
  remove_dir(dir);
}
#endif
