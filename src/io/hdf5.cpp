// HDF5 helpers shared by the checkpoints and `examoe eval` (hdf5.hpp).
#include "io/hdf5.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace examoe::io {

namespace {
thread_local const char* g_prefix = "examoe::hdf5";
}  // namespace

ErrorPrefix::ErrorPrefix(const char* prefix) : previous_(g_prefix) { g_prefix = prefix; }
ErrorPrefix::~ErrorPrefix() { g_prefix = previous_; }
const char* ErrorPrefix::current() { return g_prefix; }

void fail(const std::string& what) { throw Error(std::string(g_prefix) + ": " + what); }

namespace {
herr_t collect_desc(unsigned, const H5E_error2_t* e, void* out) {
  if (e && e->desc) *static_cast<std::string*>(out) += std::string(e->desc) + "\n";
  return 0;
}
}  // namespace

/// What the file system or MPI-IO said about the HDF5 call that just failed, as ": cause"
/// ("" if nothing recognisable): HDF5 reports "write failed"; the errno text ("No space left
/// on device") is deep in its error stack, in the message of the MPI-IO call.
std::string hdf5_cause() {
  std::string all;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_desc, &all);
  for (int e : {ENOSPC, EDQUOT, EFBIG, EROFS, EACCES, EPERM, ENOENT, EIO})
    if (all.find(std::strerror(e)) != std::string::npos) return std::string(": ") + std::strerror(e);
  if (all.find("Not enough space") != std::string::npos) return std::string(": ") + std::strerror(ENOSPC);
  if (all.find("Quota") != std::string::npos) return std::string(": ") + std::strerror(EDQUOT);
  return {};
}
hid_t need(hid_t id, const std::string& what) {
  if (id < 0) fail(what + hdf5_cause());
  return id;
}
void need_ok(herr_t rc, const std::string& what) {
  if (rc < 0) fail(what + hdf5_cause());
}

std::vector<hsize_t> dims_of(const std::vector<int>& shape) {
  std::vector<hsize_t> d;
  for (int s : shape) d.push_back(static_cast<hsize_t>(s));
  return d;
}

void write_attr_string(hid_t obj, const char* name, const std::string& value) {
  Hid type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, std::max<std::size_t>(1, value.size()));
  H5Tset_strpad(type, H5T_STR_NULLPAD);
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(need(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), std::string("cannot create attribute ") + name), H5Aclose);
  std::string v = value.empty() ? std::string(1, '\0') : value;
  need_ok(H5Awrite(a, type, v.data()), std::string("cannot write attribute ") + name);
}
/// Opens attribute `name`, which must hold exactly one value (scalar or one element).
Hid open_single_attr(hid_t obj, const char* name) {
  if (H5Aexists(obj, name) <= 0) fail(std::string("attribute '") + name + "' is missing");
  Hid a(need(H5Aopen(obj, name, H5P_DEFAULT), std::string("cannot open attribute ") + name), H5Aclose);
  Hid space(H5Aget_space(a), H5Sclose);
  if (!space.ok() || H5Sget_simple_extent_npoints(space) != 1)
    fail(std::string("attribute '") + name + "' must hold one value (the file is corrupt)");
  return a;
}
std::string read_attr_string(hid_t obj, const char* name) {
  Hid a = open_single_attr(obj, name);
  Hid type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING) fail(std::string("attribute '") + name + "' is not a string");
  if (H5Tis_variable_str(type) > 0) {  // h5py writes variable-length strings
    Hid mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem, H5T_VARIABLE);
    char* p = nullptr;
    need_ok(H5Aread(a, mem, &p), std::string("cannot read attribute ") + name);
    std::string v = p ? std::string(p) : std::string();
    if (p) H5free_memory(p);
    return v;
  }
  const std::size_t n = H5Tget_size(type);
  if (n == 0 || n > (std::size_t(1) << 24)) fail(std::string("attribute '") + name + "' has an implausible size");
  std::string v(n, '\0');
  need_ok(H5Aread(a, type, v.data()), std::string("cannot read attribute ") + name);
  v.erase(std::find(v.begin(), v.end(), '\0'), v.end());
  return v;
}
Hid make_group(hid_t parent, const std::string& name) {
  return Hid(need(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create group " + name), H5Gclose);
}
Hid open_group(hid_t parent, const std::string& name) {
  if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) <= 0) fail("group '" + name + "' is missing");
  return Hid(need(H5Gopen2(parent, name.c_str(), H5P_DEFAULT), "cannot open group '" + name + "'"), H5Gclose);
}
Hid open_dataset(hid_t parent, const std::string& name) {
  if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) <= 0) fail("dataset '" + name + "' is missing");
  return Hid(need(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), "cannot open dataset '" + name + "'"), H5Dclose);
}

/// Selects the flat (row-major) element range [lo, hi) of a dataspace of rank 1..3 as a
/// union of hyperslabs (at most one partial row, one block of full rows, one partial row,
/// applied recursively over leading dimensions for rank 3 by treating it as [n0*n1][n2]).
void add_flat_range(hid_t space, const std::vector<hsize_t>& dims, hsize_t lo, hsize_t hi,
                    bool& first) {
  if (lo >= hi) return;
  const int rank = static_cast<int>(dims.size());
  if (rank == 1) {
    hsize_t start = lo, count = hi - lo;
    H5Sselect_hyperslab(space, first ? H5S_SELECT_SET : H5S_SELECT_OR, &start, nullptr, &count, nullptr);
    first = false;
    return;
  }
  const hsize_t cols = dims.back();
  auto add = [&](hsize_t row, hsize_t c0, hsize_t nrows, hsize_t ncols, bool& first) {  // NOLINT
    // row: a row of the leading dimensions flattened ([n0*n1] for rank 3)
    std::vector<hsize_t> start(rank, 0), count(rank, 1);
    if (rank == 2) {
      start[0] = row;
      count[0] = nrows;
    } else {  // rank 3: split rows over dims[0] x dims[1]; callers pass nrows within one dims[1] block
      start[0] = row / dims[1];
      start[1] = row % dims[1];
      count[1] = nrows;
    }
    start[rank - 1] = c0;
    count[rank - 1] = ncols;
    H5Sselect_hyperslab(space, first ? H5S_SELECT_SET : H5S_SELECT_OR, start.data(), nullptr,
                        count.data(), nullptr);
    first = false;
  };
  hsize_t pos = lo;
  while (pos < hi) {
    const hsize_t row = pos / cols, c0 = pos % cols;
    if (c0 != 0 || hi - pos < cols) {  // partial row
      const hsize_t n = std::min(cols - c0, hi - pos);
      add(row, c0, 1, n, first);
      pos += n;
    } else {  // full rows (for rank 3, within one block of dims[1] rows)
      hsize_t nrows = (hi - pos) / cols;
      if (rank == 3) nrows = std::min(nrows, dims[1] - row % dims[1]);
      add(row, 0, nrows, cols, first);
      pos += nrows * cols;
    }
  }
}
void select_flat_range(hid_t space, const std::vector<hsize_t>& dims, hsize_t lo, hsize_t hi) {
  H5Sselect_none(space);
  bool first = true;
  add_flat_range(space, dims, lo, hi, first);
}

Transfer::Transfer(bool collective) : dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose) {
  H5Pset_dxpl_mpio(dxpl, collective ? H5FD_MPIO_COLLECTIVE : H5FD_MPIO_INDEPENDENT);
}

}  // namespace examoe::io
