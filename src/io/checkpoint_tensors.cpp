// Every tensor of a checkpoint: the groups /params, /adam_m and /adam_v, one dataset per row of
// the model's parameter table, written from and read into this rank's pieces by hyperslabs,
// each with its checksum; and the check that no checkpoint holds a state that cannot be
// resumed (find_bad_checkpoint_state). Layout: docs/checkpoint-format.md.
#include "io/checkpoint_tensors.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/random.hpp>

#if EXAMOE_ENABLE_HDF5
#include "io/hdf5.hpp"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace examoe {

const char* io::group_name(TensorGroup group) {
  switch (group) {
    case TensorGroup::params: return "params";
    case TensorGroup::adam_m: return "adam_m";
    case TensorGroup::adam_v: return "adam_v";
  }
  return "?";
}

namespace {

using io::TensorGroup;
/// This rank's part of one tensor, flat (Model<S>::flat).
template <class S>
using Flat = Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

/// "[i][j][k]" of row-major element `flat` of a tensor of shape `dims`.
std::string index_text(const std::vector<unsigned long long>& dims, unsigned long long flat) {
  std::vector<unsigned long long> idx(dims.size(), 0);
  for (std::size_t d = dims.size(); d-- > 0;) {
    idx[d] = dims[d] ? flat % dims[d] : 0;
    flat = dims[d] ? flat / dims[d] : 0;
  }
  std::string s;
  for (auto i : idx) s += "[" + std::to_string(i) + "]";
  return s;
}

/// What is wrong with value `v` of a tensor of `group`: "" or the reason. Parameters and
/// moments are finite, second moments >= 0.
template <class S>
const char* value_problem(S v, TensorGroup group) {
  if (!std::isfinite(v))
    return group == TensorGroup::params ? "a parameter must be finite" : "an AdamW moment must be finite";
  if (group == TensorGroup::adam_v && v < 0) return "an AdamW second moment must be >= 0";
  return "";
}
std::string value_text(double v) {
  std::ostringstream os;
  os << std::setprecision(9) << v;
  return os.str();
}

/// Row `i` of the parameter table in `group`: this rank's part of the parameter, or of its
/// AdamW moment (AdamW tensor i is row i).
template <class S>
Flat<S> group_tensor(const Model<S>& model, const AdamW<S>& opt, TensorGroup group, int i) {
  if (group == TensorGroup::params) return model.param_values(i);
  const auto v = group == TensorGroup::adam_m ? opt.m(i) : opt.v(i);
  return Flat<S>(v.data(), v.size());
}

// ------------------------------------------------------------------ state that may be saved

/// The first element of `v` that no checkpoint may hold (not finite; with `second_moment`
/// also negative), or -1.
template <class S>
long long first_bad(const Flat<S>& v, bool second_moment) {
  if (v.size() == 0) return -1;
  long long first = 0;
  impl::count_host_sync();  // a reduction into a host value waits for it
  Kokkos::parallel_reduce(
      "examoe::checkpoint::find_bad",
      Kokkos::RangePolicy<Kokkos::DefaultExecutionSpace>(0, v.size()),
      KOKKOS_LAMBDA(const std::size_t i, long long& m) {
        const S x = v(i);
        const bool bad = !(x - x == S(0)) || (second_moment && x < S(0));  // NaN/Inf: x - x is NaN
        if (bad && static_cast<long long>(i) < m) m = static_cast<long long>(i);
      },
      Kokkos::Min<long long>(first));
  return first == std::numeric_limits<long long>::max() ? -1 : first;
}

/// Element `at` of `v`, as text.
template <class S>
std::string value_at(const Flat<S>& v, long long at) {
  S x{};
  impl::count_host_sync();
  Kokkos::deep_copy(x, Kokkos::subview(v, at));
  return value_text(static_cast<double>(x));
}

/// Where flat element `flat` of FSDP unit `u` lies: "name[i][j]" of the parameter holding it,
/// or "unit U element F" (the padding holds no parameter).
template <class S>
std::string unit_element_name(Fsdp<S>& F, int u, std::size_t flat) {
  std::string where = "unit " + std::to_string(u) + " element " + std::to_string(flat);
  for (int p = 0; p < F.num_params(); ++p) {
    std::size_t n = 1;
    std::vector<unsigned long long> dims;
    for (int d : F.param_shape(p)) {
      n *= static_cast<std::size_t>(d);
      dims.push_back(static_cast<unsigned long long>(d));
    }
    if (F.param_unit(p) == u && flat >= F.param_offset(p) && flat < F.param_offset(p) + n)
      where = F.param_name(p) + index_text(dims, flat - F.param_offset(p));
  }
  return where;
}

/// This rank's first bad element of row `i` of the parameter table in `group`, as
/// "params/lm_head[3][7] = inf" (global indices); "" if none.
template <class S>
std::string bad_in_row(Model<S>& model, const AdamW<S>& opt, TensorGroup group, int i) {
  const ParamSlot& row = model.param_table()[i];
  const Flat<S> src = group_tensor(model, opt, group, i);
  const bool second_moment = group == TensorGroup::adam_v;
  const std::string head = std::string(io::group_name(group)) + "/";
  if (row.owner == ParamSlot::Owner::fsdp_unit) {
    auto& F = model.fsdp();
    const Flat<S> mine(src.data(), std::min<std::size_t>(src.size(), F.shard_numel(row.unit)));
    const long long at = first_bad<S>(mine, second_moment);
    if (at < 0) return {};
    const std::size_t flat =
        static_cast<std::size_t>(model.mesh().world().rank()) * F.shard_numel(row.unit) + static_cast<std::size_t>(at);
    return head + unit_element_name(F, row.unit, flat) + " = " + value_at(mine, at);
  }
  const long long at = first_bad<S>(src, second_moment);
  if (at < 0) return {};
  auto& m = model.moe(row.layer);
  const std::vector<unsigned long long> dims(row.shape.begin(), row.shape.end());  // [E][a][b]
  const unsigned long long per = dims[1] * dims[2];
  const int e = m.placement().global_expert(m.communicator().rank(), static_cast<int>(at / per));
  return head + row.name + index_text(dims, static_cast<unsigned long long>(e) * per + at % per) + " = " +
         value_at(src, at);
}

}  // namespace

