// Checkpoints: exact resume (bitwise at the same rank count, 1e-10 across rank counts and
// dp x ep splits), and clear errors on every rank for bad files, never damaging a good one.
#include "test_hdf5.hpp"
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/data.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <algorithm>
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

std::string shared_dir(const std::string& tag) { return examoe::test::make_shared_dir("ckpt", tag); }
void remove_dir(const std::string& d) { examoe::test::remove_shared_dir(d); }

examoe::TrainConfig tiny(const std::string& dir) {
  examoe::TrainConfig c = examoe::test::tiny_train_config();
  c.model.activation = examoe::Activation::swiglu;
  c.train.steps = 12;
  c.train.warmup = 3;
  c.train.seed = 11;
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

TEST(Checkpoint, ResumeContinuesExactly) {
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

// Sigmoid scores with the selection bias: the bias is in the checkpoint and a resumed run
// continues bitwise (at one rank too, to 1e-10: the bias is the same at any rank count).
TEST(Checkpoint, ResumeWithRouterBiasContinuesExactly) {
  const std::string dir = shared_dir("resume_bias");
  auto full = tiny(dir);
  full.model.router.score = examoe::RouterScore::sigmoid;
  full.model.router.bias_rate = 0.05;
  full.model.router.aux_loss_coef = 0;
  full.checkpoint.interval = 6;
  full.checkpoint.keep = 5;
  const auto a = examoe::train(full, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(a.losses.size(), 12u);
  const auto info = examoe::read_checkpoint_info(examoe::checkpoint_path(dir, 6), MPI_COMM_WORLD);
  ASSERT_EQ(info.router_bias.size(), 2u);
  double moved = 0;
  for (const auto& layer : info.router_bias)
    for (double b : layer) {
      // six updates of +-0.05 or 0 each
      EXPECT_NEAR(std::remainder(b, 0.05), 0.0, 1e-12) << b;
      EXPECT_LE(std::fabs(b), 6 * 0.05 + 1e-12);
      moved = std::max(moved, std::fabs(b));
    }
  EXPECT_GT(moved, 0.0) << "the bias never moved";

  auto r = full;
  r.checkpoint.resume = examoe::checkpoint_path(dir, 6);
  const auto b = examoe::train(r, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(b.losses.size(), 6u);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b.losses[i], a.losses[6 + i]) << "step " << 6 + i;
  if (rank_() == 0) {
    const auto c = examoe::train(r, MPI_COMM_SELF, nullptr);
    ASSERT_EQ(c.losses.size(), 6u);
    for (int i = 0; i < 6; ++i)
      EXPECT_NEAR(c.losses[i], a.losses[6 + i], 1e-10 * std::fabs(a.losses[6 + i])) << "1 rank, step " << 6 + i;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  // Without the bias the resumed run is another one: the checkpoint's bias mattered.
  auto z = r;
  z.model.router.bias_rate = 0;
  const auto n = examoe::train(z, MPI_COMM_WORLD, nullptr);
  bool differs = false;
  for (int i = 0; i < 6; ++i) differs = differs || n.losses[i] != a.losses[6 + i];
  EXPECT_TRUE(differs) << "dropping the selection bias changed no loss";
  remove_dir(dir);
}

TEST(Checkpoint, LatestAndKeep) {
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

TEST(Checkpoint, BadFilesGiveClearErrorsAndDamageNothing) {
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
  // A flipped block of data never loads, and never reaches HDF5: the whole-file checksum
  // (docs/checkpoint-format.md) catches it first.
  expect_train_error(resume(dir + "/flipped.h5"), "flipped.h5' fails its whole-file checksum: the file is corrupt");
  long long half = static_cast<long long>(bytes.size() / 2);
  MPI_Bcast(&half, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  expect_train_error(resume(dir + "/truncated.h5"), "is truncated: it has " + std::to_string(half) + " bytes");
  // Damage of the header itself, bytes appended, a single flipped bit, an HDF5 file without
  // the header (format version 1 or a foreign file), a directory.
  if (rank_() == 0) {
    auto hdr = bytes;
    hdr[20] ^= 0x01;  // inside "format 2"
    write_bytes(dir + "/header.h5", hdr);
    auto longer = bytes;
    longer.push_back('\n');
    write_bytes(dir + "/longer.h5", longer);
    auto bit = bytes;
    bit[bytes.size() - 1000] ^= 0x10;
    write_bytes(dir + "/bit.h5", bit);
    hid_t f = H5Fcreate((dir + "/v1.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "format_version", H5T_NATIVE_INT, sp, H5P_DEFAULT, H5P_DEFAULT);
    const int one = 1;
    H5Awrite(a, H5T_NATIVE_INT, &one);
    H5Aclose(a);
    H5Sclose(sp);
    H5Fclose(f);
    ::mkdir((dir + "/dir.h5").c_str(), 0755);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_train_error(resume(dir + "/header.h5"), "header.h5' has");
  expect_train_error(resume(dir + "/longer.h5"), "longer.h5' is longer than its header says");
  expect_train_error(resume(dir + "/bit.h5"), "bit.h5' fails its whole-file checksum");
  expect_train_error(resume(dir + "/v1.h5"), "v1.h5' is an HDF5 file without an ExaMoE header: a checkpoint of format version 1");
  expect_train_error(resume(dir + "/dir.h5"), "dir.h5' is not a regular file");
  // Another format version: in the header, and (a file edited with HDF5 and sealed again)
  // in the root attribute.
  if (rank_() == 0) {
    auto v7 = bytes;
    const std::string text(v7.begin(), v7.begin() + 64);
    const std::size_t at = text.find("format 2\n");
    ASSERT_NE(at, std::string::npos) << text;
    v7[at + 7] = '7';
    write_bytes(dir + "/v7.h5", v7);
    write_bytes(dir + "/v99.h5", bytes);
    hid_t f = H5Fopen((dir + "/v99.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    const int v = 99;
    H5Awrite(a, H5T_NATIVE_INT, &v);
    H5Aclose(a);
    H5Fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_train_error(resume(dir + "/v7.h5"), "v7.h5' has format version 7; this ExaMoE reads version 2");
  expect_train_error(resume(dir + "/v99.h5"), "fails its whole-file checksum");  // edited, not sealed
  if (rank_() == 0) examoe::seal_checkpoint_file(dir + "/v99.h5", MPI_COMM_SELF);
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
TEST(Checkpoint, EvalWritesLogitsThatReproduceTheValidationLoss) {
  const std::string dir = shared_dir("eval");
  auto c = tiny(dir);
  c.train.steps = 4;
  c.checkpoint.interval = 4;
  const auto r = examoe::train(c, MPI_COMM_WORLD, nullptr);
  // The validation sequences of the run, written as an eval input file.
  examoe::AdditionCorpus corpus(c.train.seed, c.data.digits, c.data.val_problems);
  const int seq = c.model.seq_len, n = corpus.num_val_sequences(seq);
  examoe::Batch b;
  corpus.val_batch(0, n, seq, b);
  const std::string in = dir + "/in.h5", out = dir + "/out.h5";
  if (rank_() == 0)
    examoe::test::write_int_datasets(in, {{"tokens", &b.tokens}, {"targets", &b.targets}}, n, seq);
  MPI_Barrier(MPI_COMM_WORLD);
  const double loss = examoe::eval_file(examoe::checkpoint_path(dir, 4), in, out, 0, MPI_COMM_WORLD, nullptr);
  EXPECT_NEAR(loss, r.final.loss, 1e-12 * r.final.loss) << "eval of the checkpoint vs the run's validation";
  if (rank_() == 0) {
    // Recompute the cross-entropy from the written logits alone.
    std::vector<hsize_t> dims;
    const std::vector<float> lg = examoe::test::read_logits(out, &dims);
    ASSERT_EQ(dims.size(), 3u);
    EXPECT_EQ(dims[0], static_cast<hsize_t>(n));
    EXPECT_EQ(dims[1], static_cast<hsize_t>(seq));
    EXPECT_EQ(dims[2], 256u);
    double ce = 0;
    long long cnt = 0;
    for (std::size_t i = 0; i < b.targets.size(); ++i) {
      if (b.targets[i] < 0) continue;
      const float* row = lg.data() + i * 256;
      double mx = row[0], s = 0;
      for (int v = 0; v < 256; ++v) mx = std::max(mx, static_cast<double>(row[v]));
      for (int v = 0; v < 256; ++v) s += std::exp(row[v] - mx);
      ce += -(row[b.targets[i]] - mx - std::log(s));
      ++cnt;
    }
    EXPECT_NEAR(ce / cnt, loss, 1e-5) << "logits in the file do not give the reported loss (float storage)";
  }
  // Bad input: wrong sequence length.
  if (rank_() == 0) {
    hid_t f = H5Fcreate((dir + "/bad.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[2] = {2, 5};
    std::vector<int> z(10, 65);
    hid_t sp = H5Screate_simple(2, dims, nullptr);
    hid_t ds = H5Dcreate2(f, "tokens", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(ds, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, z.data());
    H5Dclose(ds);
    H5Sclose(sp);
    H5Fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    examoe::eval_file(examoe::checkpoint_path(dir, 4), dir + "/bad.h5", out, 0, MPI_COMM_WORLD, nullptr);
    ADD_FAILURE() << "a 5-token input was accepted for seq_len 16";
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("seq_len is 16"), std::string::npos) << e.what();
  }
  remove_dir(dir);
}
#endif  // EXAMOE_ENABLE_HDF5
