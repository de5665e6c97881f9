// Parallel-HDF5 checkpoints: one file, every tensor in global order, readable at any rank
// count (layout: docs/checkpoint-format.md). This file: saving, loading and reading the
// metadata of a checkpoint, the metadata itself and the space a write reserves first. The
// header block and whole-file checksum: checkpoint_file.cpp; the tensors: checkpoint_tensors.cpp.
#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/host_sync.hpp>
#include <examoe/impl/watchdog.hpp>

#if EXAMOE_ENABLE_HDF5
#include "io/checkpoint_file.hpp"
#include "io/checkpoint_tensors.hpp"
#include "io/hdf5.hpp"
#endif

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

namespace examoe {

#if EXAMOE_ENABLE_HDF5

namespace {

using io::fail;
using io::hdf5_cause;
using io::Hid;
using io::make_group;
using io::need;
using io::need_ok;
using io::read_attr;
using io::read_attr_string;
using io::Transfer;
using io::write_attr;
using io::write_attr_string;

/// The message of `e`, naming `path` if it does not yet.
std::string naming(const Error& e, const std::string& path) {
  std::string m = e.what();
  if (m.find("'" + path + "'") != std::string::npos) return m;
  const std::string prefix = "examoe::checkpoint: ";
  if (m.rfind(prefix, 0) == 0) m = m.substr(prefix.size());
  return prefix + "'" + path + "': " + m;
}
/// Runs `fn`, which reads `path`, on every rank and agrees on its outcome: the lowest failing
/// rank's error, naming `path`, is thrown on every rank.
template <class F>
void agree_reading(Communicator& comm, const std::string& path, F&& fn) {
  impl::agree(comm, [&] {
    try {
      fn();
    } catch (const Error& e) {
      throw Error(naming(e, path));
    }
  });
}

Hid open_file_parallel(const std::string& path, MPI_Comm comm, bool create) {
  Hid fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
  // The HDF5 data starts after a user block that seal_checkpoint_file fills with the header.
  Hid fcpl(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
  H5Pset_userblock(fcpl, static_cast<hsize_t>(kCheckpointHeaderBytes));
  hid_t f = create ? H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl, fapl)
                   : H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl);
  return Hid(f, H5Fclose);
}

// ------------------------------------------------------------------ writing
/// /router_bias [L][E]: every layer's selection bias (router.bias_rate > 0), identical on
/// every rank; rank 0 writes it through the selections of write_metadata.
template <class S>
void write_router_bias(hid_t f, Model<S>& model, hid_t sp, hid_t ms, hid_t fs, const Transfer& t) {
  Communicator& comm = model.mesh().world();
  const int L = model.n_layers(), E = model.config().num_experts;
  std::vector<double> b(static_cast<std::size_t>(L) * E);
  for (int l = 0; l < L; ++l)
    std::copy(model.moe(l).router_bias().begin(), model.moe(l).router_bias().end(), b.begin() + static_cast<std::size_t>(l) * E);
  Hid d;
  impl::agree(comm, [&] {
    d = Hid(need(H5Dcreate2(f, "router_bias", H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                 "cannot create router_bias"), H5Dclose);
  });
  const herr_t w = H5Dwrite(d, H5T_NATIVE_DOUBLE, ms, fs, t.dxpl, b.data());
  impl::agree(comm, [&] { need_ok(w, "cannot write router_bias"); });
}

/// The root attributes, the config and the [layers][experts] tables of a checkpoint being
/// written (collective; failures agreed on every rank).
template <class S>
void write_metadata(hid_t f, Model<S>& model, const AdamW<S>& opt, const TrainConfig& cfg, long long step,
                    const std::vector<std::vector<long long>>& tokens_per_expert,
                    const std::string& placement_history_json,
                    const std::vector<std::vector<double>>& expert_load_ema) {
  Mesh& mesh = model.mesh();
  Communicator& comm = mesh.world();
  // Placement and cumulative tokens per expert: [L][E], identical on every rank.
  const int L = model.n_layers(), E = model.config().num_experts;
  std::vector<int> pl(static_cast<std::size_t>(L) * E);
  std::vector<long long> tk(static_cast<std::size_t>(L) * E, 0);
  std::vector<double> ema(static_cast<std::size_t>(L) * E, 0.0);
  for (int l = 0; l < L && l < static_cast<int>(expert_load_ema.size()); ++l)
    for (int e = 0; e < E && e < static_cast<int>(expert_load_ema[l].size()); ++e) ema[l * E + e] = expert_load_ema[l][e];
  for (int l = 0; l < L; ++l)
    for (int e = 0; e < E; ++e) {
      pl[l * E + e] = model.moe(l).placement().owner(e);
      if (l < static_cast<int>(tokens_per_expert.size()) && e < static_cast<int>(tokens_per_expert[l].size()))
        tk[l * E + e] = tokens_per_expert[l][e];
    }
  hsize_t dims[2] = {static_cast<hsize_t>(L), static_cast<hsize_t>(E)};
  Hid sp(H5Screate_simple(2, dims, nullptr), H5Sclose);
  Hid d1, d2, d3;
  // Metadata only (HDF5 caches it): agreed before the collective writes below.
  impl::agree(comm, [&] {
    write_attr<int>(f, "format_version", kCheckpointFormatVersion, H5T_NATIVE_INT);
    write_attr<long long>(f, "step", step, H5T_NATIVE_LLONG);
    write_attr<long long>(f, "adam_step", opt.steps(), H5T_NATIVE_LLONG);
    write_attr_string(f, "precision", std::is_same<S, float>::value ? "float" : "double");
    write_attr<int>(f, "world_size", mesh.world_size(), H5T_NATIVE_INT);
    write_attr<int>(f, "dp", mesh.dp_size(), H5T_NATIVE_INT);
    write_attr<int>(f, "ep", mesh.ep_size(), H5T_NATIVE_INT);
    write_attr_string(f, "producer", "ExaMoE " EXAMOE_VERSION_STRING);
    write_attr_string(f, "placement_history", placement_history_json);
    write_attr<long long>(f, "parameters",
                          static_cast<long long>(model.memory().dense_total_params + model.memory().expert_total_params),
                          H5T_NATIVE_LLONG);
    Hid g = make_group(f, "config");
    for (const auto& k : config_keys())
      if (is_recorded(k, cfg)) write_attr_string(g, k.name.c_str(), k.get(cfg));
    d1 = Hid(need(H5Dcreate2(f, "placement", H5T_NATIVE_INT, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create placement"), H5Dclose);
    d2 = Hid(need(H5Dcreate2(f, "tokens_per_expert", H5T_NATIVE_LLONG, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create tokens_per_expert"), H5Dclose);
    d3 = Hid(need(H5Dcreate2(f, "expert_load_ema", H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create expert_load_ema"), H5Dclose);
  });
  Transfer t(false);  // independent (rank 0 writes): see write_dataset (checkpoint_tensors.cpp)
  Hid ms(H5Screate_simple(2, dims, nullptr), H5Sclose);
  Hid fs(H5Scopy(sp), H5Sclose);
  if (comm.rank() != 0) {
    H5Sselect_none(ms);
    H5Sselect_none(fs);
  }
  // Every rank calls each write, then the failures are agreed.
  const std::pair<const char*, herr_t> writes[] = {
      {"placement", H5Dwrite(d1, H5T_NATIVE_INT, ms, fs, t.dxpl, pl.data())},
      {"tokens_per_expert", H5Dwrite(d2, H5T_NATIVE_LLONG, ms, fs, t.dxpl, tk.data())},
      {"expert_load_ema", H5Dwrite(d3, H5T_NATIVE_DOUBLE, ms, fs, t.dxpl, ema.data())}};
  impl::agree(comm, [&] {
    for (const auto& w : writes) need_ok(w.second, std::string("cannot write ") + w.first);
  });
  if (cfg.model.router.bias_rate > 0) write_router_bias(f, model, sp, ms, fs, t);
}

/// Bytes a checkpoint of `model` takes at most: the tensors (parameters and two moments), the
/// [layers][experts] tables and a generous allowance for HDF5 metadata per dataset.
template <class S>
std::uint64_t checkpoint_bytes_bound(Model<S>& model, const std::string& placement_history_json) {
  const MemoryReport mr = model.memory();
  const std::uint64_t L = static_cast<std::uint64_t>(model.n_layers());
  const std::uint64_t E = static_cast<std::uint64_t>(model.config().num_experts);
  std::uint64_t expert_rows = 0;
  for (const ParamSlot& row : model.param_table()) expert_rows += row.owner == ParamSlot::Owner::experts ? 1 : 0;
  const std::uint64_t datasets = 3 * (static_cast<std::uint64_t>(model.fsdp().num_params()) + expert_rows) + 3;
  return 3 * static_cast<std::uint64_t>(mr.dense_total_params + mr.expert_total_params) * sizeof(S) +
         4 * L * E * 8 + (datasets + 1) * 2048 + placement_history_json.size() + (std::uint64_t(64) << 10);
}

std::string human(std::uint64_t b) {
  char t[64];
  if (b >= (std::uint64_t(1) << 30)) std::snprintf(t, sizeof t, "%.1f GiB", static_cast<double>(b) / (1 << 30));
  else if (b >= (std::uint64_t(1) << 20)) std::snprintf(t, sizeof t, "%.1f MiB", static_cast<double>(b) / (1 << 20));
  else std::snprintf(t, sizeof t, "%.0f KiB", static_cast<double>(b) / 1024);
  return t;
}

/// Checks (rank 0, before HDF5 creates the file) that `bytes` can be allocated for `tmp`:
/// they are reserved with fallocate(2), which also sees quotas, and freed at once; where the
/// file system cannot preallocate, its free space is compared instead. "" or the error,
/// naming the cause ("No space left on device", "Disk quota exceeded", "Read-only file system").
std::string reserve_space(const std::string& tmp, std::uint64_t bytes) {
  const std::size_t slash = tmp.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : tmp.substr(0, std::max<std::size_t>(slash, 1));
  struct statvfs vfs;
  const std::uint64_t avail =
      ::statvfs(dir.c_str(), &vfs) == 0 ? static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize : ~std::uint64_t(0);
  const std::string sizes = " (the checkpoint needs up to about " + human(bytes) + "; " + human(avail) + " free in '" +
                            dir + "')";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return "examoe::checkpoint: cannot create '" + tmp + "': " + std::strerror(errno);
  int e = 0;
#ifdef __linux__
  if (::fallocate(fd, 0, 0, static_cast<off_t>(bytes)) != 0) e = errno;
#else
  e = EOPNOTSUPP;
#endif
  ::close(fd);
  ::unlink(tmp.c_str());
  if (e == EOPNOTSUPP || e == ENOSYS || e == EINVAL) e = avail < bytes ? ENOSPC : 0;
  if (e == 0) return {};
  return "examoe::checkpoint: cannot write '" + tmp + "': " + std::strerror(e) + sizes;
}

/// After a failed write: frees the space the partial file holds (so that HDF5 can write
/// the little metadata closing it needs, also on a full disk), closes it on every rank and
/// removes it. Never throws.
void discard_partial_file(Hid& f, const std::string& tmp, Communicator& comm) {
  try {
    if (comm.rank() == 0) (void)::truncate(tmp.c_str(), 0);
    comm.barrier();
    const hid_t id = f.release();
    if (id >= 0 && H5Fclose(id) < 0 && H5Iis_valid(id) > 0) {
      // Still open (the close could not write its metadata): once more, after a barrier.
      comm.barrier();
      if (comm.rank() == 0) (void)::truncate(tmp.c_str(), 0);
      H5Fclose(id);
    }
    comm.barrier();
    if (comm.rank() == 0) ::unlink(tmp.c_str());
  } catch (...) {
  }
}

// ------------------------------------------------------------------ reading the metadata

/// The root attributes and the config group of `f` into `info`, each checked.
void read_root_metadata(hid_t f, const std::string& path, CheckpointInfo& info) {
  if (H5Aexists(f, "format_version") <= 0) fail("'" + path + "' is not an ExaMoE checkpoint (no format_version)");
  info.format_version = read_attr<int>(f, "format_version", H5T_NATIVE_INT);
  if (info.format_version != kCheckpointFormatVersion)
    fail("'" + path + "' has format version " + std::to_string(info.format_version) + "; this ExaMoE reads version " +
         std::to_string(kCheckpointFormatVersion));
  info.step = read_attr<long long>(f, "step", H5T_NATIVE_LLONG);
  if (info.step < 0 || info.step > INT_MAX)
    fail("'" + path + "' records step " + std::to_string(info.step) + ", outside [0, 2^31): the file is corrupt");
  info.precision = read_attr_string(f, "precision");
  if (info.precision != "float" && info.precision != "double")
    fail("'" + path + "' records precision '" + info.precision.substr(0, 40) + "' (float or double): the file is corrupt");
  info.world_size = read_attr<int>(f, "world_size", H5T_NATIVE_INT);
  info.dp = read_attr<int>(f, "dp", H5T_NATIVE_INT);
  info.ep = read_attr<int>(f, "ep", H5T_NATIVE_INT);
  if (info.ep < 1 || info.dp < 1 || info.world_size < 1 || static_cast<long long>(info.dp) * info.ep != info.world_size)
    fail("'" + path + "' records a mesh of world_size " + std::to_string(info.world_size) + " = dp " +
         std::to_string(info.dp) + " x ep " + std::to_string(info.ep) + " that does not add up: the file is corrupt");
  info.parameters = read_attr<long long>(f, "parameters", H5T_NATIVE_LLONG);
  info.placement_history = H5Aexists(f, "placement_history") > 0 ? read_attr_string(f, "placement_history") : "[]";
  if (H5Lexists(f, "config", H5P_DEFAULT) <= 0) fail("'" + path + "' has no config group");
  Hid g = io::open_group(f, "config");
  for (const auto& k : config_keys())
    if (H5Aexists(g, k.name.c_str()) > 0) info.config.emplace_back(k.name, read_attr_string(g, k.name.c_str()));
}

/// The [layers][experts] tables of a checkpoint: each of a plausible size (read whole), all
/// of the same shape (the first one read sets it).
class TableReader {
 public:
  explicit TableReader(hid_t f) : f_(f) {}
  /// Dataset `name` whole, as `type` (H5T_NATIVE_DOUBLE or H5T_NATIVE_LLONG); `dims` its shape.
  template <class T>
  std::vector<T> read(const char* name, hid_t type, hsize_t* dims) {
    Hid ds = io::open_dataset(f_, name);
    check_shape(ds, name, dims);
    std::vector<T> v(dims[0] * dims[1]);
    Transfer t(false);
    if (H5Dread(ds, type, H5S_ALL, H5S_ALL, t.dxpl, v.data()) < 0) fail(std::string("cannot read dataset '") + name + "'");
    return v;
  }

 private:
  void check_shape(hid_t ds, const char* name, hsize_t* dims) {
    Hid sp(H5Dget_space(ds), H5Sclose);
    if (!sp.ok() || H5Sget_simple_extent_ndims(sp) != 2) fail(std::string("dataset '") + name + "' is not [layers][experts]");
    H5Sget_simple_extent_dims(sp, dims, nullptr);
    if (dims[0] < 1 || dims[1] < 1 || dims[0] > (1u << 20) || dims[1] > (1u << 24) || dims[0] * dims[1] > (1u << 26))
      fail(std::string("dataset '") + name + "' has an implausible shape [" + std::to_string(dims[0]) + "][" +
           std::to_string(dims[1]) + "]: the file is corrupt");
    if (table_[0] == 0) {
      table_[0] = dims[0];
      table_[1] = dims[1];
    } else if (dims[0] != table_[0] || dims[1] != table_[1]) {
      fail(std::string("dataset '") + name + "' has shape [" + std::to_string(dims[0]) + "][" + std::to_string(dims[1]) +
           "], the other [layers][experts] tables [" + std::to_string(table_[0]) + "][" + std::to_string(table_[1]) +
           "]: the file is corrupt");
    }
  }
  hid_t f_;
  hsize_t table_[2] = {0, 0};
};

/// /expert_load_ema (optional), /placement and /tokens_per_expert into `info`, each checked.
void read_expert_tables(hid_t f, CheckpointInfo& info) {
  TableReader tables(f);
  if (H5Lexists(f, "expert_load_ema", H5P_DEFAULT) > 0) {
    hsize_t dims[2] = {0, 0};
    const std::vector<double> v = tables.read<double>("expert_load_ema", H5T_NATIVE_DOUBLE, dims);
    for (double x : v)
      if (!(x >= 0) || !std::isfinite(x)) fail("dataset 'expert_load_ema' holds " + std::to_string(x) + ": the file is corrupt");
    for (hsize_t l = 0; l < dims[0]; ++l) info.expert_load_ema.emplace_back(v.begin() + l * dims[1], v.begin() + (l + 1) * dims[1]);
  }
  if (H5Lexists(f, "router_bias", H5P_DEFAULT) > 0) {
    hsize_t dims[2] = {0, 0};
    const std::vector<double> v = tables.read<double>("router_bias", H5T_NATIVE_DOUBLE, dims);
    for (double x : v)
      if (!std::isfinite(x)) fail("dataset 'router_bias' holds " + std::to_string(x) + ": the file is corrupt");
    for (hsize_t l = 0; l < dims[0]; ++l) info.router_bias.emplace_back(v.begin() + l * dims[1], v.begin() + (l + 1) * dims[1]);
  }
  for (const char* dsname : {"placement", "tokens_per_expert"}) {
    hsize_t dims[2] = {0, 0};
    const std::vector<long long> v = tables.read<long long>(dsname, H5T_NATIVE_LLONG, dims);
    const bool owners = std::string(dsname) == "placement";
    for (hsize_t i = 0; i < v.size(); ++i)
      if (owners ? (v[i] < 0 || v[i] >= info.ep) : v[i] < 0)
        fail("dataset '" + std::string(dsname) + "' holds " + std::to_string(v[i]) + " for expert " +
             std::to_string(i % dims[1]) + " of layer " + std::to_string(i / dims[1]) +
             (owners ? " (an owner must be in [0, ep = " + std::to_string(info.ep) + "))" : " (counts are >= 0)") +
             ": the file is corrupt");
    for (hsize_t l = 0; l < dims[0]; ++l) {
      if (owners) {
        info.placement.emplace_back();
        for (hsize_t e = 0; e < dims[1]; ++e) info.placement.back().push_back(static_cast<int>(v[l * dims[1] + e]));
      } else {
        info.tokens_per_expert.emplace_back(v.begin() + l * dims[1], v.begin() + (l + 1) * dims[1]);
      }
    }
  }
}

/// Why the checkpoint `info` of `path` cannot be loaded into a run of `cfg` in precision S
/// (other precision, other model shape); "" if it can.
template <class S>
std::string incompatibility(const CheckpointInfo& info, const TrainConfig& cfg, const std::string& path) {
  const std::string prec = std::is_same<S, float>::value ? "float" : "double";
  if (info.precision != prec)
    return "examoe::checkpoint: '" + path + "' holds " + info.precision + " parameters; this run uses " + prec +
           " (set train.precision=" + info.precision + ")";
  static const TrainConfig defaults;
  for (const auto& k : config_keys()) {
    const std::string& key = k.name;
    // Shapes only: the router's settings, norm_eps, the rows' wire type and the capacity may change on resume.
    if (key.rfind("model.", 0) != 0 || key.rfind("model.router.", 0) == 0 || key == "model.norm_eps" ||
        key == "model.dispatch_dtype" || key == "model.allow_tf32" || key == "model.capacity_factor")
      continue;
    // A key left out at its default (model.vocab_size) had that value; others absent: not compared.
    const std::string* saved = nullptr;
    for (const auto& kv : info.config)
      if (kv.first == key) saved = &kv.second;
    const std::string value = saved ? *saved : k.omitted_at_default ? k.get(defaults) : std::string();
    if ((saved || k.omitted_at_default) && k.get(cfg) != value)
      return "examoe::checkpoint: '" + path + "' was written for " + key + " = " + value + ", this run has " + key +
             " = " + k.get(cfg) + ": the model shapes differ";
  }
  return {};
}

}  // namespace

template <class S>
void save_checkpoint(const std::string& path, Model<S>& model, const AdamW<S>& opt,
                     const TrainConfig& cfg, long long step,
                     const std::vector<std::vector<long long>>& tokens_per_expert,
                     const std::string& placement_history_json,
                     const std::vector<std::vector<double>>& expert_load_ema, const std::string& run_id) {
  io::ErrorPrefix errors("examoe::checkpoint");  // of the HDF5 helpers
  Mesh& mesh = model.mesh();
  Communicator& comm = mesh.world();
  impl::CollectiveLabel label("checkpoint.write");
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  // No checkpoint ever holds a state that cannot be resumed.
  const std::string bad = find_bad_checkpoint_state(model, opt);
  if (!bad.empty())
    throw Error("examoe::checkpoint::save: not writing '" + path + "': the state to save is not valid (" + bad +
                "); nothing was written, the existing checkpoints are untouched");
  const std::string tmp = path + ".tmp";
  std::string err;
  // Disk full or over quota: found before HDF5 writes a byte (HDF5 cannot recover from a
  // failed write cleanly on every rank; the path below is for space taken meanwhile).
  if (comm.rank() == 0) err = reserve_space(tmp, checkpoint_bytes_bound(model, placement_history_json));
  if (!err.empty()) err += "; nothing was written, the existing checkpoints are untouched";
  throw_if_any(comm, err);
  Hid f = open_file_parallel(tmp, comm.mpi_comm(), true);
  if (!f.ok()) {
    const std::string cause = hdf5_cause();
    err = "examoe::checkpoint: cannot create '" + tmp + "'" + (cause.empty() ? " (directory missing or not writable?)" : cause);
  }
  throw_if_any(comm, err);
  try {
    write_metadata(f, model, opt, cfg, step, tokens_per_expert, placement_history_json, expert_load_ema);
    for (io::TensorGroup group : io::kTensorGroups) {
      io::write_tensors<S>(f, model, opt, group);
      // Fault injection: a rank killed with the parameters written, the moments not yet.
      if (group == io::TensorGroup::params && impl::fault::armed()) impl::fault::at_checkpoint_write(tmp);
    }
    // (No H5Fflush: the close below writes the metadata; a flush that fails on rank 0 only
    // would leave the ranks in different collectives of HDF5's.)
  } catch (const Error& e) {
    // Every rank is here, with the same message: the write failed as a whole.
    discard_partial_file(f, tmp, comm);
    throw Error(std::string(e.what()) + " (while writing '" + tmp + "'; that partial file was removed, the existing "
                "checkpoints are untouched)");
  }
  if (H5Fclose(f.release()) < 0) err = "examoe::checkpoint: cannot close '" + tmp + "'" + hdf5_cause();
  err = comm.first_error(err);
  if (!err.empty()) {
    if (comm.rank() == 0) ::unlink(tmp.c_str());
    throw Error(err + " (that partial file was removed, the existing checkpoints are untouched)");
  }
  comm.barrier();
  try {
    seal_checkpoint_file(tmp, comm.mpi_comm(), run_id);
  } catch (const Error& e) {
    if (comm.rank() == 0) ::unlink(tmp.c_str());
    throw Error(std::string(e.what()) + " (that partial file was removed, the existing checkpoints are untouched)");
  }
  if (comm.rank() == 0 && std::rename(tmp.c_str(), path.c_str()) != 0)
    err = "examoe::checkpoint: cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno);
  throw_if_any(comm, err);
}

CheckpointInfo read_checkpoint_info(const std::string& path, MPI_Comm mpi_comm) {
  io::ErrorPrefix errors("examoe::checkpoint");  // of the HDF5 helpers
  impl::CollectiveLabel label("checkpoint.read");
  auto comm = make_mpi_communicator(mpi_comm);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  // Nothing of the file reaches HDF5 before its header and checksum are verified.
  const io::CheckpointHeader header = io::verify_checkpoint_header(path, *comm);
  CheckpointInfo info;
  if (header.run != 0) info.run_id = std::to_string(header.run);
  agree_reading(*comm, path, [&] {
    Hid f = open_file_parallel(path, comm->mpi_comm(), false);
    if (!f.ok()) fail("'" + path + "' cannot be opened");
    read_root_metadata(f, path, info);
    read_expert_tables(f, info);
  });
  return info;
}

template <class S>
CheckpointInfo load_checkpoint(const std::string& path, Model<S>& model, AdamW<S>& opt,
                               const TrainConfig& cfg) {
  io::ErrorPrefix errors("examoe::checkpoint");  // of the HDF5 helpers
  Communicator& comm = model.mesh().world();
  impl::CollectiveLabel label("checkpoint.read");
  CheckpointInfo info = read_checkpoint_info(path, comm.mpi_comm());
  // Compatibility: the model's shape and the precision must match.
  throw_if_any(comm, incompatibility<S>(info, cfg, path));
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  Hid f = open_file_parallel(path, comm.mpi_comm(), false);
  agree_reading(comm, path, [&] {
    if (!f.ok()) fail("'" + path + "' cannot be opened");
    const long long adam_step = read_attr<long long>(f, "adam_step", H5T_NATIVE_LLONG);
    if (adam_step < 0 || adam_step > INT_MAX)
      fail("'" + path + "' records AdamW step " + std::to_string(adam_step) + ", outside [0, 2^31): the file is corrupt");
    opt.set_steps(adam_step);
    for (io::TensorGroup group : io::kTensorGroups) io::read_tensors<S>(f, model, opt, group);
  });
  // The selection bias continues where it was (a checkpoint without one: it starts at 0).
  if (cfg.model.router.bias_rate > 0)
    for (int l = 0; l < model.n_layers() && l < static_cast<int>(info.router_bias.size()); ++l)
      model.moe(l).set_router_bias(info.router_bias[l]);
  impl::count_host_sync();
  Kokkos::fence();
  return info;
}

#else  // built without HDF5

template <class S>
void save_checkpoint(const std::string&, Model<S>&, const AdamW<S>&, const TrainConfig&, long long,
                     const std::vector<std::vector<long long>>&, const std::string&,
                     const std::vector<std::vector<double>>&, const std::string&) {
  throw Error("examoe::checkpoint: this ExaMoE was built without parallel HDF5 (ExaMoE_ENABLE_HDF5=OFF)");
}
template <class S>
CheckpointInfo load_checkpoint(const std::string&, Model<S>&, AdamW<S>&, const TrainConfig&) {
  throw Error("examoe::checkpoint: this ExaMoE was built without parallel HDF5 (ExaMoE_ENABLE_HDF5=OFF)");
}
CheckpointInfo read_checkpoint_info(const std::string&, MPI_Comm) {
  throw Error("examoe::checkpoint: this ExaMoE was built without parallel HDF5 (ExaMoE_ENABLE_HDF5=OFF)");
}
#endif  // EXAMOE_ENABLE_HDF5

template void save_checkpoint<float>(const std::string&, Model<float>&, const AdamW<float>&, const TrainConfig&, long long, const std::vector<std::vector<long long>>&, const std::string&, const std::vector<std::vector<double>>&, const std::string&);
template void save_checkpoint<double>(const std::string&, Model<double>&, const AdamW<double>&, const TrainConfig&, long long, const std::vector<std::vector<long long>>&, const std::string&, const std::vector<std::vector<double>>&, const std::string&);
template CheckpointInfo load_checkpoint<float>(const std::string&, Model<float>&, AdamW<float>&, const TrainConfig&);
template CheckpointInfo load_checkpoint<double>(const std::string&, Model<double>&, AdamW<double>&, const TrainConfig&);

}  // namespace examoe
