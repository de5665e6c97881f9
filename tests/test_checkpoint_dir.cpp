// The checkpoint directory (docs/checkpoint-format.md, "The checkpoint directory"): run ids,
// pruning that removes only the run's own checkpoints, a new run refused beside another
// run's, the directory lock, outputs that would overwrite a checkpoint or an input, and
// states that no checkpoint may hold (non-finite values, negative second moments). Every
// error must be thrown on every rank, and no file may change.
#include "test_hdf5.hpp"
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#if EXAMOE_ENABLE_HDF5
namespace {

using examoe::checkpoint_path;
using examoe::test::world_rank;

std::string shared_dir(const std::string& tag) { return examoe::test::make_shared_dir("ckdir", tag); }
void remove_dir(const std::string& d) { examoe::test::remove_shared_dir(d); }

examoe::TrainConfig tiny(const std::string& dir) {
  examoe::TrainConfig c = examoe::test::tiny_train_config();
  c.train.steps = 4;
  c.train.warmup = 1;
  c.checkpoint.dir = dir;
  return c;
}

std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
bool exists(const std::string& p) {
  struct stat st;
  return ::lstat(p.c_str(), &st) == 0;
}
/// The contents of the files `paths` on rank 0 (to compare before and after).
std::vector<std::string> snapshot(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  if (world_rank() == 0)
    for (const auto& p : paths) out.push_back(read_file(p));
  return out;
}

/// `f` throws examoe::Error containing every needle, on every rank; the ranks then agree.
void expect_error_everywhere(const std::function<void()>& f, const std::vector<std::string>& needles,
                             const std::string& what) {
  int ok = 0;
  std::string msg;
  try {
    f();
    msg = "no error";
  } catch (const examoe::Error& e) {
    msg = e.what();
    ok = 1;
    for (const auto& n : needles)
      if (msg.find(n) == std::string::npos) ok = 0;
  }
  EXPECT_EQ(ok, 1) << what << ": expected a message with every needle, got: " << msg;
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(all, 1) << what << ": not every rank threw the expected examoe::Error";
}

/// Removes the `run` line from a checkpoint's header: what a checkpoint written before run
/// ids looks like (the header is outside the checksum). Rank 0.
void strip_run_id(const std::string& path) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  std::string block(examoe::kCheckpointHeaderBytes, '\0');
  f.read(block.data(), static_cast<std::streamsize>(block.size()));
  const std::size_t at = block.find("run ");
  ASSERT_NE(at, std::string::npos) << "no run line in the header of " << path;
  const std::size_t end = block.find('\n', at) + 1;
  block.erase(at, end - at);
  block.resize(examoe::kCheckpointHeaderBytes, '\0');
  f.seekp(0);
  f.write(block.data(), static_cast<std::streamsize>(block.size()));
}

/// Sets element `flat` of dataset `name` (a double tensor) to `value` and recomputes its
/// checksum attribute (docs/checkpoint-format.md), then seals the file: the checksums pass,
/// the value is wrong. Rank 0.
void poison_element(const std::string& path, const std::string& name, std::size_t flat, double value) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t ds = H5Dopen2(f, name.c_str(), H5P_DEFAULT);
  ASSERT_GE(ds, 0) << name;
  hid_t sp = H5Dget_space(ds);
  std::vector<double> v(static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp)));
  H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  v.at(flat) = value;
  H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v[i], sizeof bits);
    sum += examoe::impl::splitmix64(i * 0x9E3779B97F4A7C15ull ^ bits ^ 0xC0FFEEull);
  }
  hid_t a = H5Aopen(ds, "examoe_checksum", H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_UINT64, &sum);
  H5Aclose(a);
  H5Sclose(sp);
  H5Dclose(ds);
  H5Fclose(f);
  examoe::seal_checkpoint_file(path, MPI_COMM_SELF);
}

}  // namespace

