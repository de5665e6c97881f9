// libFuzzer target: the checkpoint readers. Each input becomes a checkpoint file that goes
// through every way ExaMoE reads one: read_checkpoint_info (inspect), eval_file (a model
// built from the file's own config), and train() resuming from it with a fixed config. The
// only allowed failure is examoe::Error; any other exception, a crash, a hang or a sanitizer
// report is a finding.
//
// Two kinds of input:
// - raw bytes: written as the file as they are (the seed corpus holds a small valid
//   checkpoint, so mutations are damaged checkpoints: flipped bits, cut or spliced files,
//   edited headers). These must all be refused before HDF5 parses anything.
// - "EXAMOE-EDIT\n" + a program of edits applied through HDF5 to a pristine checkpoint made
//   at start-up, which is then sealed again (a valid file whose contents are wrong: values,
//   shapes, types, missing objects, strings), the way a tool that edits a checkpoint with
//   h5py and re-seals it could produce. This drives the checks after the checksum.
// The harness pins train.memory_limit to 256MiB in edited files (the memory check then refuses
// models bigger than the fuzzer's memory, as it would on a small machine).
#include "common.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/train.hpp>

#include <hdf5.h>
#include <mpi.h>
#include <unistd.h>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::string g_dir, g_input, g_pristine_path;
std::vector<char> g_pristine;

void write_bytes(const std::string& p, const char* d, std::size_t n) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(d, static_cast<std::streamsize>(n));
}

// ---------------------------------------------------------------- edit programs

struct Reader {
  const std::uint8_t* p;
  std::size_t n, i = 0;
  bool more() const { return i < n; }
  std::uint8_t byte() { return i < n ? p[i++] : 0; }
  std::uint16_t u16() { return static_cast<std::uint16_t>(byte() | (byte() << 8)); }
  std::string bytes(std::size_t k) {
    std::string s;
    while (k-- && i < n) s.push_back(static_cast<char>(p[i++]));
    return s;
  }
};

struct Objects {
  std::vector<std::pair<std::string, std::string>> attrs;  // (object path, attribute name)
  std::vector<std::string> datasets, groups;
};

herr_t collect_attr(hid_t, const char* name, const H5A_info_t*, void* op) {
  auto* v = static_cast<std::pair<Objects*, std::string>*>(op);
  v->first->attrs.emplace_back(v->second, name);
  return 0;
}
herr_t collect_obj(hid_t obj, const char* name, const H5O_info_t* info, void* op) {
  auto* o = static_cast<Objects*>(op);
  const std::string path = std::string("/") + (std::strcmp(name, ".") == 0 ? "" : name);
  if (info->type == H5O_TYPE_DATASET) o->datasets.push_back(path);
  if (info->type == H5O_TYPE_GROUP) o->groups.push_back(path);
  std::pair<Objects*, std::string> ctx{o, path};
  hid_t h = H5Oopen(obj, name, H5P_DEFAULT);
  if (h >= 0) {
    hsize_t idx = 0;
    H5Aiterate2(h, H5_INDEX_NAME, H5_ITER_NATIVE, &idx, collect_attr, &ctx);
    H5Oclose(h);
  }
  return 0;
}

Objects list_objects(hid_t f) {
  Objects o;
#if H5_VERSION_GE(1, 12, 0)
  H5Ovisit3(f, H5_INDEX_NAME, H5_ITER_NATIVE, collect_obj, &o, H5O_INFO_BASIC);
#else
  H5Ovisit2(f, H5_INDEX_NAME, H5_ITER_NATIVE, collect_obj, &o, H5O_INFO_BASIC);
#endif
  return o;
}

void set_string_attr(hid_t obj, const char* name, const std::string& v) {
  if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, std::max<std::size_t>(1, v.size()));
  H5Tset_strpad(t, H5T_STR_NULLPAD);
  hid_t sp = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
  const std::string w = v.empty() ? std::string(1, '\0') : v;
  if (a >= 0) {
    H5Awrite(a, t, w.data());
    H5Aclose(a);
  }
  H5Sclose(sp);
  H5Tclose(t);
}