template <class S>
std::string find_bad_checkpoint_state(Model<S>& model, const AdamW<S>& opt) {
  Communicator& comm = model.mesh().world();
  const int rows = static_cast<int>(model.param_table().size());
  std::string found;
  for (TensorGroup group : io::kTensorGroups)
    for (int i = 0; i < rows && found.empty(); ++i) found = bad_in_row(model, opt, group, i);
  std::string agreed_found = comm.first_error(found);  // the lowest rank's, on every rank
  const std::size_t tag = agreed_found.rfind(" [reported by rank ");
  if (tag != std::string::npos) agreed_found.resize(tag);
  return agreed_found;
}

template std::string find_bad_checkpoint_state<float>(Model<float>&, const AdamW<float>&);
template std::string find_bad_checkpoint_state<double>(Model<double>&, const AdamW<double>&);

#if EXAMOE_ENABLE_HDF5

// ------------------------------------------------------------------ datasets of tensors
namespace {

using io::add_flat_range;
using io::dims_of;
using io::fail;
using io::h5type;
using io::Hid;
using io::need;
using io::need_ok;
using io::read_attr;
using io::select_flat_range;
using io::Transfer;
using io::write_attr;

/// One flat piece this rank owns: elements [lo, hi) of a tensor, at `mem` in host memory.
template <class S>
struct Piece {
  hsize_t lo = 0, hi = 0;
  S* mem = nullptr;
};

/// The first element of `v` (elements [lo, hi) of a tensor of shape `dims` in `group`) that
/// no checkpoint may hold, as an error naming the dataset and the element; "" if none.
template <class S>
std::string bad_element(const S* v, hsize_t lo, hsize_t hi, const std::vector<hsize_t>& dims, TensorGroup group,
                        const std::string& name) {
  for (hsize_t i = lo; i < hi; ++i) {
    const char* why = value_problem(v[i - lo], group);
    if (*why)
      return "examoe::checkpoint: dataset '" + std::string(io::group_name(group)) + "/" + name + "' holds " +
             value_text(static_cast<double>(v[i - lo])) + " at " +
             index_text(std::vector<unsigned long long>(dims.begin(), dims.end()), i) + ": " + why +
             " (the file is corrupt, or holds the state of a diverged run)";
  }
  return {};
}

/// Order-independent checksum of a tensor: sum over elements of a hash of (flat index, bits).
template <class S>
std::uint64_t element_hash(std::uint64_t flat, S v) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(S));
  return impl::splitmix64(flat * 0x9E3779B97F4A7C15ull ^ bits ^ 0xC0FFEEull);
}
/// The checksum of this rank's pieces, whose values lie one after another in `buf`.
template <class S>
std::uint64_t pieces_hash(const std::vector<S>& buf, const std::vector<Piece<S>>& pieces) {
  std::uint64_t sum = 0;
  std::size_t off = 0;
  for (const auto& pc : pieces) {
    for (hsize_t i = pc.lo; i < pc.hi; ++i) sum += element_hash<S>(i, buf[off + (i - pc.lo)]);
    off += pc.hi - pc.lo;
  }
  return sum;
}

