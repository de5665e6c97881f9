// The I/O unit's helpers (src/io): flat hyperslab selections of rank 1..3 dataspaces,
// attributes and the error prefix of the HDF5 helpers (io/hdf5.hpp), and the one scanner of
// a checkpoint directory (io/checkpoint_dir_scan.hpp). Each rank works in its own files;
// the parallel test writes one dataset from every rank.
#include "test_util.hpp"

#include <examoe/checkpoint_dir.hpp>
#include <examoe/config.hpp>

#include "io/checkpoint_dir_scan.hpp"

#if EXAMOE_ENABLE_HDF5
#include "io/hdf5.hpp"
#endif

#include <fcntl.h>

#include <fstream>
#include <iterator>

namespace {

using examoe::test::world_rank;
using examoe::test::world_size;

/// The suite's tests work in directories of their own, removed after each test once every
/// rank is done with them.
class Hdf5Io : public ::testing::Test {
 protected:
  /// A fresh directory shared by the test's ranks.
  std::string shared_dir(const std::string& tag) {
    dirs_.push_back(examoe::test::make_shared_dir("hdf5io", tag));
    return dirs_.back();
  }
  /// A fresh directory of this rank's own in one shared by the test's ranks.
  std::string rank_dir(const std::string& tag) {
    const std::string d = shared_dir(tag) + "/r" + std::to_string(world_rank());
    ::mkdir(d.c_str(), 0755);
    return d;
  }
  void TearDown() override {
    for (const std::string& d : dirs_) examoe::test::remove_shared_dir(d);
  }