/// Applies the edit program to the open file (every HDF5 call may fail on what an earlier
/// edit left behind; that is fine, the file stays a valid HDF5 file).
void apply_edits(hid_t f, Reader& r) {
  for (int steps = 0; r.more() && steps < 8; ++steps) {
    const Objects o = list_objects(f);
    const int op = r.byte() % 9;
    if (op == 0 && !o.attrs.empty()) {  // overwrite a numeric attribute's bytes
      const auto& [path, name] = o.attrs[r.u16() % o.attrs.size()];
      hid_t obj = H5Oopen(f, path.c_str(), H5P_DEFAULT);
      hid_t a = H5Aopen(obj, name.c_str(), H5P_DEFAULT);
      hid_t t = H5Aget_type(a);
      hid_t sp = H5Aget_space(a);
      const hssize_t npts = H5Sget_simple_extent_npoints(sp);
      H5Sclose(sp);
      if ((H5Tget_class(t) == H5T_INTEGER || H5Tget_class(t) == H5T_FLOAT) && npts > 0 && npts < 64) {
        const std::size_t sz = H5Tget_size(t) * static_cast<std::size_t>(npts);
        std::string v = r.bytes(sz);
        v.resize(sz, '\0');
        H5Awrite(a, t, v.data());
      }
      H5Tclose(t);
      H5Aclose(a);
      H5Oclose(obj);
    } else if (op == 1 && !o.attrs.empty()) {  // replace an attribute with a string
      const auto& [path, name] = o.attrs[r.u16() % o.attrs.size()];
      hid_t obj = H5Oopen(f, path.c_str(), H5P_DEFAULT);
      set_string_attr(obj, name.c_str(), r.bytes(r.byte() % 48));
      H5Oclose(obj);
    } else if (op == 2 && !o.attrs.empty()) {  // replace an attribute with an integer or a double
      const auto& [path, name] = o.attrs[r.u16() % o.attrs.size()];
      hid_t obj = H5Oopen(f, path.c_str(), H5P_DEFAULT);
      H5Adelete(obj, name.c_str());
      const bool dbl = r.byte() & 1;
      std::string v = r.bytes(8);
      v.resize(8, '\0');
      hid_t sp = H5Screate(H5S_SCALAR);
      hid_t a = H5Acreate2(obj, name.c_str(), dbl ? H5T_NATIVE_DOUBLE : H5T_NATIVE_LLONG, sp, H5P_DEFAULT, H5P_DEFAULT);
      if (a >= 0) {
        H5Awrite(a, dbl ? H5T_NATIVE_DOUBLE : H5T_NATIVE_LLONG, v.data());
        H5Aclose(a);
      }
      H5Sclose(sp);
      H5Oclose(obj);
    } else if (op == 3 && !o.datasets.empty()) {  // overwrite some of a dataset's values
      const std::string& path = o.datasets[r.u16() % o.datasets.size()];
      hid_t ds = H5Dopen2(f, path.c_str(), H5P_DEFAULT);
      hid_t t = H5Dget_type(ds);
      hid_t sp = H5Dget_space(ds);
      const hssize_t n = H5Sget_simple_extent_npoints(sp);
      const std::size_t sz = H5Tget_size(t);
      if (n > 0 && sz > 0 && static_cast<std::size_t>(n) * sz < (1u << 24)) {
        std::vector<char> buf(static_cast<std::size_t>(n) * sz);
        if (H5Dread(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()) >= 0) {
          std::size_t at = r.u16() % buf.size();
          const std::string v = r.bytes(1 + r.byte() % 16);
          for (char c : v) buf[at++ % buf.size()] = c;
          H5Dwrite(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data());
        }
      }
      H5Sclose(sp);
      H5Tclose(t);
      H5Dclose(ds);
    } else if (op == 4) {  // delete an attribute, a dataset or a group
      const std::size_t total = o.attrs.size() + o.datasets.size() + o.groups.size();
      if (total == 0) continue;
      std::size_t k = r.u16() % total;
      if (k < o.attrs.size()) {
        hid_t obj = H5Oopen(f, o.attrs[k].first.c_str(), H5P_DEFAULT);
        H5Adelete(obj, o.attrs[k].second.c_str());
        H5Oclose(obj);
      } else {
        k -= o.attrs.size();
        const std::string& path = k < o.datasets.size() ? o.datasets[k] : o.groups[k - o.datasets.size()];
        if (path != "/") H5Ldelete(f, path.c_str(), H5P_DEFAULT);
      }
    } else if (op == 5 && !o.datasets.empty()) {  // replace a dataset by one of another shape/type
      const std::string path = o.datasets[r.u16() % o.datasets.size()];
      H5Ldelete(f, path.c_str(), H5P_DEFAULT);
      const int rank = 1 + r.byte() % 3;
      hsize_t dims[3];
      hsize_t n = 1;
      for (int i = 0; i < rank; ++i) {
        dims[i] = r.byte() % 9;
        n *= dims[i];
      }
      const hid_t types[] = {H5T_NATIVE_DOUBLE, H5T_NATIVE_FLOAT, H5T_NATIVE_INT, H5T_NATIVE_LLONG, H5T_NATIVE_UINT8};
      const hid_t t = types[r.byte() % 5];
      hid_t sp = H5Screate_simple(rank, dims, nullptr);
      hid_t ds = H5Dcreate2(f, path.c_str(), t, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      if (ds >= 0) {
        std::string v = r.bytes(static_cast<std::size_t>(n * H5Tget_size(t)));
        v.resize(static_cast<std::size_t>(n * H5Tget_size(t)), '\0');
        if (n > 0) H5Dwrite(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
        H5Dclose(ds);
      }
      H5Sclose(sp);
    } else if (op == 7 && !o.attrs.empty()) {  // replace an attribute by an array of 1..8 values
      const auto& [path, name] = o.attrs[r.u16() % o.attrs.size()];
      hid_t obj = H5Oopen(f, path.c_str(), H5P_DEFAULT);
      H5Adelete(obj, name.c_str());
      const hsize_t n = 1 + r.byte() % 8;
      const bool str = r.byte() & 1;
      hid_t t = str ? H5Tcopy(H5T_C_S1) : H5Tcopy(H5T_NATIVE_LLONG);
      if (str) H5Tset_size(t, 1 + r.byte() % 16);
      hid_t sp = H5Screate_simple(1, &n, nullptr);
      hid_t a = H5Acreate2(obj, name.c_str(), t, sp, H5P_DEFAULT, H5P_DEFAULT);
      if (a >= 0) {
        std::string v = r.bytes(n * H5Tget_size(t));
        v.resize(n * H5Tget_size(t), '\0');
        H5Awrite(a, t, v.data());
        H5Aclose(a);
      }
      H5Sclose(sp);
      H5Tclose(t);
      H5Oclose(obj);
    } else if (op == 8 && !o.attrs.empty()) {  // replace an attribute by a variable-length string (h5py's default)
      const auto& [path, name] = o.attrs[r.u16() % o.attrs.size()];
      hid_t obj = H5Oopen(f, path.c_str(), H5P_DEFAULT);
      H5Adelete(obj, name.c_str());
      hid_t t = H5Tcopy(H5T_C_S1);
      H5Tset_size(t, H5T_VARIABLE);
      hid_t sp = H5Screate(H5S_SCALAR);
      hid_t a = H5Acreate2(obj, name.c_str(), t, sp, H5P_DEFAULT, H5P_DEFAULT);
      if (a >= 0) {
        const std::string v = r.bytes(r.byte() % 32);
        const char* p = v.c_str();
        H5Awrite(a, t, &p);
        H5Aclose(a);
      }
      H5Sclose(sp);
      H5Tclose(t);
      H5Oclose(obj);
    } else if (op == 6 && !o.groups.empty()) {  // add an attribute with a config key's name
      const auto& keys = examoe::config_keys();
      const std::string& name = keys[r.byte() % keys.size()].name;
      hid_t g = H5Gopen2(f, "/config", H5P_DEFAULT);
      if (g >= 0) {
        set_string_attr(g, name.c_str(), r.bytes(r.byte() % 24));
        H5Gclose(g);
      }
    }
  }
}

// ---------------------------------------------------------------- the readers

void read_every_way(const std::string& path) {
  examoe::CheckpointInfo info;
  try {
    info = examoe::read_checkpoint_info(path, MPI_COMM_SELF);
  } catch (const examoe::Error&) {
    return;  // refused: fine
  }
  try {
    examoe::eval_file(path, g_input, g_dir + "/out.h5", 0, MPI_COMM_SELF, nullptr);
  } catch (const examoe::Error&) {
  }
  try {
    examoe::TrainConfig c = examoe::fuzz::tiny();
    c.checkpoint.resume = path;
    c.checkpoint.dir = g_dir + "/ckpt";
    // One more step than the file's (if small): resumes, trains one step, evaluates.
    c.train.steps = info.step >= 0 && info.step < 100 ? static_cast<int>(info.step) + 1 : 0;
    examoe::train(c, MPI_COMM_SELF, nullptr);
  } catch (const examoe::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  MPI_Init(argc, argv);
  examoe::impl::kc::initialize_if_needed();
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  // Work files under $TMPDIR (dev.sh points it into build-fuzz/, which it cleans: libFuzzer
  // may end the process without running atexit handlers).
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/examoe-fuzz-ckpt.XXXXXX";
  if (!mkdtemp(tmpl.data())) std::abort();
  g_dir = tmpl;
  // The pristine checkpoint: one step of the tiny model.
  examoe::TrainConfig c = examoe::fuzz::tiny();
  c.checkpoint.dir = g_dir + "/seed";
  c.checkpoint.interval = 1;
  examoe::train(c, MPI_COMM_SELF, nullptr);
  g_pristine_path = examoe::checkpoint_path(c.checkpoint.dir, 1);
  std::ifstream in(g_pristine_path, std::ios::binary);
  g_pristine.assign(std::istreambuf_iterator<char>(in), {});
  // An eval input: two sequences of the model's length.
  g_input = g_dir + "/input.h5";
  hid_t f = H5Fcreate(g_input.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hsize_t dims[2] = {2, static_cast<hsize_t>(c.model.seq_len)};
  std::vector<int> tokens(2 * c.model.seq_len, '1');
  hid_t sp = H5Screate_simple(2, dims, nullptr);
  hid_t ds = H5Dcreate2(f, "tokens", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Dwrite(ds, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens.data());
  H5Dclose(ds);
  H5Sclose(sp);
  H5Fclose(f);
  std::atexit([] { std::system(("rm -rf '" + g_dir + "'").c_str()); });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const char kEdit[] = "EXAMOE-EDIT\n";
  const std::string path = g_dir + "/f.h5";
  if (size >= sizeof kEdit - 1 && std::memcmp(data, kEdit, sizeof kEdit - 1) == 0) {
    write_bytes(path, g_pristine.data(), g_pristine.size());
    hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0) std::abort();
    Reader r{data + sizeof kEdit - 1, size - (sizeof kEdit - 1)};
    apply_edits(f, r);
    // The harness' memory budget (see the top).
    hid_t g = H5Gopen2(f, "/config", H5P_DEFAULT);
    if (g >= 0) {
      set_string_attr(g, "train.memory_limit", "256MiB");
      H5Gclose(g);
    }
    H5Fclose(f);
    examoe::seal_checkpoint_file(path, MPI_COMM_SELF);
  } else {
    write_bytes(path, reinterpret_cast<const char*>(data), size);
  }
  read_every_way(path);
  return 0;
}