/// Sums `s` over the ranks (modulo 2^64) and, in the same allreduce, counts the ranks whose
/// `err` is set; if any is, every rank throws the lowest such rank's message.
void agree_with_sum(Communicator& comm, std::int64_t& s, const std::string& err) {
  std::int64_t v[2] = {s, err.empty() ? 0 : 1};
  comm.allreduce_sum(v, 2, DataType::i64);
  if (v[1] > 0) throw_if_any(comm, err);
  s = v[0];
}
/// The message of the examoe::Error `f` throws ("" if none): a local failure that
/// agree_with_sum agrees together with a checksum.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

/// This rank's pieces of a dataset whose dataspace is `space`: the file selection (their
/// union), a flat memory dataspace of as many elements, and their count.
struct Selection {
  Hid file, mem;
  hsize_t total = 0;
};
template <class S>
Selection select_pieces(hid_t space, const std::vector<hsize_t>& dims, const std::vector<Piece<S>>& pieces) {
  Selection s;
  s.file = Hid(H5Scopy(space), H5Sclose);
  H5Sselect_none(s.file);
  bool first = true;
  for (const auto& pc : pieces) {
    add_flat_range(s.file, dims, pc.lo, pc.hi, first);
    s.total += pc.hi - pc.lo;
  }
  const hsize_t mcount = std::max<hsize_t>(s.total, 1);
  s.mem = Hid(H5Screate_simple(1, &mcount, nullptr), H5Sclose);
  if (s.total == 0) H5Sselect_none(s.mem);
  return s;
}

