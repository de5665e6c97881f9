// Checkpoints: exact resume (bitwise at the same rank count, 1e-10 across rank counts and
// dp x ep splits), and clear errors on every rank for bad files, never damaging a good one.
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#if EXAMOE_ENABLE_HDF5
namespace {

int rank_() { return examoe::test::world_rank(); }
int size_() { return examoe::test::world_size(); }

/// A directory name shared by all ranks (rank 0's pid), fresh per test.
std::string shared_dir(const std::string& tag) {
  int pid = static_cast<int>(getpid());
  MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
  const std::string d = "/tmp/examoe_ckpt_" + tag + "_" + std::to_string(pid) + "_np" + std::to_string(size_());
  if (rank_() == 0) {
    std::system(("rm -rf " + d).c_str());
    ::mkdir(d.c_str(), 0755);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return d;
}
void remove_dir(const std::string& d) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_() == 0) std::system(("rm -rf " + d).c_str());
}

examoe::TrainConfig tiny(const std::string& dir) {
  examoe::TrainConfig c;
  c.model.d_model = 16;
  c.model.n_layers = 2;
  c.model.n_heads = 2;
  c.model.seq_len = 16;
  c.model.d_hidden = 24;
  c.model.num_experts = 4;
  c.model.top_k = 2;
  c.model.activation = examoe::Activation::swiglu;
  c.train.steps = 12;
  c.train.batch = 8;
  c.train.warmup = 3;
  c.train.lr = 1e-2;
  c.train.min_lr = 1e-3;
  c.train.precision = "double";
  c.train.seed = 11;
  c.data.val_problems = 16;
  c.log.quiet = true;
  c.log.eval_interval = 1000;
  c.checkpoint.dir = dir;
  return c;
}

std::vector<char> read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const std::string& p, const std::vector<char>& b) {
  std::ofstream out(p, std::ios::binary);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
}

void expect_train_error(const examoe::TrainConfig& c, const std::string& needle) {
  try {
    examoe::train(c, MPI_COMM_WORLD, nullptr);
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  MPI_Barrier(MPI_COMM_WORLD);  // every rank got here: nobody hangs
}

}  // namespace

