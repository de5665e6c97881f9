// Token ids in a 1-D integer dataset of an HDF5 file, read by hyperslab (the rows a batch
// needs, 1 MiB chunks for the id check); nothing is loaded whole (docs/data.md).
#include "io/hdf5.hpp"
#include "train/data_util.hpp"
#include "train/token_file.hpp"

#include <examoe/error.hpp>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <sstream>

namespace examoe::impl::data {

namespace {

/// Up to 10 names of the top level of `f`, for the message about a missing dataset.
std::string top_level_names(hid_t f) {
  H5G_info_t info;
  if (H5Gget_info(f, &info) < 0) return "?";
  if (info.nlinks == 0) return "nothing";
  std::string names;
  for (hsize_t i = 0; i < info.nlinks && i < 10; ++i) {
    char name[256] = {0};
    if (H5Lget_name_by_idx(f, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT) < 0) break;
    names += (i ? ", '" : "'") + clip_for_message(name, 60) + "'";
  }
  if (info.nlinks > 10) names += ", ... (" + std::to_string(info.nlinks) + " in all)";
  return names;
}

std::string kind_of(H5T_class_t cls) {
  switch (cls) {
    case H5T_FLOAT: return "floating-point numbers";
    case H5T_STRING: return "strings";
    case H5T_COMPOUND: return "compound values";
    default: return "values that are not integers";
  }
}

class Hdf5TokenFile final : public TokenFile {
 public:
  Hdf5TokenFile(const std::string& path, std::string name, io::Hid file, io::Hid ds, std::uint64_t count)
      : TokenFile(path, TokenFormat::hdf5), name_(std::move(name)), file_(std::move(file)), ds_(std::move(ds)),
        count_(count) {
    const io::Hid type(H5Dget_type(ds_), H5Tclose);
    signed_ = H5Tget_sign(type) != H5T_SGN_NONE;
    bits_ = static_cast<int>(8 * H5Tget_size(type));
  }

  std::uint64_t size() const override { return count_; }

  void read(std::uint64_t first, std::size_t count, int* out) const override {
    read_as(first, count, H5T_NATIVE_INT, out);
  }

  BadToken scan(std::uint64_t first, std::uint64_t last, int vocab, std::vector<std::int64_t>* counts) const override {
    constexpr std::size_t kChunk = (1 << 20) / 8;  // 1 MiB of 64-bit ids per read
    std::vector<long long> s(signed_ ? kChunk : 0);
    std::vector<unsigned long long> u(signed_ ? 0 : kChunk);
    last = std::min(last, count_);
    for (std::uint64_t i = first; i < last;) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(last - i, kChunk));
      // Read as 64-bit values of the stored signedness: no id is clipped before it is checked.
      const BadToken bad = signed_ ? (read_as(i, n, H5T_NATIVE_LLONG, s.data()), check_chunk(s.data(), n, i, vocab, counts))
                                   : (read_as(i, n, H5T_NATIVE_ULLONG, u.data()), check_chunk(u.data(), n, i, vocab, counts));
      if (bad.found) return bad;
      i += n;
    }
    return {};
  }

  std::string describe() const override {
    return "HDF5 dataset '" + clip_for_message(name_, 80) + "' (" + std::to_string(bits_) + "-bit " +
           (signed_ ? "signed" : "unsigned") + " integers)";
  }
  std::string where(std::uint64_t i) const override { return clip_for_message(name_, 80) + "[" + std::to_string(i) + "]"; }

 private:
  void read_as(std::uint64_t first, std::size_t count, hid_t mem_type, void* out) const {
    const io::Hid fs(H5Dget_space(ds_), H5Sclose);
    const hsize_t start = first, n = count;
    const io::Hid ms(H5Screate_simple(1, &n, nullptr), H5Sclose);
    if (count == 0) return;
    if (!fs.ok() || !ms.ok() || H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, nullptr, &n, nullptr) < 0 ||
        H5Dread(ds_, mem_type, ms, fs, H5P_DEFAULT, out) < 0)
      throw Error("examoe::TokenFile::read: cannot read tokens [" + std::to_string(first) + ", " +
                  std::to_string(first + count) + ") of dataset '" + clip_for_message(name_, 80) + "' of '" +
                  clip_for_message(path()) + "'" + io::hdf5_cause());
  }

  std::string name_;
  io::Hid file_, ds_;
  std::uint64_t count_;
  bool signed_ = true;
  int bits_ = 0;
};

}  // namespace

std::unique_ptr<TokenFile> open_hdf5_token_file(const char* fn, const std::string& path, const std::string& dataset,
                                                const char* key) {
  const std::string F = "'" + clip_for_message(path) + "'";
  std::size_t bytes = 0;
  ::close(open_regular_file(fn, path, bytes, key));  // a FIFO or a device is refused before HDF5 opens it
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  io::Hid f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!f.ok())
    throw Error(std::string(fn) + ": cannot open " + F + " as HDF5" + io::hdf5_cause() +
                " (data.format hdf5, or auto for a .h5/.hdf5 name or the HDF5 signature)");
  const std::string name = dataset.empty() ? "tokens" : dataset;
  const std::string D = "dataset '" + clip_for_message(name, 80) + "' of " + F;
  if (H5Lexists(f, name.c_str(), H5P_DEFAULT) <= 0)
    throw Error(std::string(fn) + ": " + F + " has no dataset '" + clip_for_message(name, 80) + "'" +
                (dataset.empty() ? " (the default when data.dataset is empty)" : "") + "; its top level holds " +
                top_level_names(f) + " (name the dataset of token ids with data.dataset)");
  io::Hid ds(H5Dopen2(f, name.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.ok())
    throw Error(std::string(fn) + ": '" + clip_for_message(name, 80) + "' in " + F +
                " is not a dataset (a group?); data.dataset must name a dataset of token ids");
  const io::Hid type(H5Dget_type(ds), H5Tclose), sp(H5Dget_space(ds), H5Sclose);
  const H5T_class_t cls = H5Tget_class(type);
  if (cls != H5T_INTEGER)
    throw Error(std::string(fn) + ": " + D + " holds " + kind_of(cls) +
                "; token ids must be an HDF5 integer type of any width and sign (they are not converted)");
  const int rank = H5Sget_simple_extent_ndims(sp);
  if (rank != 1) {
    std::vector<hsize_t> dims(static_cast<std::size_t>(std::max(rank, 0)));
    if (rank > 0) H5Sget_simple_extent_dims(sp, dims.data(), nullptr);
    std::ostringstream os;
    os << fn << ": " << D << " is " << rank << "-D [";
    for (std::size_t i = 0; i < dims.size(); ++i) os << (i ? "][" : "") << dims[i];
    os << "]; token ids must be a 1-D dataset (the tokens in order)";
    throw Error(os.str());
  }
  hsize_t n = 0;
  H5Sget_simple_extent_dims(sp, &n, nullptr);
  if (n == 0) throw Error(std::string(fn) + ": " + D + " holds no tokens");
  return std::make_unique<Hdf5TokenFile>(path, name, std::move(f), std::move(ds), static_cast<std::uint64_t>(n));
}

}  // namespace examoe::impl::data