/// Creates dataset `name` (shape `dims`) of `group` and writes this rank's `pieces` (disjoint,
/// ascending) and the checksum of all ranks' pieces. Collective; failures are agreed.
template <class S>
void write_dataset(hid_t parent, TensorGroup group, const std::string& name, const std::vector<hsize_t>& dims,
                   const std::vector<Piece<S>>& pieces, Communicator& comm) {
  const std::string path = std::string(io::group_name(group)) + "/" + name;
  Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid ds;
  const std::string err = error_of([&] {
    ds = Hid(need(H5Dcreate2(parent, name.c_str(), h5type<S>(), space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                  "cannot create dataset " + path),
             H5Dclose);
  });
  const Selection sel = select_pieces(space, dims, pieces);
  std::vector<S> buf;
  buf.reserve(static_cast<std::size_t>(sel.total));
  for (const auto& pc : pieces) buf.insert(buf.end(), pc.mem, pc.mem + (pc.hi - pc.lo));
  // One allreduce: the checksum, and whether any rank failed (then the error is agreed).
  std::int64_t sum = static_cast<std::int64_t>(pieces_hash(buf, pieces));
  agree_with_sum(comm, sum, err);
  impl::agree(comm, [&] {
    // The checksum attribute first (metadata, cached), then the data. Independent: a rank
    // whose write fails (disk full) must not leave the others inside one of HDF5's
    // collective MPI-IO calls; the outcome is agreed when this returns.
    write_attr<std::uint64_t>(ds, "examoe_checksum", static_cast<std::uint64_t>(sum), H5T_NATIVE_UINT64);
    Transfer t(false);
    need_ok(H5Dwrite(ds, h5type<S>(), sel.mem, sel.file, t.dxpl, sel.total ? buf.data() : nullptr),
            "cannot write dataset " + path);
  });
}

/// Dataset `name` of `parent`, refused when missing or not of shape `dims`.
Hid open_with_shape(hid_t parent, const std::string& name, const std::vector<hsize_t>& dims) {
  Hid ds = io::open_dataset(parent, name);
  Hid fs(H5Dget_space(ds), H5Sclose);
  std::vector<hsize_t> got(static_cast<std::size_t>(std::max(0, H5Sget_simple_extent_ndims(fs))));
  H5Sget_simple_extent_dims(fs, got.data(), nullptr);
  if (got != dims) {
    std::string a, b;
    for (auto v : got) a += "[" + std::to_string(v) + "]";
    for (auto v : dims) b += "[" + std::to_string(v) + "]";
    fail("dataset '" + name + "' has shape " + a + " but the model needs " + b);
  }
  return ds;
}

/// Reads this rank's `pieces` of dataset `name` of `group` (independently), checks their
/// values and the checksum over all ranks' pieces. Collective; read and value errors agreed.
template <class S>
void read_dataset(hid_t parent, TensorGroup group, const std::string& name, const std::vector<hsize_t>& dims,
                  const std::vector<Piece<S>>& pieces, Communicator& comm) {
  Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid ds = open_with_shape(parent, name, dims);
  const Selection sel = select_pieces(space, dims, pieces);
  std::vector<S> buf(static_cast<std::size_t>(sel.total));
  std::string err;
  Transfer t(false);
  if (sel.total > 0 && H5Dread(ds, h5type<S>(), sel.mem, sel.file, t.dxpl, buf.data()) < 0)
    err = "examoe::checkpoint: cannot read dataset '" + name + "' (truncated or corrupt file?)";
  std::size_t off = 0;
  for (const auto& pc : pieces) {
    if (err.empty()) err = bad_element(buf.data() + off, pc.lo, pc.hi, dims, group, name);
    std::copy(buf.begin() + off, buf.begin() + off + (pc.hi - pc.lo), pc.mem);
    off += pc.hi - pc.lo;
  }
  // One allreduce: the checksum, and whether any rank failed (then the error is agreed).
  std::int64_t sum = static_cast<std::int64_t>(pieces_hash(buf, pieces));
  agree_with_sum(comm, sum, err);
  const auto want = read_attr<std::uint64_t>(ds, "examoe_checksum", H5T_NATIVE_UINT64);
  if (want != static_cast<std::uint64_t>(sum)) fail("dataset '" + name + "' fails its checksum: the file is corrupt");
}

/// Reads `pieces` of dataset `name` outside of its checksum (the experts of a data-parallel
/// replica other than the first) and checks their values; throws the first problem.
template <class S>
void read_unsummed_pieces(hid_t parent, TensorGroup group, const std::string& name, const std::vector<hsize_t>& dims,
                          const std::vector<Piece<S>>& pieces) {
  Hid ds = io::open_dataset(parent, name);
  Transfer t(false);
  for (const auto& pc : pieces) {
    Hid fs(H5Dget_space(ds), H5Sclose);
    select_flat_range(fs, dims, pc.lo, pc.hi);
    const hsize_t cnt = pc.hi - pc.lo;
    Hid ms(H5Screate_simple(1, &cnt, nullptr), H5Sclose);
    if (H5Dread(ds, h5type<S>(), ms, fs, t.dxpl, pc.mem) < 0) fail("cannot read dataset '" + name + "'");
    const std::string bad = bad_element(pc.mem, pc.lo, pc.hi, dims, group, name);
    if (!bad.empty()) throw Error(bad);
  }
}

template <class S>
std::vector<S> to_host(const Flat<S>& v) {
  auto h = impl::host_copy_of(v);
  return std::vector<S>(h.data(), h.data() + h.size());
}
template <class S>
void from_host(const std::vector<S>& h, const Flat<S>& v) {
  Kokkos::View<const S*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> hv(h.data(), h.size());
  Flat<S> dv(v.data(), h.size());
  Kokkos::deep_copy(dv, hv);
}

enum class Direction { write, read };

/// The datasets of FSDP unit `u` (one per parameter of Fsdp's registry in it), from or into
/// `shard`, this rank's shard of the unit or of its moment.
template <class S>
void io_unit(hid_t g, Model<S>& model, const Flat<S>& shard, int u, TensorGroup group, Direction dir) {
  auto& F = model.fsdp();
  Communicator& comm = model.mesh().world();
  std::vector<S> host = to_host<S>(shard);
  const std::size_t sh = F.shard_numel(u), first = static_cast<std::size_t>(comm.rank()) * sh;
  for (int p = 0; p < F.num_params(); ++p) {
    if (F.param_unit(p) != u) continue;
    std::size_t n = 1;
    for (int s : F.param_shape(p)) n *= static_cast<std::size_t>(s);
    const std::size_t o = F.param_offset(p);
    const std::size_t lo = std::max(o, first), hi = std::min(o + n, first + sh);
    std::vector<Piece<S>> pieces;
    if (lo < hi) pieces.push_back({lo - o, hi - o, host.data() + (lo - first)});
    if (dir == Direction::write) write_dataset<S>(g, group, F.param_name(p), dims_of(F.param_shape(p)), pieces, comm);
    else read_dataset<S>(g, group, F.param_name(p), dims_of(F.param_shape(p)), pieces, comm);
  }
  if (dir == Direction::read) from_host(host, shard);
}

/// The dataset [E][a][b] of expert row `row`, from or into `local`, this rank's local experts
/// [n_local][a][b] of the tensor or of its moment. Written by the first data-parallel
/// replica's owners; read by every replica, the first one's pieces in the checksum.
template <class S>
void io_experts(hid_t g, Model<S>& model, const Flat<S>& local, const ParamSlot& row, TensorGroup group,
                Direction dir) {
  Mesh& mesh = model.mesh();
  Communicator& comm = mesh.world();
  auto& m = model.moe(row.layer);
  std::vector<S> host = local.size() ? to_host<S>(local) : std::vector<S>();
  const std::vector<hsize_t> dims = dims_of(row.shape);
  const std::size_t per = static_cast<std::size_t>(dims[1] * dims[2]);
  // Pieces ascend: local experts follow increasing global id.
  std::vector<Piece<S>> pieces;
  if (dir == Direction::read || mesh.dp_rank() == 0)
    for (int lx = 0; lx < m.num_local_experts(); ++lx) {
      const std::size_t gexp = static_cast<std::size_t>(m.placement().global_expert(m.communicator().rank(), lx));
      pieces.push_back({gexp * per, (gexp + 1) * per, host.data() + lx * per});
    }
  if (dir == Direction::write) {
    write_dataset<S>(g, group, row.name, dims, pieces, comm);
    return;
  }
  const bool summed = mesh.dp_rank() == 0;
  read_dataset<S>(g, group, row.name, dims, summed ? pieces : std::vector<Piece<S>>(), comm);
  impl::agree(comm, [&] {
    if (!summed) read_unsummed_pieces<S>(g, group, row.name, dims, pieces);
  });
  if (local.size()) from_host(host, local);
}

/// Moves group `group` of tensors between the model (and AdamW) and the open file, row by
/// row of the parameter table.
template <class S>
void io_tensors(hid_t file, Model<S>& model, const AdamW<S>& opt, TensorGroup group, Direction dir) {
  Communicator& comm = model.mesh().world();
  const char* name = io::group_name(group);
  Hid g = dir == Direction::write ? impl::agree(comm, [&] { return io::make_group(file, name); })
                                  : io::open_group(file, name);
  const std::vector<ParamSlot>& table = model.param_table();
  for (int i = 0; i < static_cast<int>(table.size()); ++i) {
    const Flat<S> t = group_tensor(model, opt, group, i);
    if (table[i].owner == ParamSlot::Owner::fsdp_unit) io_unit<S>(g, model, t, table[i].unit, group, dir);
    else io_experts<S>(g, model, t, table[i], group, dir);
  }
}

}  // namespace

template <class S>
void io::write_tensors(hid_t file, Model<S>& model, const AdamW<S>& opt, TensorGroup group) {
  io_tensors<S>(file, model, opt, group, Direction::write);
}
template <class S>
void io::read_tensors(hid_t file, Model<S>& model, AdamW<S>& opt, TensorGroup group) {
  io_tensors<S>(file, model, opt, group, Direction::read);
}

template void io::write_tensors<float>(hid_t, Model<float>&, const AdamW<float>&, TensorGroup);
template void io::write_tensors<double>(hid_t, Model<double>&, const AdamW<double>&, TensorGroup);
template void io::read_tensors<float>(hid_t, Model<float>&, AdamW<float>&, TensorGroup);
template void io::read_tensors<double>(hid_t, Model<double>&, AdamW<double>&, TensorGroup);

#endif  // EXAMOE_ENABLE_HDF5

}  // namespace examoe