TEST(CheckpointDir, RunIdsAndPruningOfTheRunsOwnCheckpointsOnly) {
  const std::string dir = shared_dir("prune");
  // Run A: steps 1..8, a checkpoint every 2, keep 2: A's 6 and 8 stay.
  auto a = tiny(dir);
  a.train.steps = 8;
  a.checkpoint.interval = 2;
  a.checkpoint.keep = 2;
  examoe::train(a, MPI_COMM_WORLD, nullptr);
  const std::string a6 = checkpoint_path(dir, 6), a8 = checkpoint_path(dir, 8);
  const auto info_a = examoe::read_checkpoint_info(a8, MPI_COMM_WORLD);
  ASSERT_FALSE(info_a.run_id.empty());
  EXPECT_EQ(examoe::read_checkpoint_info(a6, MPI_COMM_WORLD).run_id, info_a.run_id);
  const auto a_files = snapshot({a6, a8});

  // A new run there is refused on every rank, naming the directory and the flags.
  auto b = tiny(dir);
  b.checkpoint.interval = 1;
  b.checkpoint.keep = 2;
  expect_error_everywhere([&] { examoe::train(b, MPI_COMM_WORLD, nullptr); },
                          {"examoe::train: checkpoint.dir '" + dir + "' already holds checkpoints (step-00000008.h5 and 1 more)",
                           "--resume latest", "--checkpoint.allow_existing true"},
                          "new run beside another run's checkpoints");

  // The old bug: a fresh run (allowed now) beside A's higher-step checkpoints, keep 2. It
  // must keep its own newest two (3, 4) and touch none of A's.
  b.checkpoint.allow_existing = true;
  const auto rb = examoe::train(b, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(rb.last_checkpoint, checkpoint_path(dir, 4));
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(exists(checkpoint_path(dir, 1)));
  EXPECT_FALSE(exists(checkpoint_path(dir, 2)));
  ASSERT_TRUE(exists(checkpoint_path(dir, 3))) << "the run pruned its own new checkpoint";
  ASSERT_TRUE(exists(checkpoint_path(dir, 4))) << "the run pruned its own new checkpoint";
  EXPECT_EQ(snapshot({a6, a8}), a_files) << "another run's checkpoints changed";
  const std::string id_b = examoe::read_checkpoint_info(checkpoint_path(dir, 4), MPI_COMM_WORLD).run_id;
  EXPECT_FALSE(id_b.empty());
  EXPECT_NE(id_b, info_a.run_id);
  EXPECT_EQ(examoe::read_checkpoint_info(checkpoint_path(dir, 3), MPI_COMM_WORLD).run_id, id_b);
  EXPECT_FALSE(exists(examoe::checkpoint_lock_path(dir))) << "the lock outlived the run";

  // B resumed keeps its run id (prunes its 3 and 4 after writing 5 and 6) until its next
  // checkpoint would replace A's step 6: refused, A's file intact, B's 5 written.
  auto b2 = b;
  b2.checkpoint.allow_existing = false;
  b2.checkpoint.resume = checkpoint_path(dir, 4);
  b2.train.steps = 6;
  expect_error_everywhere([&] { examoe::train(b2, MPI_COMM_WORLD, nullptr); },
                          {"'" + a6 + "' is a checkpoint of another run (run " + info_a.run_id + "; this run is " + id_b,
                           "not replaced"},
                          "a checkpoint that would replace another run's");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(snapshot({a6, a8}), a_files) << "another run's checkpoint was replaced";
  ASSERT_TRUE(exists(checkpoint_path(dir, 5)));
  EXPECT_EQ(examoe::read_checkpoint_info(checkpoint_path(dir, 5), MPI_COMM_WORLD).run_id, id_b);
  EXPECT_TRUE(exists(checkpoint_path(dir, 4))) << "keep 2: B's 4 and 5 stay";
  EXPECT_FALSE(exists(checkpoint_path(dir, 3))) << "keep 2: B's 3 is pruned after B's 5";
  EXPECT_FALSE(exists(checkpoint_path(dir, 6) + ".tmp"));
  EXPECT_FALSE(exists(examoe::checkpoint_lock_path(dir))) << "the lock outlived the failed run";
  remove_dir(dir);
}

TEST(CheckpointDir, CheckpointsWithoutRunIdLoadAndAreNeverPruned) {
  const std::string dir = shared_dir("norunid");
  auto c = tiny(dir + "/old");
  c.train.steps = 2;
  c.checkpoint.interval = 2;
  examoe::train(c, MPI_COMM_WORLD, nullptr);
  const std::string old = checkpoint_path(dir + "/old", 2);
  if (world_rank() == 0) strip_run_id(old);
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(examoe::peek_checkpoint_header(old).run_id, "");
  const auto info = examoe::read_checkpoint_info(old, MPI_COMM_WORLD);
  EXPECT_EQ(info.run_id, "") << "an older checkpoint is of unknown run";
  const auto old_bytes = snapshot({old});

  // A new run beside it (allowed), keep 1: the old checkpoint is never pruned.
  auto n = tiny(dir + "/old");
  n.checkpoint.interval = 1;
  n.checkpoint.keep = 1;
  n.checkpoint.allow_existing = true;
  n.train.steps = 1;
  examoe::train(n, MPI_COMM_WORLD, nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(snapshot({old}), old_bytes);

  // Resuming from it works; the resumed run gets a new id and prunes only its own.
  auto r = tiny(dir + "/resumed");
  r.checkpoint.resume = old;
  r.checkpoint.interval = 1;
  r.checkpoint.keep = 1;
  const auto res = examoe::train(r, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(res.first_step, 2);
  EXPECT_EQ(res.last_checkpoint, checkpoint_path(dir + "/resumed", 4));
  const std::string id = examoe::read_checkpoint_info(res.last_checkpoint, MPI_COMM_WORLD).run_id;
  EXPECT_FALSE(id.empty());
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(exists(checkpoint_path(dir + "/resumed", 3))) << "keep 1 prunes the run's own";
  EXPECT_EQ(snapshot({old}), old_bytes);
  // Sealing again keeps a header's run id (tools that edit a checkpoint and seal it).
  if (world_rank() == 0) {
    examoe::seal_checkpoint_file(res.last_checkpoint, MPI_COMM_SELF);
    EXPECT_EQ(examoe::peek_checkpoint_header(res.last_checkpoint).run_id, id);
  }
  remove_dir(dir);
}

TEST(CheckpointDir, TheLockRefusesASecondJobAndStaleLocksAreTakenOver) {
  const std::string dir = shared_dir("lock");
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  int pid0 = static_cast<int>(::getpid());
  MPI_Bcast(&pid0, 1, MPI_INT, 0, MPI_COMM_WORLD);
  auto c = tiny(dir);
  c.train.steps = 2;
  c.checkpoint.interval = 2;
  {
    // This process (rank 0) holds the lock, as a job writing there would.
    examoe::CheckpointLock held;
    std::string why;
    if (world_rank() == 0) why = held.acquire(dir);
    EXPECT_EQ(why, "");
    const std::string lock = examoe::checkpoint_lock_path(dir);
    if (world_rank() == 0) EXPECT_NE(read_file(lock).find("pid " + std::to_string(pid0)), std::string::npos);
    MPI_Barrier(MPI_COMM_WORLD);
    expect_error_everywhere([&] { examoe::train(c, MPI_COMM_WORLD, nullptr); },
                            {"checkpoint.dir '" + dir + "' is locked by pid " + std::to_string(pid0) + " on host " + host,
                             "lock file '" + lock + "'", "two jobs must not share a checkpoint directory"},
                            "a second job on a locked directory");
    // --resume latest takes the lock too; a second lock in this process is refused as well.
    auto r = c;
    r.checkpoint.interval = 0;
    r.checkpoint.resume = "latest";
    expect_error_everywhere([&] { examoe::train(r, MPI_COMM_WORLD, nullptr); }, {"is locked by pid"},
                            "--resume latest on a locked directory");
    if (world_rank() == 0) {
      examoe::CheckpointLock second;
      EXPECT_NE(second.acquire(dir).find("is locked by pid " + std::to_string(pid0)), std::string::npos);
      EXPECT_FALSE(second.held());
    }
    MPI_Barrier(MPI_COMM_WORLD);
    EXPECT_FALSE(exists(checkpoint_path(dir, 2)));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(exists(examoe::checkpoint_lock_path(dir))) << "release() removes the lock";
  MPI_Barrier(MPI_COMM_WORLD);

  // A stale lock: its owner ran on this host and is gone (a child that has exited).
  int dead = 0;
  if (world_rank() == 0) {
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    ::waitpid(child, nullptr, 0);
    dead = static_cast<int>(child);
    std::ofstream(examoe::checkpoint_lock_path(dir)) << "examoe checkpoint directory lock\nhost " << host << "\npid "
                                                     << dead << "\nstart 12345\ntoken 1\nsince 2000-01-01 00:00:00\n";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  std::ostringstream log;
  const auto res = examoe::train(c, MPI_COMM_WORLD, world_rank() == 0 ? &log : nullptr);
  EXPECT_EQ(res.last_checkpoint, checkpoint_path(dir, 2));
  if (world_rank() == 0)
    EXPECT_NE(log.str().find("note: took over the stale lock '" + examoe::checkpoint_lock_path(dir) + "' of pid " +
                             std::to_string(dead) + " on host " + host),
              std::string::npos)
        << log.str();
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(exists(examoe::checkpoint_lock_path(dir)));
  MPI_Barrier(MPI_COMM_WORLD);

  // Owners that cannot be judged from here: another host, an empty (damaged) lock file.
  for (const std::string text : {std::string("host elsewhere.example\npid 1\n"), std::string()}) {
    if (world_rank() == 0) std::ofstream(examoe::checkpoint_lock_path(dir)) << text;
    MPI_Barrier(MPI_COMM_WORLD);
    auto r = c;
    r.checkpoint.resume = "latest";
    r.train.steps = 3;
    expect_error_everywhere([&] { examoe::train(r, MPI_COMM_WORLD, nullptr); },
                            {text.empty() ? "is locked by an unknown owner (the lock file is empty or damaged)"
                                          : "is locked by pid 1 on host elsewhere.example",
                             "if that job no longer runs, remove the lock file"},
                            "lock of " + (text.empty() ? std::string("an unknown owner") : "another host"));
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) EXPECT_EQ(read_file(examoe::checkpoint_lock_path(dir)), text) << "another owner's lock changed";
  }
  // The lock goes when the run ends with an error after taking it (here: a resume file
  // that does not exist, with checkpoints at an interval).
  if (world_rank() == 0) ::unlink(examoe::checkpoint_lock_path(dir).c_str());
  auto bad = c;
  bad.checkpoint.resume = dir + "/missing.h5";
  expect_error_everywhere([&] { examoe::train(bad, MPI_COMM_WORLD, nullptr); }, {"missing.h5"}, "missing resume file");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_FALSE(exists(examoe::checkpoint_lock_path(dir))) << "the lock outlived an error";
  remove_dir(dir);
}

TEST(CheckpointDir, NoOutputOverwritesACheckpointOrAnInput) {
  const std::string dir = shared_dir("outputs");
  auto c = tiny(dir + "/ck");
  c.train.steps = 1;
  c.checkpoint.interval = 1;
  examoe::train(c, MPI_COMM_WORLD, nullptr);
  const std::string ck = checkpoint_path(dir + "/ck", 1);
  const std::string in = dir + "/in.h5", data = dir + "/data.txt", other = dir + "/copy.h5";
  if (world_rank() == 0) {
    const std::vector<int> tokens(2 * c.model.seq_len, 65);
    examoe::test::write_int_datasets(in, {{"tokens", &tokens}}, 2, c.model.seq_len);
    std::ofstream(data) << std::string(4096, 'a') + "the quick brown fox jumps over the lazy dog\n";
    std::ofstream(other, std::ios::binary) << read_file(ck);
    ::symlink(ck.c_str(), (dir + "/link.h5").c_str());
    ::link(ck.c_str(), (dir + "/hard.h5").c_str());
    ::symlink(in.c_str(), (dir + "/in-link.h5").c_str());
    ::mkdir((dir + "/ck2").c_str(), 0755);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const std::vector<std::string> files = {ck, in, data, other};
  const auto before = snapshot(files);
  // examoe eval --output: the same file by other names, the input, another checkpoint.
  const std::string ev = "refused, writing the logits would destroy it";
  const std::vector<std::pair<std::string, std::string>> outputs = {
      {ck, "is the checkpoint being evaluated"},
      {dir + "/ck/../ck/step-00000001.h5", "is the checkpoint being evaluated"},
      {dir + "/link.h5", "is the checkpoint being evaluated"},
      {dir + "/hard.h5", "is the checkpoint being evaluated"},
      {in, "is the input (--input)"},
      {dir + "/in-link.h5", "is the input (--input)"},
      {other, "is an ExaMoE checkpoint"},
  };
  for (const auto& [out, needle] : outputs) {
    expect_error_everywhere([&, &out = out] { examoe::eval_file(ck, in, out, 0, MPI_COMM_WORLD, nullptr); },
                            {"examoe eval: --output '" + out + "' " + needle, ev}, "eval --output " + out);
  }
  // An output whose temporary file (output + ".tmp") is the input.
  if (world_rank() == 0) ::rename(in.c_str(), (dir + "/logits.h5.tmp").c_str());
  MPI_Barrier(MPI_COMM_WORLD);
  expect_error_everywhere(
      [&] { examoe::eval_file(ck, dir + "/logits.h5.tmp", dir + "/logits.h5", 0, MPI_COMM_WORLD, nullptr); },
      {"'" + dir + "/logits.h5' (through its temporary file '" + dir + "/logits.h5.tmp') is the input"},
      "eval --output whose temporary file is the input");
  if (world_rank() == 0) ::rename((dir + "/logits.h5.tmp").c_str(), in.c_str());
  MPI_Barrier(MPI_COMM_WORLD);

  // log.metrics: the checkpoint resumed from, a checkpoint, the data, a checkpoint name.
  const std::string lm = "refused, appending metrics to it would destroy it";
  auto resume = tiny(dir + "/ck");
  resume.train.steps = 2;
  resume.checkpoint.resume = ck;
  resume.log.metrics = dir + "/link.h5";
  expect_error_everywhere([&] { examoe::train(resume, MPI_COMM_WORLD, nullptr); },
                          {"examoe::train: log.metrics '" + dir + "/link.h5' is the checkpoint to resume from", lm},
                          "log.metrics = the checkpoint resumed from");
  auto fresh = tiny(dir + "/ck2");
  fresh.log.metrics = other;
  expect_error_everywhere([&] { examoe::train(fresh, MPI_COMM_WORLD, nullptr); },
                          {"log.metrics '" + other + "' is an ExaMoE checkpoint", lm}, "log.metrics = a checkpoint");
  fresh.log.metrics = data;
  fresh.data.path = data;
  expect_error_everywhere([&] { examoe::train(fresh, MPI_COMM_WORLD, nullptr); },
                          {"log.metrics '" + data + "' is the training data (data.path)", lm}, "log.metrics = the data");
  fresh.data.path.clear();
  fresh.checkpoint.interval = 1;
  fresh.log.metrics = dir + "/ck2/step-00000001.h5";
  expect_error_everywhere([&] { examoe::train(fresh, MPI_COMM_WORLD, nullptr); },
                          {"log.metrics '" + fresh.log.metrics + "' is a name the run's checkpoints use in checkpoint.dir"},
                          "log.metrics = a checkpoint name of the run");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(snapshot(files), before) << "a refused output changed a file";
  EXPECT_FALSE(exists(dir + "/ck2/step-00000001.h5"));
  remove_dir(dir);
}

TEST(CheckpointDir, NonFiniteOrNegativeStateIsRefusedOnLoad) {
  const std::string dir = shared_dir("poison");
  auto c = tiny(dir);
  c.train.steps = 2;
  c.checkpoint.interval = 2;
  examoe::train(c, MPI_COMM_WORLD, nullptr);
  const std::string good = checkpoint_path(dir, 2);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  // lm_head is [d][256] = [16][256]: flat 3 * 256 + 7 is [3][7]. layer1.w2 is [E][h][d] =
  // [4][24][16]: flat 2 * 384 + 5 * 16 + 9 is [2][5][9].
  struct Case {
    std::string file, dataset;
    std::size_t flat;
    double value;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"nan_param.h5", "params/lm_head", 3 * 256 + 7, nan,
       "dataset 'params/lm_head' holds nan at [3][7]: a parameter must be finite"},
      {"inf_expert.h5", "params/layer1.w2", 2 * 384 + 5 * 16 + 9, -inf,
       "dataset 'params/layer1.w2' holds -inf at [2][5][9]: a parameter must be finite"},
      {"inf_m.h5", "adam_m/embed.wte", 100, inf, "dataset 'adam_m/embed.wte' holds inf at [6][4]: an AdamW moment must be finite"},
      {"negative_v.h5", "adam_v/layer0.w1", 17, -0.25,
       "dataset 'adam_v/layer0.w1' holds -0.25 at [0][0][17]: an AdamW second moment must be >= 0"},
  };
  for (const auto& cs : cases) {
    const std::string path = dir + "/" + cs.file;
    if (world_rank() == 0) {
      std::ofstream(path, std::ios::binary) << read_file(good);
      poison_element(path, cs.dataset, cs.flat, cs.value);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    auto r = tiny(dir);
    r.checkpoint.resume = path;
    expect_error_everywhere([&] { examoe::train(r, MPI_COMM_WORLD, nullptr); }, {"'" + path + "'", cs.needle},
                            "resume " + cs.file);
  }
  // The good file still resumes.
  auto r = tiny(dir);
  r.checkpoint.resume = good;
  EXPECT_EQ(examoe::train(r, MPI_COMM_WORLD, nullptr).first_step, 2);
  remove_dir(dir);
}

TEST(CheckpointDir, NonFiniteWeightsAreNeverWrittenAsTheLastGoodState) {
  // Float, lr 1e39: step 1's gradients are finite, but its update overflows every weight it
  // moves to +-inf; step 2's loss is then NaN. Before the fix, train.nonfinite = stop wrote
  // those weights as "the last good weights" (a checkpoint that cannot be resumed).
  const std::string dir = shared_dir("overflow");
  auto c = tiny(dir);
  c.train.precision = "float";
  c.train.lr = 1e39;
  c.train.min_lr = 0;
  c.train.warmup = 0;
  c.train.nonfinite = examoe::NonfinitePolicy::stop;
  const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  EXPECT_TRUE(r.stopped_nonfinite);
  EXPECT_EQ(r.last_step, 2);
  EXPECT_EQ(r.last_checkpoint, "");
  EXPECT_NE(r.stop_message.find("training stopped at step 2: non-finite loss"), std::string::npos) << r.stop_message;
  EXPECT_NE(r.stop_message.find("the weights or optimizer state are not finite themselves (params/"),
            std::string::npos)
      << r.stop_message;
  EXPECT_NE(r.stop_message.find("no checkpoint was written as the last good state; this run has no earlier checkpoint"),
            std::string::npos)
      << r.stop_message;
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_TRUE(examoe::list_checkpoints(dir).empty());
  // With an earlier checkpoint (step 1 of a run at a sane lr, resumed at lr 1e39), the message
  // names it; a checkpoint at an interval after the overflow is refused by save itself.
  auto s = tiny(dir);
  s.train.precision = "float";
  s.train.steps = 1;
  s.checkpoint.interval = 1;
  examoe::train(s, MPI_COMM_WORLD, nullptr);
  auto t = c;
  t.checkpoint.resume = "latest";
  t.train.steps = 4;
  const auto rt = examoe::train(t, MPI_COMM_WORLD, nullptr);
  EXPECT_TRUE(rt.stopped_nonfinite);
  EXPECT_NE(rt.stop_message.find("the newest earlier checkpoint is " + checkpoint_path(dir, 1)), std::string::npos)
      << rt.stop_message;
  auto u = t;
  u.checkpoint.interval = 1;
  const auto one = snapshot({checkpoint_path(dir, 1)});
  expect_error_everywhere([&] { examoe::train(u, MPI_COMM_WORLD, nullptr); },
                          {"examoe::checkpoint::save: not writing '" + checkpoint_path(dir, 2) + "'",
                           "the state to save is not valid (params/", "the existing checkpoints are untouched"},
                          "interval checkpoint of an overflowed state");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(snapshot({checkpoint_path(dir, 1)}), one);
  EXPECT_FALSE(exists(checkpoint_path(dir, 2)) || exists(checkpoint_path(dir, 2) + ".tmp"));
  remove_dir(dir);
}
#endif  // EXAMOE_ENABLE_HDF5
