#pragma once
// HDF5 helpers shared by the checkpoints and `examoe eval`: RAII handles, errors that name the
// cause the file system gave, scalar and string attributes, flat hyperslab selections.
// Private to the library (src/); compiled only where ExaMoE_ENABLE_HDF5 is on.
#include <examoe/error.hpp>

#include <hdf5.h>
#include <mpi.h>

#include <string>
#include <type_traits>
#include <vector>

namespace examoe::io {

/// RAII for HDF5 handles.
class Hid {
 public:
  Hid() = default;
  Hid(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  Hid(Hid&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Hid& operator=(Hid&& o) noexcept {
    reset();
    id_ = o.id_;
    close_ = o.close_;
    o.id_ = -1;
    return *this;
  }
  ~Hid() { reset(); }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = -1;
  }
  operator hid_t() const { return id_; }
  bool ok() const { return id_ >= 0; }
  /// Gives up ownership (the caller closes it).
  hid_t release() {
    const hid_t id = id_;
    id_ = -1;
    return id;
  }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

/// The prefix of the errors the helpers below throw, for the scope of one object: the unit
/// that uses them (`io::ErrorPrefix scope("examoe::checkpoint");`). Default "examoe::hdf5".
class ErrorPrefix {
 public:
  explicit ErrorPrefix(const char* prefix);
  ~ErrorPrefix();
  ErrorPrefix(const ErrorPrefix&) = delete;
  ErrorPrefix& operator=(const ErrorPrefix&) = delete;
  static const char* current();

 private:
  const char* previous_;
};

/// Throws examoe::Error "<prefix>: <what>".
[[noreturn]] void fail(const std::string& what);
/// What the file system or MPI-IO said about the HDF5 call that just failed, as ": cause"
/// ("" if nothing recognisable): HDF5 reports "write failed"; the errno text ("No space left
/// on device") is deep in its error stack, in the message of the MPI-IO call.
std::string hdf5_cause();
/// `id`, or fail(what + hdf5_cause()) when the call that returned it failed.
hid_t need(hid_t id, const std::string& what);
/// fail(what + hdf5_cause()) when the call that returned `rc` failed.
void need_ok(herr_t rc, const std::string& what);

template <class S>
hid_t h5type() {
  static_assert(std::is_same<S, float>::value || std::is_same<S, double>::value, "float or double");
  return std::is_same<S, float>::value ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
}

std::vector<hsize_t> dims_of(const std::vector<int>& shape);

void write_attr_string(hid_t obj, const char* name, const std::string& value);
/// Opens attribute `name`, which must hold exactly one value (scalar or one element).
Hid open_single_attr(hid_t obj, const char* name);
/// A fixed- or variable-length (h5py) string attribute.
std::string read_attr_string(hid_t obj, const char* name);

template <class T>
void write_attr(hid_t obj, const char* name, T value, hid_t type) {
  Hid space(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(need(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), std::string("cannot create attribute ") + name),
        H5Aclose);
  need_ok(H5Awrite(a, type, &value), std::string("cannot write attribute ") + name);
}
/// A numeric attribute holding one value, converted to `type`.
template <class T>
T read_attr(hid_t obj, const char* name, hid_t type) {
  Hid a = open_single_attr(obj, name);
  Hid ftype(H5Aget_type(a), H5Tclose);
  const H5T_class_t cls = H5Tget_class(ftype);
  if (cls != H5T_INTEGER && cls != H5T_FLOAT) fail(std::string("attribute '") + name + "' is not a number");
  T v{};
  need_ok(H5Aread(a, type, &v), std::string("cannot read attribute ") + name);
  return v;
}

Hid make_group(hid_t parent, const std::string& name);
/// Group `name` of `parent`: fails "group 'NAME' is missing" or "cannot open group 'NAME'".
Hid open_group(hid_t parent, const std::string& name);
/// Dataset `name` of `parent`: fails "dataset 'NAME' is missing" or "cannot open dataset 'NAME'".
Hid open_dataset(hid_t parent, const std::string& name);

/// Adds the flat (row-major) element range [lo, hi) of a dataspace of rank 1..3 to its
/// selection (`first`: replaces it, and is cleared).
void add_flat_range(hid_t space, const std::vector<hsize_t>& dims, hsize_t lo, hsize_t hi, bool& first);
/// Selects the flat (row-major) element range [lo, hi) of a dataspace of rank 1..3.
void select_flat_range(hid_t space, const std::vector<hsize_t>& dims, hsize_t lo, hsize_t hi);

/// A dataset transfer property list: collective or independent MPI-IO.
struct Transfer {
  Hid dxpl;
  explicit Transfer(bool collective);
};

}  // namespace examoe::io
