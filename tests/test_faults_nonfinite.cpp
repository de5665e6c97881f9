// Non-finite steps: a step whose loss or gradients are not finite is skipped exactly (the run goes
// on bitwise as if it never happened), and too many in a row stop the run with a checkpoint of
// the last good state.
#include "test_faults.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <cstring>
#include <fstream>
#include <map>
#include <sys/stat.h>

namespace {

using examoe::test::FaultEnv;
using examoe::test::remove_dir;
using examoe::test::shared_dir;
using examoe::test::tiny;
using examoe::test::world_rank;
using examoe::test::world_size;

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
  cs.train.nonfinite = examoe::NonfinitePolicy::stop;
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
  cs2.train.nonfinite = examoe::NonfinitePolicy::skip;
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