TEST(TrainCheckpoint, ResumeContinuesExactly) {
  const std::string dir = shared_dir("resume");
  auto full = tiny(dir);
  full.checkpoint.interval = 6;
  full.checkpoint.keep = 5;
  const auto a = examoe::train(full, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(a.losses.size(), 12u);
  EXPECT_EQ(examoe::latest_checkpoint(dir), examoe::checkpoint_path(dir, 12));

  // Resume from step 6 at the same rank count: bitwise the same losses.
  auto r = tiny(dir);
  r.checkpoint.resume = examoe::checkpoint_path(dir, 6);
  const auto b = examoe::train(r, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(b.first_step, 6);
  ASSERT_EQ(b.losses.size(), 6u);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b.losses[i], a.losses[6 + i]) << "step " << 6 + i;

  // Other rank counts and splits: 1 rank (rank 0 alone), and dp 2 x ep 2 at 4 ranks.
  if (rank_() == 0) {
    const auto c = examoe::train(r, MPI_COMM_SELF, nullptr);
    ASSERT_EQ(c.losses.size(), 6u);
    for (int i = 0; i < 6; ++i)
      EXPECT_NEAR(c.losses[i], a.losses[6 + i], 1e-10 * std::fabs(a.losses[6 + i])) << "1 rank, step " << 6 + i;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (size_() == 4) {
    auto s = r;
    s.parallel.ep = 2;
    const auto d = examoe::train(s, MPI_COMM_WORLD, nullptr);
    for (int i = 0; i < 6; ++i)
      EXPECT_NEAR(d.losses[i], a.losses[6 + i], 1e-10 * std::fabs(a.losses[6 + i])) << "dp2 x ep2, step " << 6 + i;
  }
  // Metadata: readable, with the placement and cumulative tokens per expert.
  const auto info = examoe::read_checkpoint_info(examoe::checkpoint_path(dir, 12), MPI_COMM_WORLD);
  EXPECT_EQ(info.step, 12);
  EXPECT_EQ(info.world_size, size_());
  ASSERT_EQ(info.placement.size(), 2u);
  ASSERT_EQ(info.tokens_per_expert.size(), 2u);
  long long routed = 0;
  for (long long t : info.tokens_per_expert[0]) routed += t;
  EXPECT_EQ(routed, 12LL * 8 * 16 * 2) << "steps x batch x seq x top_k assignments";
  remove_dir(dir);
}

TEST(TrainCheckpoint, LatestAndKeep) {
  const std::string dir = shared_dir("keep");
  auto c = tiny(dir);
  c.train.steps = 8;
  c.checkpoint.interval = 2;
  c.checkpoint.keep = 2;
  examoe::train(c, MPI_COMM_WORLD, nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
  struct stat st;
  EXPECT_NE(::stat(examoe::checkpoint_path(dir, 2).c_str(), &st), 0) << "old checkpoint not pruned";
  EXPECT_EQ(::stat(examoe::checkpoint_path(dir, 6).c_str(), &st), 0);
  EXPECT_EQ(::stat(examoe::checkpoint_path(dir, 8).c_str(), &st), 0);
  // A leftover temporary file of an interrupted write is never taken for a checkpoint.
  if (rank_() == 0) write_bytes(examoe::checkpoint_path(dir, 99) + ".tmp", {'x'});
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_EQ(examoe::latest_checkpoint(dir), examoe::checkpoint_path(dir, 8));
  // --resume latest continues from step 8 (nothing left to do when steps = 8).
  auto r = tiny(dir);
  r.train.steps = 10;
  r.checkpoint.resume = "latest";
  const auto res = examoe::train(r, MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(res.first_step, 8);
  EXPECT_EQ(res.losses.size(), 2u);
  remove_dir(dir);
}

TEST(TrainCheckpoint, BadFilesGiveClearErrorsAndDamageNothing) {
  const std::string dir = shared_dir("bad");
  auto c = tiny(dir);
  c.train.steps = 2;
  c.checkpoint.interval = 2;
  examoe::train(c, MPI_COMM_WORLD, nullptr);
  const std::string good = examoe::checkpoint_path(dir, 2);
  std::vector<char> bytes;
  if (rank_() == 0) bytes = read_bytes(good);
  auto resume = [&](const std::string& path) {
    auto r = tiny(dir);
    r.train.steps = 3;
    r.checkpoint.resume = path;
    return r;
  };
  expect_train_error(resume(dir + "/missing.h5"), "missing.h5");
  auto none = tiny(dir + "/empty_dir");
  none.checkpoint.resume = "latest";
  expect_train_error(none, "no checkpoint");
  // Truncated and bit-flipped copies.
  if (rank_() == 0) {
    write_bytes(dir + "/truncated.h5", std::vector<char>(bytes.begin(), bytes.begin() + bytes.size() / 2));
    auto flipped = bytes;
    for (std::size_t i = bytes.size() / 2; i < bytes.size() / 2 + 64; ++i) flipped[i] ^= 0x5A;
    write_bytes(dir + "/flipped.h5", flipped);
    write_bytes(dir + "/notes.h5", std::vector<char>{'h', 'e', 'l', 'l', 'o'});
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_train_error(resume(dir + "/truncated.h5"), "truncated.h5");
  expect_train_error(resume(dir + "/notes.h5"), "notes.h5");
  {
    // A flipped block of data must not load silently: either HDF5 or the checksum says so.
    auto r = resume(dir + "/flipped.h5");
    try {
      examoe::train(r, MPI_COMM_WORLD, nullptr);
      ADD_FAILURE() << "a corrupted checkpoint loaded without error";
    } catch (const examoe::Error& e) {
      const std::string m = e.what();
      EXPECT_TRUE(m.find("corrupt") != std::string::npos || m.find("flipped.h5") != std::string::npos) << m;
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  // Another format version.
  if (rank_() == 0) {
    write_bytes(dir + "/v99.h5", bytes);
    hid_t f = H5Fopen((dir + "/v99.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    const int v = 99;
    H5Awrite(a, H5T_NATIVE_INT, &v);
    H5Aclose(a);
    H5Fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_train_error(resume(dir + "/v99.h5"), "format version 99");
  // Another model shape, another precision.
  auto shape = resume(good);
  shape.model.d_hidden = 32;
  expect_train_error(shape, "model.d_hidden");
  auto prec = resume(good);
  prec.train.precision = "float";
  expect_train_error(prec, "double");
  // The good checkpoint is untouched by all of this and still resumes.
  if (rank_() == 0) EXPECT_EQ(read_bytes(good), bytes);
  const auto ok = examoe::train(resume(good), MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(ok.first_step, 2);
  remove_dir(dir);
}
#endif  // EXAMOE_ENABLE_HDF5