 private:
  std::vector<std::string> dirs_;
};

/// The message of the examoe::Error `f` throws ("" if it throws none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const examoe::Error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

// ------------------------------------------------------------------ the directory scanner

TEST_F(Hdf5Io, DirectoryScannerClassifiesAHandMadeDirectory) {
  using examoe::io::DirEntryKind;
  const std::string dir = rank_dir("scan");
  for (const char* n : {"step-00000003.h5", "step-00000012.h5.tmp", "step-12.h5", "step-0000000x.h5", "examoe.lock",
                        "notes.txt", "step-000000000000000001.h5", "step-0000000000000000001.h5",
                        "step-00000007.h5.tmp.old", "xstep-00000004.h5"})
    std::ofstream(dir + "/" + n) << "x";
  const auto entries = examoe::io::scan_checkpoint_dir(dir);
  struct Want {
    const char* name;
    DirEntryKind kind;
    long long step;
  };
  // Sorted by name (ASCII: '0' < '1' < 'x', 'e' < 'n' < 's' < 'x').
  const Want want[] = {{"examoe.lock", DirEntryKind::lock, -1},
                       {"notes.txt", DirEntryKind::other, -1},
                       {"step-0000000000000000001.h5", DirEntryKind::other, -1},  // 19 digits
                       {"step-000000000000000001.h5", DirEntryKind::checkpoint, 1},  // 18 digits
                       {"step-00000003.h5", DirEntryKind::checkpoint, 3},
                       {"step-00000007.h5.tmp.old", DirEntryKind::other, -1},
                       {"step-0000000x.h5", DirEntryKind::other, -1},
                       {"step-00000012.h5.tmp", DirEntryKind::temporary, 12},
                       {"step-12.h5", DirEntryKind::other, -1},  // fewer than 8 digits
                       {"xstep-00000004.h5", DirEntryKind::other, -1}};
  ASSERT_EQ(entries.size(), std::size(want));
  for (std::size_t i = 0; i < entries.size(); ++i) {
    EXPECT_EQ(entries[i].name, want[i].name) << i;
    EXPECT_EQ(entries[i].kind, want[i].kind) << entries[i].name;
    EXPECT_EQ(entries[i].step, want[i].step) << entries[i].name;
  }
  // The callers see the same classification.
  const auto cks = examoe::list_checkpoints(dir);
  ASSERT_EQ(cks.size(), 2u);
  EXPECT_EQ(cks[0], std::make_pair(3LL, dir + "/step-00000003.h5"));
  EXPECT_EQ(cks[1], std::make_pair(1LL, dir + "/step-000000000000000001.h5"));
  EXPECT_EQ(examoe::latest_checkpoint(dir), dir + "/step-00000003.h5");
  const auto inc = examoe::remove_incomplete_checkpoints(dir, false, "read-only");
  ASSERT_EQ(inc.kept.size(), 1u);
  EXPECT_EQ(inc.kept[0].first, dir + "/step-00000012.h5.tmp");
  EXPECT_TRUE(inc.removed.empty());
  // A directory that cannot be read holds nothing.
  EXPECT_TRUE(examoe::io::scan_checkpoint_dir(dir + "/missing").empty());
  EXPECT_EQ(examoe::io::classify_dir_entry("step-99999999.h5.tmp").step, 99999999);
}

#if EXAMOE_ENABLE_HDF5

namespace {

using examoe::io::Hid;

/// A new file `path` with dataset "d" (doubles, shape `dims`) holding value i at flat index i.
void write_iota_file(const std::string& path, const std::vector<hsize_t>& dims) {
  Hid f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  ASSERT_TRUE(f.ok());
  Hid sp(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid ds(H5Dcreate2(f, "d", H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  hsize_t n = 1;
  for (auto d : dims) n *= d;
  std::vector<double> v(n);
  for (hsize_t i = 0; i < n; ++i) v[i] = static_cast<double>(i);
  ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
}

/// The elements of dataset "d" of `path` that the union of `ranges` selects, in file order.
std::vector<double> read_ranges(const std::string& path, const std::vector<hsize_t>& dims,
                                const std::vector<std::pair<hsize_t, hsize_t>>& ranges) {
  Hid f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  Hid ds(H5Dopen2(f, "d", H5P_DEFAULT), H5Dclose);
  Hid fs(H5Dget_space(ds), H5Sclose);
  H5Sselect_none(fs);
  bool first = true;
  hsize_t total = 0;
  for (const auto& r : ranges) {
    examoe::io::add_flat_range(fs, dims, r.first, r.second, first);
    total += r.second > r.first ? r.second - r.first : 0;
  }
  EXPECT_EQ(static_cast<hsize_t>(H5Sget_select_npoints(fs)), total);
  std::vector<double> out(total);
  if (total == 0) return out;
  Hid ms(H5Screate_simple(1, &total, nullptr), H5Sclose);
  EXPECT_GE(H5Dread(ds, H5T_NATIVE_DOUBLE, ms, fs, H5P_DEFAULT, out.data()), 0);
  return out;
}

}  // namespace

TEST_F(Hdf5Io, FlatRangesSelectExactlyTheirElements) {
  const std::string dir = rank_dir("ranges");
  using V = std::vector<double>;
  // Rank 1: [3, 8) of 10.
  write_iota_file(dir + "/r1.h5", {10});
  EXPECT_EQ(read_ranges(dir + "/r1.h5", {10}, {{3, 8}}), (V{3, 4, 5, 6, 7}));
  // Rank 2, [4][5]: a partial row, a full row and a partial row: [3, 12).
  write_iota_file(dir + "/r2.h5", {4, 5});
  EXPECT_EQ(read_ranges(dir + "/r2.h5", {4, 5}, {{3, 12}}), (V{3, 4, 5, 6, 7, 8, 9, 10, 11}));
  // Full rows only, and two disjoint ranges: [5, 15) and [17, 19).
  EXPECT_EQ(read_ranges(dir + "/r2.h5", {4, 5}, {{5, 15}, {17, 19}}),
            (V{5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 18}));
  // Rank 3, [2][3][4]: [3, 6) ends a row; [10, 21) crosses the block boundary at 12 (the
  // rows of dims[0] = 0 end there) and ends inside the last row.
  write_iota_file(dir + "/r3.h5", {2, 3, 4});
  EXPECT_EQ(read_ranges(dir + "/r3.h5", {2, 3, 4}, {{3, 6}, {10, 21}}),
            (V{3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}));
  // All of it, and an empty range (selects nothing).
  V all(24);
  for (int i = 0; i < 24; ++i) all[i] = i;
  EXPECT_EQ(read_ranges(dir + "/r3.h5", {2, 3, 4}, {{0, 24}}), all);
  EXPECT_EQ(read_ranges(dir + "/r3.h5", {2, 3, 4}, {{7, 7}}), V{});
  // select_flat_range replaces an earlier selection.
  Hid sp(H5Screate_simple(3, std::vector<hsize_t>{2, 3, 4}.data(), nullptr), H5Sclose);
  examoe::io::select_flat_range(sp, {2, 3, 4}, 0, 24);
  examoe::io::select_flat_range(sp, {2, 3, 4}, 11, 13);
  EXPECT_EQ(H5Sget_select_npoints(sp), 2);
}

// Every rank writes its flat share of one [3][4][5] dataset through select_flat_range
// (independent MPI-IO, as the checkpoint writes); rank 0 reads it back whole.
TEST_F(Hdf5Io, RanksWriteTheirFlatSharesOfOneDataset) {
  const std::string path = shared_dir("shares") + "/shares.h5";
  const std::vector<hsize_t> dims{3, 4, 5};
  const hsize_t n = 60, P = static_cast<hsize_t>(world_size()), r = static_cast<hsize_t>(world_rank());
  const hsize_t lo = n * r / P, hi = n * (r + 1) / P;
  {
    Hid fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    H5Pset_fapl_mpio(fapl, MPI_COMM_WORLD, MPI_INFO_NULL);
    Hid f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
    ASSERT_TRUE(f.ok());
    Hid sp(H5Screate_simple(3, dims.data(), nullptr), H5Sclose);
    Hid ds(H5Dcreate2(f, "d", H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
    Hid fs(H5Scopy(sp), H5Sclose);
    examoe::io::select_flat_range(fs, dims, lo, hi);
    std::vector<double> mine;
    for (hsize_t i = lo; i < hi; ++i) mine.push_back(1000.0 + static_cast<double>(i));
    const hsize_t cnt = std::max<hsize_t>(hi - lo, 1);
    Hid ms(H5Screate_simple(1, &cnt, nullptr), H5Sclose);
    if (hi == lo) H5Sselect_none(ms);
    examoe::io::Transfer t(false);
    EXPECT_GE(H5Dwrite(ds, H5T_NATIVE_DOUBLE, ms, fs, t.dxpl, mine.empty() ? nullptr : mine.data()), 0);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {
    Hid f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
    Hid ds(H5Dopen2(f, "d", H5P_DEFAULT), H5Dclose);
    std::vector<double> got(n, -1);
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, got.data()), 0);
    for (hsize_t i = 0; i < n; ++i) EXPECT_EQ(got[i], 1000.0 + static_cast<double>(i)) << "element " << i;
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_F(Hdf5Io, AttributesRoundTrip) {
  const std::string path = rank_dir("attrs") + "/a.h5";
  Hid f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  ASSERT_TRUE(f.ok());
  examoe::io::write_attr_string(f, "text", "float");
  examoe::io::write_attr_string(f, "empty", "");
  examoe::io::write_attr<long long>(f, "step", 1234567890123LL, H5T_NATIVE_LLONG);
  examoe::io::write_attr<double>(f, "half", 0.5, H5T_NATIVE_DOUBLE);
  {  // A variable-length string, as h5py writes it.
    Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(type, H5T_VARIABLE);
    Hid space(H5Screate(H5S_SCALAR), H5Sclose);
    Hid a(H5Acreate2(f, "vlen", type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const char* v = "[{\"step\": 3}]";
    ASSERT_GE(H5Awrite(a, type, &v), 0);
  }
  Hid g = examoe::io::make_group(f, "config");
  examoe::io::write_attr_string(g, "model.d_model", "16");
  g.reset();
  f.reset();
  Hid r(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  EXPECT_EQ(examoe::io::read_attr_string(r, "text"), "float");
  EXPECT_EQ(examoe::io::read_attr_string(r, "empty"), "");
  EXPECT_EQ(examoe::io::read_attr_string(r, "vlen"), "[{\"step\": 3}]");
  EXPECT_EQ(examoe::io::read_attr<long long>(r, "step", H5T_NATIVE_LLONG), 1234567890123LL);
  EXPECT_EQ(examoe::io::read_attr<double>(r, "half", H5T_NATIVE_DOUBLE), 0.5);
  EXPECT_EQ(examoe::io::read_attr<double>(r, "step", H5T_NATIVE_DOUBLE), 1234567890123.0);  // converted
  Hid rg = examoe::io::open_group(r, "config");
  EXPECT_EQ(examoe::io::read_attr_string(rg, "model.d_model"), "16");
}

TEST_F(Hdf5Io, ErrorsNameTheAttributeWithThePrefixInForce) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const std::string path = rank_dir("errors") + "/e.h5";
  Hid f(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  examoe::io::write_attr_string(f, "precision", "double");
  examoe::io::write_attr<int>(f, "ep", 2, H5T_NATIVE_INT);
  {
    Hid space(H5Screate_simple(1, std::vector<hsize_t>{2}.data(), nullptr), H5Sclose);
    Hid a(H5Acreate2(f, "pair", H5T_NATIVE_INT, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    const int v[2] = {1, 2};
    H5Awrite(a, H5T_NATIVE_INT, v);
  }
  // Outside any scope: the helpers' own prefix.
  EXPECT_EQ(error_of([&] { examoe::io::read_attr<int>(f, "nope", H5T_NATIVE_INT); }),
            "examoe::hdf5: attribute 'nope' is missing");
  {
    examoe::io::ErrorPrefix scope("examoe::checkpoint");
    EXPECT_EQ(error_of([&] { examoe::io::read_attr<int>(f, "world_size", H5T_NATIVE_INT); }),
              "examoe::checkpoint: attribute 'world_size' is missing");
    EXPECT_EQ(error_of([&] { examoe::io::read_attr<int>(f, "precision", H5T_NATIVE_INT); }),
              "examoe::checkpoint: attribute 'precision' is not a number");
    EXPECT_EQ(error_of([&] { examoe::io::read_attr_string(f, "ep"); }),
              "examoe::checkpoint: attribute 'ep' is not a string");
    EXPECT_EQ(error_of([&] { examoe::io::read_attr<int>(f, "pair", H5T_NATIVE_INT); }),
              "examoe::checkpoint: attribute 'pair' must hold one value (the file is corrupt)");
    {
      examoe::io::ErrorPrefix inner("examoe eval");
      EXPECT_EQ(error_of([&] { examoe::io::open_dataset(f, "logits"); }), "examoe eval: dataset 'logits' is missing");
    }
    EXPECT_EQ(error_of([&] { examoe::io::open_group(f, "params"); }),
              "examoe::checkpoint: group 'params' is missing");
  }
  EXPECT_STREQ(examoe::io::ErrorPrefix::current(), "examoe::hdf5");
  EXPECT_EQ(error_of([&] { examoe::io::read_attr<int>(f, "ep", H5T_NATIVE_INT); }), "");
}

#endif  // EXAMOE_ENABLE_HDF5
