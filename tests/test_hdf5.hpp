// HDF5 helpers of the tests: eval inputs written and eval outputs read the way another tool
// would (plain serial HDF5 calls, no ExaMoE code).
#pragma once
#include <examoe/config.hpp>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>

#include <string>
#include <utility>
#include <vector>

namespace examoe::test {

/// Writes int32 datasets [rows][cols] (name, values) to a new file `path` (call on one rank).
inline void write_int_datasets(const std::string& path,
                               const std::vector<std::pair<const char*, const std::vector<int>*>>& sets,
                               int rows, int cols) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hsize_t dims[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(cols)};
  hid_t sp = H5Screate_simple(2, dims, nullptr);
  for (const auto& [name, data] : sets) {
    hid_t ds = H5Dcreate2(f, name, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(ds, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data->data());
    H5Dclose(ds);
  }
  H5Sclose(sp);
  H5Fclose(f);
}

/// The float dataset "logits" of an eval output and its dimensions; empty if unreadable.
inline std::vector<float> read_logits(const std::string& path, std::vector<hsize_t>* dims = nullptr) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return {};
  hid_t ds = H5Dopen2(f, "logits", H5P_DEFAULT);
  hid_t sp = H5Dget_space(ds);
  const int nd = H5Sget_simple_extent_ndims(sp);
  std::vector<hsize_t> d(nd > 0 ? nd : 0);
  if (nd > 0) H5Sget_simple_extent_dims(sp, d.data(), nullptr);
  std::vector<float> v(static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp)));
  if (!v.empty()) H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  H5Sclose(sp);
  H5Dclose(ds);
  H5Fclose(f);
  if (dims) *dims = d;
  return v;
}

}  // namespace examoe::test
#endif
