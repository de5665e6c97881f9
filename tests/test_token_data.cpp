// Token files (docs/data.md): the llm.c, headerless uint16, byte and HDF5 readers against
// hand-written files (exact ids at exact offsets), every bad input's message, TokenCorpus's
// sampling contract, and the id check over the ranks (the first bad id on every rank).
#include <examoe/comm.hpp>
#include <examoe/config.hpp>
#include <examoe/data.hpp>
#include <examoe/error.hpp>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

namespace fs = std::filesystem;

int rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

/// A temporary path shared by the ranks (rank 0's process id in its name), removed at scope
/// exit. The files are written by rank 0 (write_bytes, write_h5), then every rank reads them.
class TempPath {
 public:
  explicit TempPath(const std::string& name) {
    long long pid = ::getpid();
    MPI_Bcast(&pid, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    path_ = (fs::temp_directory_path() / ("examoe_test_token_" + std::to_string(pid) + "_" + name)).string();
  }
  ~TempPath() {
    MPI_Barrier(MPI_COMM_WORLD);
    std::error_code ec;
    if (rank() == 0) fs::remove_all(path_, ec);
  }
  TempPath(const TempPath&) = delete;
  TempPath& operator=(const TempPath&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// Rank 0 writes `bytes` to `path` once every rank is done with what it held; every rank
/// returns once it is there.
void write_bytes(const std::string& path, const std::string& bytes) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank() == 0) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

void make_directory(const std::string& path) {
  if (rank() == 0) fs::create_directory(path);
  MPI_Barrier(MPI_COMM_WORLD);
}

/// Little-endian bytes of v, `width` of them.
std::string le(std::uint64_t v, int width) {
  std::string s;
  for (int b = 0; b < width; ++b) s.push_back(static_cast<char>((v >> (8 * b)) & 0xFF));
  return s;
}

/// llm.c's header: 256 int32, [0] magic, [1] version, [2] token count, the rest 0.
std::string llmc_header(std::int64_t magic, std::int64_t version, std::int64_t count) {
  std::string h = le(static_cast<std::uint32_t>(magic), 4) + le(static_cast<std::uint32_t>(version), 4) +
                  le(static_cast<std::uint32_t>(count), 4);
  h.resize(1024, '\0');
  return h;
}

std::string tokens_le(const std::vector<std::uint64_t>& ids, int width) {
  std::string s;
  for (auto v : ids) s += le(v, width);
  return s;
}

std::vector<int> read_all(const TokenFile& f, std::uint64_t first, std::size_t n) {
  std::vector<int> v(n);
  f.read(first, n, v.data());
  return v;
}

/// Runs `f`, expects examoe::Error whose message contains every needle.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles, const std::string& what) {
  SCOPED_TRACE(what);
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const examoe::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("examoe::", 0), 0u) << "message should start with the function: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

// ---- formats -------------------------------------------------------------------------

TEST(TokenData, FormatSpellingsAndDetection) {
  for (auto f : {TokenFormat::bytes, TokenFormat::llmc, TokenFormat::uint16, TokenFormat::hdf5, TokenFormat::automatic})
    EXPECT_EQ(token_format_from_string(to_string(f)), f);
  EXPECT_EQ(to_string(TokenFormat::automatic), "auto");
  expect_error([] { token_format_from_string("npy"); }, {"unknown data.format 'npy'", "bytes, llmc, uint16, hdf5 or auto"},
               "bad spelling");

  TempPath llmc("d.bin"), raw("r.bin"), h5sig("sig.dat"), short4("s.bin"), dir("dir");
  write_bytes(llmc.path(), llmc_header(20240520, 1, 1) + le(7, 2));
  write_bytes(raw.path(), tokens_le({1, 2, 3}, 2));
  write_bytes(h5sig.path(), std::string("\x89HDF\r\n\x1a\n", 8) + "rest");
  write_bytes(short4.path(), "ab");
  make_directory(dir.path());
  EXPECT_EQ(detect_token_format(llmc.path()), TokenFormat::llmc);
  EXPECT_EQ(detect_token_format(raw.path()), TokenFormat::bytes) << "headerless uint16 cannot be told from bytes";
  EXPECT_EQ(detect_token_format(h5sig.path()), TokenFormat::hdf5);
  EXPECT_EQ(detect_token_format(short4.path()), TokenFormat::bytes);
  EXPECT_EQ(detect_token_format("/nonexistent/x.H5"), TokenFormat::hdf5) << "by the name, case-insensitive";
  EXPECT_EQ(detect_token_format("/nonexistent/x.hdf5"), TokenFormat::hdf5);
  EXPECT_EQ(detect_token_format("/nonexistent/x.bin"), TokenFormat::bytes) << "its reader names the problem";
  EXPECT_EQ(detect_token_format(dir.path()), TokenFormat::bytes);
  EXPECT_EQ(detect_token_format("/dev/zero"), TokenFormat::bytes) << "a device is never read";
}

// ---- llm.c files ---------------------------------------------------------------------

TEST(TokenData, LlmcVersion1ExactTokens) {
  TempPath p("v1.bin");
  std::vector<std::uint64_t> ids;
  for (int i = 0; i < 3000; ++i) ids.push_back((static_cast<std::uint64_t>(i) * 40503u + 11u) % 65536u);
  ids[5] = 65535;  // the largest uint16: read unsigned
  ids[6] = 50256;  // GPT-2's <|endoftext|>
  write_bytes(p.path(), llmc_header(20240520, 1, 3000) + tokens_le(ids, 2));
  const auto f = open_token_file(p.path(), TokenFormat::automatic);
  EXPECT_EQ(f->format(), TokenFormat::llmc);
  EXPECT_EQ(f->size(), 3000u);
  EXPECT_EQ(f->describe(), "llm.c token file version 1, uint16 ids");
  EXPECT_EQ(f->where(6), "token 6 (byte offset 1036)");
  EXPECT_EQ(read_all(*f, 0, 3), (std::vector<int>{11, 40514, 15481}));  // (40503 i + 11) mod 65536
  EXPECT_EQ(read_all(*f, 5, 2), (std::vector<int>{65535, 50256}));
  EXPECT_EQ(read_all(*f, 2999, 1), (std::vector<int>{static_cast<int>(ids[2999])}));
  // The scan (pread in chunks, not the mapping) sees the same ids.
  std::vector<std::int64_t> counts(65536, 0);
  EXPECT_FALSE(f->scan(0, 3000, 65536, &counts).found);
  EXPECT_EQ(counts[65535], 1);
  EXPECT_EQ(counts[11], 1);
  const BadToken bad = f->scan(0, 3000, 65535, nullptr);
  EXPECT_TRUE(bad.found);
  EXPECT_EQ(bad.index, 5u);
  EXPECT_EQ(bad.value, "65535");
  EXPECT_FALSE(f->scan(6, 3000, 65535, nullptr).found) << "the range [6, 3000) holds no 65535 but " << ids[6];
  expect_error([&] { read_all(*f, 2999, 2); }, {"tokens [2999, 3001) outside the 3000 tokens"}, "read past the end");
}

TEST(TokenData, LlmcVersion2Uint32ExactTokens) {
  TempPath p("v2.bin");
  const std::vector<std::uint64_t> ids = {0, 70000, 128255, 16777215, 3};
  write_bytes(p.path(), llmc_header(20240520, 2, 5) + tokens_le(ids, 4));
  const auto f = open_token_file(p.path(), TokenFormat::llmc);
  EXPECT_EQ(f->size(), 5u);
  EXPECT_EQ(f->describe(), "llm.c token file version 2, uint32 ids");
  EXPECT_EQ(read_all(*f, 0, 5), (std::vector<int>{0, 70000, 128255, 16777215, 3}));
  EXPECT_EQ(f->where(2), "token 2 (byte offset 1032)");
  const BadToken bad = f->scan(0, 5, 128256, nullptr);  // Llama 3's vocabulary
  EXPECT_TRUE(bad.found);
  EXPECT_EQ(bad.index, 3u);
  EXPECT_EQ(bad.value, "16777215");
}

TEST(TokenData, LlmcBadHeadersNameTheProblem) {
  TempPath p("bad.bin");
  const std::string F = "'" + p.path() + "'";
  auto open = [&](const std::string& content, TokenFormat fmt = TokenFormat::llmc) {
    write_bytes(p.path(), content);
    return [&, fmt] { open_token_file(p.path(), fmt); };
  };
  expect_error(open(std::string(1000, 'x')), {"examoe::open_token_file: " + F + " has 1000 bytes, fewer than llm.c's header of 256 int32 (1024 bytes)"}, "short");
  expect_error(open(llmc_header(20240521, 1, 1) + "ab"),
               {F + " does not start with llm.c's magic 20240520 (its first int32 is 20240521)", "data.format uint16"}, "magic");
  expect_error(open(llmc_header(20240520, 3, 1) + "ab"),
               {F + " is an llm.c token file of version 3 (header[1])", "1 (uint16 tokens) and 2 (uint32 tokens)"}, "version");
  expect_error(open(llmc_header(20240520, 1, 0)), {F + " records 0 tokens (header[2])"}, "no tokens");
  expect_error(open(llmc_header(20240520, 1, -4) + "ab"), {F + " records -4 tokens"}, "negative count");
  expect_error(open(llmc_header(20240520, 1, 100) + std::string(198, '\0')),
               {F + " records 100 tokens (header[2]) of 2 bytes, 200 bytes after its 1024-byte header, but holds 198 bytes after it: the file is truncated"},
               "truncated");
  expect_error(open(llmc_header(20240520, 1, 2) + std::string(6, '\0')),
               {"records 2 tokens (header[2]) of 2 bytes, 4 bytes after", "holds 6 bytes after it: it has data after its last token"},
               "trailing data");
  expect_error(open(llmc_header(20240520, 2, 2) + std::string(4, '\0')), {"of 4 bytes, 8 bytes after", "truncated"},
               "version 2 truncated");
  // Auto sees the magic, so a bad llm.c header is an error, not a byte file.
  expect_error(open(llmc_header(20240520, 7, 1) + "ab", TokenFormat::automatic), {"version 7"}, "auto, bad version");
}

// ---- headerless uint16 and byte files --------------------------------------------------

TEST(TokenData, Uint16AndBytesExactTokens) {
  TempPath p("raw.bin");
  const std::vector<std::uint64_t> ids = {258, 0, 65535, 1, 50256, 772};
  write_bytes(p.path(), tokens_le(ids, 2));
  const auto u = open_token_file(p.path(), TokenFormat::uint16);
  EXPECT_EQ(u->size(), 6u);
  EXPECT_EQ(u->describe(), "headerless uint16 token file");
  EXPECT_EQ(read_all(*u, 0, 6), (std::vector<int>{258, 0, 65535, 1, 50256, 772}));
  EXPECT_EQ(u->where(4), "token 4 (byte offset 8)");
  // The same 12 bytes as bytes: 258 = 0x0102 is stored 02 01.
  const auto b = open_token_file(p.path(), TokenFormat::bytes);
  EXPECT_EQ(b->size(), 12u);
  EXPECT_EQ(read_all(*b, 0, 4), (std::vector<int>{2, 1, 0, 0}));
  EXPECT_EQ(b->where(9), "byte offset 9");
  const BadToken bad = b->scan(0, 12, 200, nullptr);
  EXPECT_TRUE(bad.found);
  EXPECT_EQ(bad.index, 4u);  // 65535 = ff ff
  EXPECT_EQ(bad.value, "255");
}

TEST(TokenData, BadFilesNameTheProblem) {
  TempPath odd("odd.bin"), llmc("l.bin"), empty("e.bin"), dir("d");
  write_bytes(odd.path(), "abc");
  write_bytes(llmc.path(), llmc_header(20240520, 1, 1) + "ab");
  write_bytes(empty.path(), "");
  make_directory(dir.path());
  expect_error([&] { open_token_file(odd.path(), TokenFormat::uint16); },
               {"examoe::open_token_file: '" + odd.path() + "' has 3 bytes, an odd number: a uint16 token file holds 2 bytes per token"},
               "odd size");
  expect_error([&] { open_token_file(llmc.path(), TokenFormat::uint16); },
               {"starts with llm.c's magic 20240520: it is an llm.c token file", "use data.format llmc"}, "llm.c as uint16");
  expect_error([&] { open_token_file(empty.path(), TokenFormat::uint16); }, {"'" + empty.path() + "' is empty"}, "empty");
  expect_error([&] { open_token_file(empty.path(), TokenFormat::llmc); }, {"is empty"}, "empty llmc");
  expect_error([&] { open_token_file("/nonexistent/t.bin", TokenFormat::llmc); },
               {"cannot open '/nonexistent/t.bin'", std::strerror(ENOENT)}, "missing");
  expect_error([&] { open_token_file(dir.path(), TokenFormat::uint16, "", "data.val_path"); },
               {"is a directory, not a regular file (data.val_path must name a file)"}, "directory");
  expect_error([&] { open_token_file("/dev/zero", TokenFormat::uint16); }, {"is a character device"}, "device");
  expect_error([&] { open_token_file(llmc.path(), TokenFormat::llmc, "ids"); },
               {"data.dataset ('ids') names a dataset of an HDF5 file", "is read as llmc"}, "dataset for llmc");
}

// ---- HDF5 ------------------------------------------------------------------------------

#if EXAMOE_ENABLE_HDF5
/// Writes `n` values of native type `mem` as file type `file_type` in dataset `name` (rank 1,
/// or `dims` when given) of `path` (appended to when it exists).
void write_h5(const std::string& path, const char* name, hid_t file_type, hid_t mem, const void* data,
              std::vector<hsize_t> dims) {
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank() == 0) {
    hid_t f = fs::exists(path) ? H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT)
                               : H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
    hid_t d = H5Dcreate2(f, name, file_type, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t n = 1;
    for (auto x : dims) n *= x;
    EXPECT_TRUE(f >= 0 && d >= 0 && (n == 0 || H5Dwrite(d, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0)) << name;
    H5Dclose(d);
    H5Sclose(sp);
    H5Pclose(lcpl);
    H5Fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(TokenData, Hdf5DatasetsOfEveryIntegerType) {
  TempPath p("ids.h5");
  const std::vector<std::int64_t> v = {5, 0, 127, 3, 99, 42};
  const std::vector<std::uint64_t> big = {7, 1, 1099511627841ull, 18446744073709551615ull};
  const std::vector<std::int64_t> neg = {1, 2, -3, 4};
  write_h5(p.path(), "i8", H5T_STD_I8LE, H5T_NATIVE_LLONG, v.data(), {6});
  write_h5(p.path(), "u16", H5T_STD_U16BE, H5T_NATIVE_LLONG, v.data(), {6});  // big-endian on disk
  write_h5(p.path(), "tokens", H5T_STD_I32LE, H5T_NATIVE_LLONG, v.data(), {6});
  write_h5(p.path(), "deep/u32", H5T_STD_U32LE, H5T_NATIVE_LLONG, v.data(), {6});
  write_h5(p.path(), "u64", H5T_STD_U64LE, H5T_NATIVE_ULLONG, big.data(), {4});
  write_h5(p.path(), "i64", H5T_STD_I64LE, H5T_NATIVE_LLONG, neg.data(), {4});
  for (const char* name : {"i8", "u16", "deep/u32", "tokens"}) {
    SCOPED_TRACE(name);
    const auto f = open_token_file(p.path(), TokenFormat::automatic, std::string(name) == "tokens" ? "" : name);
    EXPECT_EQ(f->format(), TokenFormat::hdf5);
    EXPECT_EQ(f->size(), 6u);
    EXPECT_EQ(read_all(*f, 0, 6), (std::vector<int>{5, 0, 127, 3, 99, 42}));
    EXPECT_EQ(read_all(*f, 2, 3), (std::vector<int>{127, 3, 99}));
    std::vector<std::int64_t> counts(128, 0);
    EXPECT_FALSE(f->scan(0, 6, 128, &counts).found);
    EXPECT_EQ(counts[127] + counts[42] + counts[5], 3);
    const BadToken bad = f->scan(1, 6, 100, nullptr);
    EXPECT_TRUE(bad.found);
    EXPECT_EQ(bad.index, 2u);
    EXPECT_EQ(bad.value, "127");
  }
  const auto t = open_token_file(p.path(), TokenFormat::hdf5);
  EXPECT_EQ(t->describe(), "HDF5 dataset 'tokens' (32-bit signed integers)");
  EXPECT_EQ(t->where(4), "tokens[4]");
  // 64-bit ids are reported as stored, not clipped: 2^40+65 and 2^64-1; a negative one.
  const auto u = open_token_file(p.path(), TokenFormat::hdf5, "u64");
  EXPECT_EQ(u->describe(), "HDF5 dataset 'u64' (64-bit unsigned integers)");
  BadToken bad = u->scan(0, 4, 1000, nullptr);
  EXPECT_EQ(bad.index, 2u);
  EXPECT_EQ(bad.value, "1099511627841");
  EXPECT_EQ(u->scan(3, 4, 1000, nullptr).value, "18446744073709551615");
  bad = open_token_file(p.path(), TokenFormat::hdf5, "i64")->scan(0, 4, 1000, nullptr);
  EXPECT_EQ(bad.index, 2u);
  EXPECT_EQ(bad.value, "-3");
}

TEST(TokenData, Hdf5BadInputsNameTheProblem) {
  TempPath p("bad.h5"), notb("not.h5");
  const std::string F = "'" + p.path() + "'";
  const std::vector<double> fl = {1.5, 2.5};
  const std::vector<std::int64_t> two = {1, 2, 3, 4, 5, 6};
  write_h5(p.path(), "floats", H5T_IEEE_F32LE, H5T_NATIVE_DOUBLE, fl.data(), {2});
  write_h5(p.path(), "matrix", H5T_STD_I32LE, H5T_NATIVE_LLONG, two.data(), {2, 3});
  write_h5(p.path(), "none", H5T_STD_I32LE, H5T_NATIVE_LLONG, two.data(), {0});
  write_h5(p.path(), "grp/x", H5T_STD_I32LE, H5T_NATIVE_LLONG, two.data(), {6});
  write_bytes(notb.path(), "not an HDF5 file");
  auto open = [&](const std::string& ds) { return [&, ds] { open_token_file(p.path(), TokenFormat::hdf5, ds); }; };
  expect_error(open(""), {"examoe::open_token_file: " + F + " has no dataset 'tokens' (the default when data.dataset is empty); its top level holds 'floats', 'grp', 'matrix', 'none'"}, "default missing");
  expect_error(open("ids"), {F + " has no dataset 'ids'; its top level holds", "name the dataset of token ids with data.dataset"}, "missing");
  expect_error(open("grp/nope"), {"has no dataset 'grp/nope'"}, "missing nested");
  expect_error(open("grp"), {"'grp' in " + F + " is not a dataset"}, "a group");
  expect_error(open("floats"), {"dataset 'floats' of " + F + " holds floating-point numbers; token ids must be an HDF5 integer type"}, "floats");
  expect_error(open("matrix"), {"dataset 'matrix' of " + F + " is 2-D [2][3]; token ids must be a 1-D dataset"}, "2-D");
  expect_error(open("none"), {"dataset 'none' of " + F + " holds no tokens"}, "empty dataset");
  expect_error([&] { open_token_file(notb.path(), TokenFormat::automatic); }, {"cannot open '" + notb.path() + "' as HDF5"}, "not HDF5");
  expect_error([&] { open_token_file("/dev/null", TokenFormat::hdf5); }, {"is a character device"}, "device, never opened by HDF5");
}
#endif

// ---- TokenCorpus ----------------------------------------------------------------------

/// A uint16 file whose token i is (i * 7) mod 1000: every window can be checked by hand.
std::shared_ptr<const TokenFile> ramp_file(const TempPath& p, std::uint64_t n) {
  std::vector<std::uint64_t> ids;
  for (std::uint64_t i = 0; i < n; ++i) ids.push_back(i * 7 % 1000);
  write_bytes(p.path(), tokens_le(ids, 2));
  return open_token_file(p.path(), TokenFormat::uint16);
}
int ramp(std::uint64_t i) { return static_cast<int>(i * 7 % 1000); }

TEST(TokenData, CorpusWindowsAreTheFilesTokens) {
  TempPath p("ramp.bin");
  const int L = 16;
  TokenCorpus c(ramp_file(p, 5000), nullptr, 3, 0.1);
  EXPECT_EQ(c.train_tokens(), 4500u);
  EXPECT_EQ(c.val_tokens(), 500u);
  c.check(L);
  Batch b;
  c.train_batch(9, 0, 8, L, b);
  for (int r = 0; r < 8; ++r) {
    const std::uint64_t off = c.train_offset(9, r, L);
    EXPECT_LE(off + L, 4499u) << "the window's last target is a training token";
    for (int j = 0; j < L; ++j) {
      EXPECT_EQ(b.tokens[r * L + j], ramp(off + j));
      EXPECT_EQ(b.targets[r * L + j], ramp(off + j + 1));
    }
  }
  // Counter-based: a split of the batch is the same rows.
  Batch x, y;
  c.train_batch(9, 0, 3, L, x);
  c.train_batch(9, 3, 5, L, y);
  x.tokens.insert(x.tokens.end(), y.tokens.begin(), y.tokens.end());
  EXPECT_EQ(x.tokens, b.tokens);
  // Validation: consecutive windows from token 4500, (500 - 1) / 16 = 31 of them.
  EXPECT_EQ(c.num_val_sequences(L), 31);
  c.val_batch(30, 1, L, b);
  for (int j = 0; j < L; ++j) {
    EXPECT_EQ(b.tokens[j], ramp(4500 + 30 * L + j));
    EXPECT_EQ(b.targets[j], ramp(4500 + 30 * L + j + 1));
  }
  expect_error([&] { c.val_batch(31, 1, L, b); }, {"exceed the 31 validation sequences"}, "past the validation set");
  EXPECT_EQ(TokenCorpus::val_sequences(4500, 500, L), 31);
  EXPECT_EQ(TokenCorpus::val_sequences(4500, 16, L), 0);
  // A cap of 10 spreads the windows: window floor(k * 31 / 10), e.g. k = 9 is window 27.
  TempPath q("ramp2.bin");
  const TokenCorpus capped(ramp_file(q, 5000), nullptr, 3, 0.1, 10);
  EXPECT_EQ(capped.num_val_sequences(L), 10);
  EXPECT_EQ(TokenCorpus::val_sequences(4500, 500, L, 10), 10);
  capped.val_batch(0, 10, L, b);
  for (int k = 0; k < 10; ++k) {
    const std::uint64_t off = 4500 + static_cast<std::uint64_t>(k * 31 / 10) * L;
    EXPECT_EQ(capped.val_offset(k, L), off);
    for (int j = 0; j < L; ++j) EXPECT_EQ(b.tokens[k * L + j], ramp(off + j)) << k;
  }
  EXPECT_EQ(capped.val_offset(9, L), 4500u + 27 * 16);
  // A cap above the windows there are changes nothing.
  const TokenCorpus loose(ramp_file(q, 5000), nullptr, 3, 0.1, 100);
  EXPECT_EQ(loose.num_val_sequences(L), 31);
  EXPECT_EQ(loose.val_offset(30, L), 4500u + 30 * 16);
}

TEST(TokenData, BytesReadInPiecesEqualFileCorpus) {
  // The contract is FileCorpus's: the same bytes give the same batches, read whole or in pieces.
  TempPath p("bytes.bin");
  std::string s(3001, '\0');
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(splitmix64(i) & 0xFF);
  write_bytes(p.path(), s);
  const FileCorpus whole(p.path(), 5, 0.2);
  const TokenCorpus pieces(open_token_file(p.path(), TokenFormat::bytes), nullptr, 5, 0.2);
  EXPECT_EQ(pieces.train_tokens(), whole.train_bytes());
  Batch a, b;
  for (std::uint64_t step : {0u, 1u, 77u}) {
    whole.train_batch(step, 2, 6, 24, a);
    pieces.train_batch(step, 2, 6, 24, b);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_EQ(a.targets, b.targets);
  }
  EXPECT_EQ(whole.num_val_sequences(24), pieces.num_val_sequences(24));
  whole.val_batch(0, whole.num_val_sequences(24), 24, a);
  pieces.val_batch(0, pieces.num_val_sequences(24), 24, b);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.targets, b.targets);
}

TEST(TokenData, SeparateValidationFile) {
  TempPath t("t.bin"), v("v.bin");
  const int L = 8;
  std::vector<std::uint64_t> val_ids;
  for (int i = 0; i < 50; ++i) val_ids.push_back(900 + i);
  write_bytes(v.path(), llmc_header(20240520, 1, 50) + tokens_le(val_ids, 2));
  TokenCorpus c(ramp_file(t, 40), open_token_file(v.path(), TokenFormat::llmc), 1, 0.1);
  EXPECT_EQ(c.train_tokens(), 40u) << "the whole training file trains";
  EXPECT_EQ(c.val_tokens(), 50u);
  EXPECT_EQ(c.num_val_sequences(L), 6);  // (50 - 1) / 8
  Batch b;
  c.val_batch(0, 6, L, b);
  for (int r = 0; r < 6; ++r)
    for (int j = 0; j < L; ++j) {
      EXPECT_EQ(b.tokens[r * L + j], 900 + r * L + j);
      EXPECT_EQ(b.targets[r * L + j], 901 + r * L + j);
    }
  // Window starts cover [0, 40 - 8 - 1]: the last training token is a target.
  std::uint64_t hi = 0;
  for (std::uint64_t s = 0; s < 2000; ++s) hi = std::max(hi, c.train_offset(s, 0, L));
  EXPECT_EQ(hi, 31u);
  expect_error([&] { c.check(40); },
               {"examoe::TokenCorpus::check: the training file '" + t.path() + "' holds 40 tokens and the validation file '" +
                    v.path() + "' 50, too few for seq_len 40; each part needs at least seq_len+1 = 41 tokens"},
               "too short");
}

TEST(TokenData, TooFewTokens) {
  TempPath p("few.bin");
  TokenCorpus c(ramp_file(p, 40), nullptr, 1, 0.5);
  EXPECT_NO_THROW(c.check(19));
  expect_error([&] { c.check(20); },
               {"examoe::TokenCorpus::check: '" + p.path() + "' holds 40 tokens, too few for seq_len 20: its training part "
                "has 20 tokens and its validation part 20 (val_fraction 0.5); each part needs at least seq_len+1 = 21 tokens"},
               "too short");
  expect_error([&] { TokenCorpus bad(ramp_file(p, 40), nullptr, 1, 0.75); }, {"val_fraction (0.75)", "(0, 0.5]"},
               "val_fraction");
}

// ---- the id check over the ranks --------------------------------------------------------

/// Runs check_vocab on every rank; returns the message (the same on every rank) or "".
std::string check_everywhere(TokenCorpus& c, int vocab) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  try {
    c.check_vocab(*comm, vocab);
  } catch (const examoe::Error& e) {
    return e.what();
  }
  return {};
}

TEST(TokenData, FirstBadIdOnEveryRank) {
  TempPath p("ids.bin");
  std::vector<std::uint64_t> ids(4000, 10);
  ids[3990] = 777;  // late: in the last rank's range
  ids[1234] = 600;  // the first bad id
  ids[2000] = 512;
  write_bytes(p.path(), llmc_header(20240520, 1, 4000) + tokens_le(ids, 2));
  TokenCorpus c(open_token_file(p.path(), TokenFormat::llmc), nullptr, 1, 0.1);
  const std::string msg = check_everywhere(c, 512);
  EXPECT_NE(msg.find("examoe::TokenCorpus::check_vocab: token id 600 at token 1234 (byte offset 3492) of '" + p.path() +
                     "' is outside the vocabulary [0, 512) (model.vocab_size = 512; the first such id)"),
            std::string::npos)
      << msg;
  // Every rank threw (check_everywhere returned a message on each).
  int got = msg.empty() ? 0 : 1, all = 0;
  MPI_Allreduce(&got, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(all, 1);
  // A bad id only in the validation tail (token 3990) is found too.
  TempPath q("tail.bin");
  ids[1234] = ids[2000] = 10;
  write_bytes(q.path(), llmc_header(20240520, 1, 4000) + tokens_le(ids, 2));
  TokenCorpus d(open_token_file(q.path(), TokenFormat::llmc), nullptr, 1, 0.1);
  EXPECT_NE(check_everywhere(d, 512).find("token id 777 at token 3990 (byte offset 9004)"), std::string::npos);
  EXPECT_EQ(check_everywhere(d, 778), "");
}

TEST(TokenData, BadIdInTheValidationFileAndEntropy) {
  TempPath t("t.bin"), v("v.bin");
  // Training ids: 3 x 30, 7 x 30, 9 x 60: entropy -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2.
  std::vector<std::uint64_t> tr;
  for (int i = 0; i < 120; ++i) tr.push_back(i % 4 == 0 ? 3 : i % 4 == 1 ? 7 : 9);
  write_bytes(t.path(), tokens_le(tr, 2));
  std::vector<std::uint64_t> va(40, 1);
  write_bytes(v.path(), tokens_le(va, 2));
  TokenCorpus good(open_token_file(t.path(), TokenFormat::uint16), open_token_file(v.path(), TokenFormat::uint16), 1);
  EXPECT_TRUE(std::isnan(good.unigram_entropy())) << "unknown before the check";
  EXPECT_EQ(check_everywhere(good, 16), "");
  EXPECT_NEAR(good.unigram_entropy(), 1.5 * std::log(2.0), 1e-12) << "the validation file does not count";
  TempPath w("w.bin");
  va[17] = 40000;
  write_bytes(w.path(), tokens_le(va, 2));
  TokenCorpus bad(open_token_file(t.path(), TokenFormat::uint16), open_token_file(w.path(), TokenFormat::uint16), 1);
  EXPECT_NE(check_everywhere(bad, 16).find("token id 40000 at token 17 (byte offset 34) of the validation file '" + w.path() +
                                           "' is outside the vocabulary [0, 16)"),
            std::string::npos);
}

#if EXAMOE_ENABLE_HDF5
TEST(TokenData, NegativeHdf5IdOnEveryRank) {
  TempPath p("neg.h5");
  std::vector<std::int64_t> v(300, 2);
  v[250] = -1;
  write_h5(p.path(), "ids", H5T_STD_I64LE, H5T_NATIVE_LLONG, v.data(), {300});
  TokenCorpus c(open_token_file(p.path(), TokenFormat::automatic, "ids"), nullptr, 1, 0.5);
  EXPECT_NE(check_everywhere(c, 3).find("token id -1 at ids[250] of '" + p.path() + "' is outside the vocabulary [0, 3)"),
            std::string::npos);
}
#endif

}  // namespace
}  // namespace examoe::test
