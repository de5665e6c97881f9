// Parallel-HDF5 checkpoints: one file, every tensor in global order, readable at any rank
// count. Layout: docs/checkpoint-format.md.
#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/impl/watchdog.hpp>

#if EXAMOE_ENABLE_HDF5
#include "io/hdf5.hpp"
#endif

#include <algorithm>
#include <climits>
#include <limits>
#include <cmath>
#include <cstdio>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <iomanip>
#include <sstream>

namespace examoe {

namespace {

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

/// What is wrong with value `v` of a tensor of group `which` (0 = params, 1 = adam_m,
/// 2 = adam_v): "" or the reason. Parameters and moments are finite, second moments >= 0.
template <class S>
const char* value_problem(S v, int which) {
  if (!std::isfinite(v)) return which == 0 ? "a parameter must be finite" : "an AdamW moment must be finite";
  if (which == 2 && v < 0) return "an AdamW second moment must be >= 0";
  return "";
}
std::string value_text(double v) {
  std::ostringstream os;
  os << std::setprecision(9) << v;
  return os.str();
}
const char* group_name(int which) { return which == 0 ? "params" : which == 1 ? "adam_m" : "adam_v"; }

}  // namespace

#if EXAMOE_ENABLE_HDF5

namespace {

using io::add_flat_range;
using io::dims_of;
using io::fail;
using io::h5type;
using io::hdf5_cause;
using io::Hid;
using io::make_group;
using io::need;
using io::need_ok;
using io::read_attr;
using io::read_attr_string;
using io::select_flat_range;
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
/// Sums `s` over the ranks (modulo 2^64) and, in the same allreduce, counts the ranks whose
/// `err` is set; if any is, every rank throws the lowest such rank's message.
void agree_with_sum(Communicator& comm, std::int64_t& s, const std::string& err) {
  std::int64_t v[2] = {s, err.empty() ? 0 : 1};
  comm.allreduce_sum(v, 2, DataType::i64);
  if (v[1] > 0) throw_if_any(comm, err);
  s = v[0];
}

/// Runs `f` on every rank and agrees on its outcome: an examoe::Error on any rank is thrown
/// on every rank (the lowest rank's message). Writes must pass one of these between HDF5
/// calls that can fail on some ranks only and the next collective one.
template <class F>
void agreed(Communicator& comm, F&& f) {
  std::string err;
  try {
    f();
  } catch (const Error& e) {
    err = e.what();
  }
  throw_if_any(comm, err);
}


/// Order-independent checksum of a tensor: sum over elements of a hash of (flat index, bits).
template <class S>
std::uint64_t element_hash(std::uint64_t flat, S v) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(S));
  return impl::splitmix64(flat * 0x9E3779B97F4A7C15ull ^ bits ^ 0xC0FFEEull);
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

/// One flat piece this rank owns: elements [lo, hi) of a tensor, at `mem` in host memory.
template <class S>
struct Piece {
  hsize_t lo = 0, hi = 0;
  S* mem = nullptr;
};

/// The first element of `v` (elements [lo, hi) of a tensor of shape `dims` in group `which`)
/// that no checkpoint may hold, as an error naming the dataset and the element; "" if none.
template <class S>
std::string bad_element(const S* v, hsize_t lo, hsize_t hi, const std::vector<hsize_t>& dims, int which,
                        const std::string& name) {
  for (hsize_t i = lo; i < hi; ++i) {
    const char* why = value_problem(v[i - lo], which);
    if (*why)
      return "examoe::checkpoint: dataset '" + std::string(group_name(which)) + "/" + name + "' holds " +
             value_text(static_cast<double>(v[i - lo])) + " at " + index_text(dims, i) + ": " + why +
             " (the file is corrupt, or holds the state of a diverged run)";
  }
  return {};
}

/// Writes (collectively) or reads (independently) one dataset of group `which` (params,
/// adam_m, adam_v) from per-rank flat pieces and checks/produces its checksum; values read are
/// checked (value_problem). `pieces` are disjoint and ascending. Write failures are agreed.
template <class S>
void io_dataset(hid_t parent, const std::string& name, const std::vector<hsize_t>& dims,
                const std::vector<Piece<S>>& pieces, bool write, Communicator& comm, int which) {
  Hid space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Hid ds;
  std::string err;
  if (write) {
    try {
      ds = Hid(need(H5Dcreate2(parent, name.c_str(), h5type<S>(), space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    "cannot create dataset " + std::string(group_name(which)) + "/" + name),
               H5Dclose);
    } catch (const Error& e) {
      err = e.what();
    }
  } else {
    if (H5Lexists(parent, name.c_str(), H5P_DEFAULT) <= 0) fail("dataset '" + name + "' is missing");
    ds = Hid(need(H5Dopen2(parent, name.c_str(), H5P_DEFAULT), "cannot open dataset " + name), H5Dclose);
    Hid fs(H5Dget_space(ds), H5Sclose);
    std::vector<hsize_t> got(H5Sget_simple_extent_ndims(fs));
    H5Sget_simple_extent_dims(fs, got.data(), nullptr);
    if (got != dims) {
      std::string a, b;
      for (auto v : got) a += "[" + std::to_string(v) + "]";
      for (auto v : dims) b += "[" + std::to_string(v) + "]";
      fail("dataset '" + name + "' has shape " + a + " but the model needs " + b);
    }
  }
  // Selection: union of the pieces.
  Hid fspace(H5Scopy(space), H5Sclose);
  H5Sselect_none(fspace);
  hsize_t total = 0;
  for (const auto& pc : pieces) total += pc.hi - pc.lo;
  std::vector<S> buf(static_cast<std::size_t>(total));
  {
    bool first = true;
    std::size_t off = 0;
    for (const auto& pc : pieces) {
      add_flat_range(fspace, dims, pc.lo, pc.hi, first);
      if (write) std::copy(pc.mem, pc.mem + (pc.hi - pc.lo), buf.begin() + off);
      off += pc.hi - pc.lo;
    }
  }
  const hsize_t mcount = std::max<hsize_t>(total, 1);
  Hid mspace(H5Screate_simple(1, &mcount, nullptr), H5Sclose);
  if (total == 0) H5Sselect_none(mspace);
  if (!write) {
    Transfer t(false);
    if (total > 0 && H5Dread(ds, h5type<S>(), mspace, fspace, t.dxpl, buf.data()) < 0)
      err = "examoe::checkpoint: cannot read dataset '" + name + "' (truncated or corrupt file?)";
  }
  std::uint64_t sum = 0;
  {
    std::size_t off = 0;
    for (const auto& pc : pieces) {
      if (!write && err.empty()) err = bad_element(buf.data() + off, pc.lo, pc.hi, dims, which, name);
      for (hsize_t i = pc.lo; i < pc.hi; ++i) sum += element_hash<S>(i, buf[off + (i - pc.lo)]);
      if (!write) std::copy(buf.begin() + off, buf.begin() + off + (pc.hi - pc.lo), pc.mem);
      off += pc.hi - pc.lo;
    }
  }
  // One allreduce: the checksum, and whether any rank failed (then the error is agreed).
  std::int64_t s = static_cast<std::int64_t>(sum);
  agree_with_sum(comm, s, err);
  if (write) {
    // The checksum attribute first (metadata, cached), then the collective data write.
    try {
      write_attr<std::uint64_t>(ds, "examoe_checksum", static_cast<std::uint64_t>(s), H5T_NATIVE_UINT64);
    } catch (const Error& e) {
      err = e.what();
    }
    // Independent: a rank whose write fails (disk full) must not leave the others inside
    // one of HDF5's collective MPI-IO calls; the outcome is agreed right below.
    Transfer t(false);
    if (H5Dwrite(ds, h5type<S>(), mspace, fspace, t.dxpl, total ? buf.data() : nullptr) < 0 && err.empty())
      err = "examoe::checkpoint: cannot write dataset " + std::string(group_name(which)) + "/" + name + hdf5_cause();
    std::int64_t none = 0;
    agree_with_sum(comm, none, err);
  } else {
    const auto want = read_attr<std::uint64_t>(ds, "examoe_checksum", H5T_NATIVE_UINT64);
    if (want != static_cast<std::uint64_t>(s))
      fail("dataset '" + name + "' fails its checksum: the file is corrupt");
  }
}

template <class S>
std::vector<S> to_host(const Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space>& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<S>(h.data(), h.data() + h.size());
}
template <class S, class V>
void from_host(const std::vector<S>& h, const V& v) {
  Kokkos::View<const S*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> hv(h.data(), h.size());
  Kokkos::View<S*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>> dv(v.data(), h.size());
  Kokkos::deep_copy(dv, hv);
}

/// Moves every tensor of the model (and AdamW moments) between memory and the open file.
/// `which`: 0 = parameters, 1 = AdamW m, 2 = AdamW v.
template <class S>
void io_tensors(hid_t file, Model<S>& model, const AdamW<S>* opt_w, AdamW<S>* opt_r, bool write,
                int which) {
  Mesh& mesh = model.mesh();
  Communicator& comm = mesh.world();
  auto& F = model.fsdp();
  const char* root = group_name(which);
  Hid g;
  if (write) agreed(comm, [&] { g = make_group(file, root); });
  else {
    if (H5Lexists(file, root, H5P_DEFAULT) <= 0) fail(std::string("group '") + root + "' is missing");
    g = Hid(need(H5Gopen2(file, root, H5P_DEFAULT), std::string("cannot open group ") + root), H5Gclose);
  }
  const int me = comm.rank();
  // Dense: pieces of every parameter from this rank's shard of its unit.
  for (int u = 0; u < F.num_units(); ++u) {
    using V = Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space>;
    V src = which == 0 ? F.shard(u) : which == 1 ? (write ? opt_w->m(u) : opt_r->m(u)) : (write ? opt_w->v(u) : opt_r->v(u));
    std::vector<S> shard = to_host<S>(src);
    const std::size_t sh = F.shard_numel(u), first = static_cast<std::size_t>(me) * sh;
    for (int p = 0; p < F.num_params(); ++p) {
      if (F.param_unit(p) != u) continue;
      std::size_t n = 1;
      for (int s : F.param_shape(p)) n *= static_cast<std::size_t>(s);
      const std::size_t o = F.param_offset(p);
      const std::size_t lo = std::max(o, first), hi = std::min(o + n, first + sh);
      std::vector<Piece<S>> pieces;
      if (lo < hi) pieces.push_back({lo - o, hi - o, shard.data() + (lo - first)});
      io_dataset<S>(g, F.param_name(p), dims_of(F.param_shape(p)), pieces, write, comm, which);
    }
    if (!write) from_host(shard, src);
  }
  // Experts: [E][a][b] per tensor and layer, written by the first replica's owners.
  const int E = model.config().num_experts;
  int ti = F.num_units();
  for (int l = 0; l < model.n_layers(); ++l) {
    auto& m = model.moe(l);
    const std::pair<const char*, typename MoELayer<S>::tensor3> ts[] = {{"w1", m.w1()}, {"w2", m.w2()}, {"w3", m.w3()}};
    for (const auto& [tname, w] : ts) {
      if (model.config().activation != Activation::swiglu && std::string(tname) == "w3") continue;
      using V = Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space>;
      V src = which == 0 ? V(w.data(), w.size())
                         : which == 1 ? (write ? opt_w->m(ti) : opt_r->m(ti)) : (write ? opt_w->v(ti) : opt_r->v(ti));
      std::vector<S> local = src.size() ? to_host<S>(src) : std::vector<S>();
      const std::size_t a = w.extent(1), b = w.extent(2), per = a * b;
      std::vector<Piece<S>> pieces;
      const bool participate = write ? mesh.dp_rank() == 0 : true;
      if (participate)
        for (int lx = 0; lx < m.num_local_experts(); ++lx) {
          const std::size_t gexp = static_cast<std::size_t>(m.placement().global_expert(m.communicator().rank(), lx));
          pieces.push_back({gexp * per, (gexp + 1) * per, local.data() + lx * per});
        }
      // Pieces must be ascending: local experts follow increasing global id.
      const std::string name = "layer" + std::to_string(l) + "." + tname;
      // On read every replica reads its experts, but only the first replica's count in the
      // checksum; io_dataset sums all pieces, so other replicas read with a separate pass.
      std::string rerr;  // a replica's read error, agreed below by every rank
      if (!write && mesh.dp_rank() != 0) {
        std::vector<Piece<S>> none;
        io_dataset<S>(g, name, {static_cast<hsize_t>(E), a, b}, none, false, comm, which);
        Hid ds(H5Dopen2(g, name.c_str(), H5P_DEFAULT), H5Dclose);
        Transfer t(false);
        for (const auto& pc : pieces) {
          Hid fs(H5Dget_space(ds), H5Sclose);
          std::vector<hsize_t> d3{static_cast<hsize_t>(E), a, b};
          select_flat_range(fs, d3, pc.lo, pc.hi);
          const hsize_t cnt = pc.hi - pc.lo;
          Hid ms(H5Screate_simple(1, &cnt, nullptr), H5Sclose);
          if (rerr.empty() && H5Dread(ds, h5type<S>(), ms, fs, t.dxpl, pc.mem) < 0)
            rerr = "examoe::checkpoint: cannot read dataset '" + name + "'";
          if (rerr.empty()) rerr = bad_element(pc.mem, pc.lo, pc.hi, d3, which, name);
        }
      } else {
        io_dataset<S>(g, name, {static_cast<hsize_t>(E), a, b}, pieces, write, comm, which);
      }
      if (!write) throw_if_any(comm, rerr);
      if (!write && src.size()) from_host(local, src);
      ++ti;
    }
  }
}

}  // namespace

#endif  // EXAMOE_ENABLE_HDF5

// ------------------------------------------------------------------ whole-file integrity
namespace {

constexpr char kMagic[] = "EXAMOE CHECKPOINT\n";

/// Hash of one chunk: a chain of splitmix64 over its little-endian 64-bit words (the last
/// one zero-padded), then its length. Any change confined to one word changes it.
std::uint64_t chunk_hash(const unsigned char* p, std::size_t n, std::uint64_t index) {
  std::uint64_t h = impl::splitmix64(index ^ 0x4578614D6F45ull);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = impl::splitmix64(h ^ w);
  }
  std::uint64_t w = 0;
  std::memcpy(&w, p + i, n - i);
  h = impl::splitmix64(h ^ w);
  return impl::splitmix64(h ^ static_cast<std::uint64_t>(n));
}

/// Reads exactly n bytes at off; "" or the error.
std::string pread_all(int fd, unsigned char* buf, std::size_t n, std::uint64_t off, const std::string& path) {
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(off + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return "examoe::checkpoint: cannot read '" + path + "': " + std::strerror(errno);
    if (r == 0) return "examoe::checkpoint: '" + path + "' ended early while reading it (truncated while in use?)";
    got += static_cast<std::size_t>(r);
  }
  return {};
}

/// Checksum of bytes [kCheckpointHeaderBytes, size) in chunks of `chunk`, chunk c read by
/// rank c % P; the sum over chunks (mod 2^64) is combined with the size. Collective; read
/// errors are agreed (thrown on every rank).
std::uint64_t file_checksum(const std::string& path, std::uint64_t size, std::uint64_t chunk, Communicator& comm) {
  std::string err;
  std::uint64_t sum = 0;
  const std::uint64_t body = size > kCheckpointHeaderBytes ? size - kCheckpointHeaderBytes : 0;
  const std::uint64_t nchunks = (body + chunk - 1) / chunk;
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0 && nchunks > static_cast<std::uint64_t>(comm.rank()))
    err = "examoe::checkpoint: cannot read '" + path + "': " + std::strerror(errno);
  if (fd >= 0) {
    std::vector<unsigned char> buf;
    for (std::uint64_t c = static_cast<std::uint64_t>(comm.rank()); c < nchunks && err.empty();
         c += static_cast<std::uint64_t>(comm.size())) {
      const std::uint64_t off = kCheckpointHeaderBytes + c * chunk;
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(chunk, size - off));
      buf.resize(n);
      err = pread_all(fd, buf.data(), n, off, path);
      if (err.empty()) sum += chunk_hash(buf.data(), n, c);
    }
    ::close(fd);
  }
  throw_if_any(comm, err);
  std::int64_t s = static_cast<std::int64_t>(sum);
  comm.allreduce_sum(&s, 1, DataType::i64);  // wraps modulo 2^64
  return impl::splitmix64(static_cast<std::uint64_t>(s) ^ size);
}

struct Header {
  int format = 0;
  std::uint64_t bytes = 0, chunk = 0, checksum = 0;
  std::uint64_t run = 0;  ///< run id (0 = none: written before run ids)
};

std::string format_header(const Header& h) {
  char text[kCheckpointHeaderBytes] = {};
  int n = std::snprintf(text, sizeof text, "%sformat %d\nbytes %llu\nchunk %llu\nchecksum %016llx\n", kMagic,
                        h.format, static_cast<unsigned long long>(h.bytes), static_cast<unsigned long long>(h.chunk),
                        static_cast<unsigned long long>(h.checksum));
  if (h.run != 0 && n > 0 && n < static_cast<int>(sizeof text))
    std::snprintf(text + n, sizeof text - n, "run %llu\n", static_cast<unsigned long long>(h.run));
  return std::string(text, sizeof text);
}

/// Parses the header block; "" or what is wrong with it. Strict and bounded: lines
/// "key value" after the magic line, up to the first NUL; unknown keys are ignored.
std::string parse_header(const unsigned char* block, Header& h, const std::string& path) {
  const std::string what = "examoe::checkpoint: '" + path + "' ";
  static const unsigned char hdf5_sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  if (std::memcmp(block, kMagic, sizeof kMagic - 1) != 0) {
    if (std::memcmp(block, hdf5_sig, 8) == 0)
      return what + "is an HDF5 file without an ExaMoE header: a checkpoint of format version 1 (before "
                    "whole-file checksums) or not an ExaMoE checkpoint; this ExaMoE reads format version " +
             std::to_string(kCheckpointFormatVersion);
    return what + "is not an ExaMoE checkpoint (no ExaMoE header; a damaged file or another kind of file)";
  }
  std::size_t end = 0;
  while (end < kCheckpointHeaderBytes && block[end] != 0) ++end;
  const std::string text(reinterpret_cast<const char*>(block) + sizeof kMagic - 1,
                         reinterpret_cast<const char*>(block) + end);
  bool have[4] = {false, false, false, false};
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const std::size_t sp = line.find(' ');
    if (sp == std::string::npos) continue;
    const std::string key = line.substr(0, sp), val = line.substr(sp + 1);
    const int base = key == "checksum" ? 16 : 10;
    if (val.empty() || val.size() > 20 || val.find_first_not_of(base == 16 ? "0123456789abcdef" : "0123456789") != std::string::npos)
      return what + "has a damaged ExaMoE header (value of '" + key.substr(0, 20) + "'): the file is corrupt";
    errno = 0;
    const unsigned long long v = std::strtoull(val.c_str(), nullptr, base);
    if (errno != 0) return what + "has a damaged ExaMoE header (value of '" + key.substr(0, 20) + "'): the file is corrupt";
    if (key == "format") {
      h.format = v > 1000000 ? 1000000 : static_cast<int>(v);
      have[0] = true;
    } else if (key == "bytes") {
      h.bytes = v;
      have[1] = true;
    } else if (key == "chunk") {
      h.chunk = v;
      have[2] = true;
    } else if (key == "checksum") {
      h.checksum = v;
      have[3] = true;
    } else if (key == "run") {
      h.run = v;
    }
  }
  if (!have[0]) return what + "has a damaged ExaMoE header (no format): the file is corrupt";
  if (h.format != kCheckpointFormatVersion)
    return what + "has format version " + std::to_string(h.format) + "; this ExaMoE reads version " +
           std::to_string(kCheckpointFormatVersion);
  if (!have[1] || !have[2] || !have[3])
    return what + "has a damaged ExaMoE header (bytes, chunk or checksum missing): the file is corrupt";
  if (h.chunk < 4096 || h.chunk > (std::uint64_t(1) << 32))
    return what + "has a damaged ExaMoE header (chunk " + std::to_string(h.chunk) + "): the file is corrupt";
  return {};
}

/// The run id in a header block (0 if none, or not an ExaMoE header). Lenient: the block is
/// not verified here, only scanned for a well-formed "run N" line.
std::uint64_t header_run(const unsigned char* block, std::size_t n) {
  if (n < sizeof kMagic - 1 || std::memcmp(block, kMagic, sizeof kMagic - 1) != 0) return 0;
  std::size_t end = 0;
  while (end < n && block[end] != 0) ++end;
  std::istringstream lines(std::string(reinterpret_cast<const char*>(block), end));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("run ", 0) != 0) continue;
    const std::string v = line.substr(4);
    if (v.empty() || v.size() > 20 || v.find_first_not_of("0123456789") != std::string::npos) return 0;
    errno = 0;
    const unsigned long long x = std::strtoull(v.c_str(), nullptr, 10);
    return errno == 0 ? x : 0;
  }
  return 0;
}

/// Verifies the header and the whole-file checksum (collective); returns the header.
Header verify_header(const std::string& path, Communicator& comm) {
  std::string err;
  Header h;
  if (comm.rank() == 0) {
    const std::string what = "examoe::checkpoint: '" + path + "' ";
    struct stat st;
    unsigned char block[kCheckpointHeaderBytes];
    if (::stat(path.c_str(), &st) != 0) {
      err = "examoe::checkpoint: cannot read '" + path + "': " + std::strerror(errno);
    } else if (!S_ISREG(st.st_mode)) {
      err = what + "is not a regular file";
    } else if (static_cast<std::uint64_t>(st.st_size) < kCheckpointHeaderBytes) {
      err = what + "is too short to be an ExaMoE checkpoint (" + std::to_string(st.st_size) +
            " bytes; truncated or another kind of file)";
    } else {
      const int fd = ::open(path.c_str(), O_RDONLY);
      if (fd < 0) err = "examoe::checkpoint: cannot read '" + path + "': " + std::strerror(errno);
      else {
        err = pread_all(fd, block, sizeof block, 0, path);
        ::close(fd);
      }
      if (err.empty()) err = parse_header(block, h, path);
      const auto size = static_cast<std::uint64_t>(st.st_size);
      if (err.empty() && size < h.bytes)
        err = what + "is truncated: it has " + std::to_string(size) + " bytes, its header says " + std::to_string(h.bytes);
      else if (err.empty() && size > h.bytes)
        err = what + "is longer than its header says (" + std::to_string(size) + " bytes, not " +
              std::to_string(h.bytes) + "): the file is corrupt";
    }
  }
  throw_if_any(comm, err);
  comm.broadcast(&h, sizeof h, 0);
  if (file_checksum(path, h.bytes, h.chunk, comm) != h.checksum)
    throw Error("examoe::checkpoint: '" + path +
                "' fails its whole-file checksum: the file is corrupt (damaged or edited after it was written)");
  return h;
}

}  // namespace

CheckpointHeaderPeek peek_checkpoint_header(const std::string& path) {
  CheckpointHeaderPeek p;
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return p;
  struct stat st;
  unsigned char block[kCheckpointHeaderBytes] = {0};
  ssize_t n = 0;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) n = ::pread(fd, block, sizeof block, 0);
  ::close(fd);
  if (n < static_cast<ssize_t>(sizeof kMagic - 1) || std::memcmp(block, kMagic, sizeof kMagic - 1) != 0) return p;
  p.is_checkpoint = true;
  const std::uint64_t run = header_run(block, static_cast<std::size_t>(n));
  if (run != 0) p.run_id = std::to_string(run);
  return p;
}

void seal_checkpoint_file(const std::string& path, MPI_Comm mpi_comm, const std::string& run_id) {
  auto comm = make_mpi_communicator(mpi_comm);
  std::string err;
  std::uint64_t size = 0, run = 0;
  if (comm->rank() == 0) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) err = "examoe::checkpoint: cannot seal '" + path + "': " + std::strerror(errno);
    else if (static_cast<std::uint64_t>(st.st_size) < kCheckpointHeaderBytes)
      err = "examoe::checkpoint: cannot seal '" + path + "': shorter than its header";
    else size = static_cast<std::uint64_t>(st.st_size);
    // The run id: the one given, else the one the header already holds (a file being resealed).
    const std::string id = run_id.empty() ? peek_checkpoint_header(path).run_id : run_id;
    if (err.empty() && !id.empty()) {
      errno = 0;
      run = id.find_first_not_of("0123456789") == std::string::npos ? std::strtoull(id.c_str(), nullptr, 10) : 0;
      if (run == 0 || errno != 0) err = "examoe::checkpoint: cannot seal '" + path + "': run id '" + id.substr(0, 40) +
                                        "' is not a positive 64-bit decimal number";
    }
  }
  throw_if_any(*comm, err);
  comm->broadcast(&size, sizeof size, 0);
  Header h;
  h.format = kCheckpointFormatVersion;
  h.bytes = size;
  h.chunk = kCheckpointChecksumChunk;
  h.run = run;
  h.checksum = file_checksum(path, size, h.chunk, *comm);
  if (comm->rank() == 0) {
    const std::string text = format_header(h);
    const int fd = ::open(path.c_str(), O_WRONLY);
    if (fd < 0 || ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size()) || ::fsync(fd) != 0)
      err = "examoe::checkpoint: cannot write the header of '" + path + "': " + std::strerror(errno);
    if (fd >= 0) ::close(fd);
  }
  throw_if_any(*comm, err);
}

void verify_checkpoint_file(const std::string& path, MPI_Comm mpi_comm) {
  auto comm = make_mpi_communicator(mpi_comm);
  verify_header(path, *comm);
}

// ------------------------------------------------------------------ state that may be saved
namespace {

/// The first element of the flat view `v` whose value_problem is not "", or -1.
template <class S>
long long first_bad(const Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space>& v, int which) {
  if (v.size() == 0) return -1;
  long long first = 0;
  Kokkos::parallel_reduce(
      "examoe::checkpoint::find_bad",
      Kokkos::RangePolicy<Kokkos::DefaultExecutionSpace>(0, v.size()),
      KOKKOS_LAMBDA(const std::size_t i, long long& m) {
        const S x = v(i);
        const bool bad = !(x - x == S(0)) || (which == 2 && x < S(0));  // NaN/Inf: x - x is NaN
        if (bad && static_cast<long long>(i) < m) m = static_cast<long long>(i);
      },
      Kokkos::Min<long long>(first));
  return first == std::numeric_limits<long long>::max() ? -1 : first;
}

}  // namespace

template <class S>
std::string find_bad_checkpoint_state(Model<S>& model, const AdamW<S>& opt) {
  using V = Kokkos::View<S*, Kokkos::DefaultExecutionSpace::memory_space>;
  Communicator& comm = model.mesh().world();
  auto& F = model.fsdp();
  std::string found;
  // One value as text: the element at `at` of `v`.
  auto value_at = [](const V& v, long long at) {
    S x{};
    Kokkos::deep_copy(x, Kokkos::subview(v, at));
    return value_text(static_cast<double>(x));
  };
  for (int which = 0; which < 3 && found.empty(); ++which) {
    for (int u = 0; u < F.num_units() && found.empty(); ++u) {
      const V src = which == 0 ? F.shard(u) : which == 1 ? opt.m(u) : opt.v(u);
      const V mine(src.data(), std::min<std::size_t>(src.size(), F.shard_numel(u)));
      const long long at = first_bad<S>(mine, which);
      if (at < 0) continue;
      // The parameter of the unit that holds flat element first + at (padding holds none).
      const std::size_t flat = static_cast<std::size_t>(comm.rank()) * F.shard_numel(u) + static_cast<std::size_t>(at);
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
      found = std::string(group_name(which)) + "/" + where + " = " + value_at(mine, at);
    }
    int ti = F.num_units();
    for (int l = 0; l < model.n_layers() && found.empty(); ++l) {
      auto& m = model.moe(l);
      const std::pair<const char*, typename MoELayer<S>::tensor3> ts[] = {{"w1", m.w1()}, {"w2", m.w2()}, {"w3", m.w3()}};
      for (const auto& [tname, w] : ts) {
        if (model.config().activation != Activation::swiglu && std::string(tname) == "w3") continue;
        const V src = which == 0 ? V(w.data(), w.size()) : which == 1 ? opt.m(ti) : opt.v(ti);
        ++ti;
        const long long at = found.empty() ? first_bad<S>(src, which) : -1;
        if (at < 0) continue;
        const unsigned long long per = w.extent(1) * w.extent(2);
        const int e = m.placement().global_expert(m.communicator().rank(), static_cast<int>(at / per));
        found = std::string(group_name(which)) + "/layer" + std::to_string(l) + "." + tname +
                index_text({static_cast<unsigned long long>(model.config().num_experts), w.extent(1), w.extent(2)},
                           static_cast<unsigned long long>(e) * per + at % per) +
                " = " + value_at(src, at);
      }
    }
  }
  std::string agreed_found = comm.first_error(found);  // the lowest rank's, on every rank
  const std::size_t tag = agreed_found.rfind(" [reported by rank ");
  if (tag != std::string::npos) agreed_found.resize(tag);
  return agreed_found;
}

#if EXAMOE_ENABLE_HDF5
namespace {

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
  agreed(comm, [&] {
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
    for (const auto& k : config_keys()) write_attr_string(g, k.name.c_str(), k.get(cfg));
    d1 = Hid(need(H5Dcreate2(f, "placement", H5T_NATIVE_INT, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create placement"), H5Dclose);
    d2 = Hid(need(H5Dcreate2(f, "tokens_per_expert", H5T_NATIVE_LLONG, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create tokens_per_expert"), H5Dclose);
    d3 = Hid(need(H5Dcreate2(f, "expert_load_ema", H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), "cannot create expert_load_ema"), H5Dclose);
  });
  Transfer t(false);  // independent (rank 0 writes): see io_dataset
  Hid ms(H5Screate_simple(2, dims, nullptr), H5Sclose);
  Hid fs(H5Scopy(sp), H5Sclose);
  if (comm.rank() != 0) {
    H5Sselect_none(ms);
    H5Sselect_none(fs);
  }
  // Every rank calls each write, then the failures are agreed.
  std::string err;
  const std::pair<const char*, herr_t> writes[] = {
      {"placement", H5Dwrite(d1, H5T_NATIVE_INT, ms, fs, t.dxpl, pl.data())},
      {"tokens_per_expert", H5Dwrite(d2, H5T_NATIVE_LLONG, ms, fs, t.dxpl, tk.data())},
      {"expert_load_ema", H5Dwrite(d3, H5T_NATIVE_DOUBLE, ms, fs, t.dxpl, ema.data())}};
  for (const auto& [name, rc] : writes)
    if (rc < 0 && err.empty()) err = std::string("examoe::checkpoint: cannot write ") + name + hdf5_cause();
  throw_if_any(comm, err);
}

/// Bytes a checkpoint of `model` takes at most: the tensors (parameters and two moments), the
/// [layers][experts] tables and a generous allowance for HDF5 metadata per dataset.
template <class S>
std::uint64_t checkpoint_bytes_bound(Model<S>& model, const std::string& placement_history_json) {
  const MemoryReport mr = model.memory();
  const std::uint64_t L = static_cast<std::uint64_t>(model.n_layers());
  const std::uint64_t E = static_cast<std::uint64_t>(model.config().num_experts);
  const std::uint64_t per_layer = model.config().activation == Activation::swiglu ? 3 : 2;
  const std::uint64_t datasets = 3 * (static_cast<std::uint64_t>(model.fsdp().num_params()) + L * per_layer) + 3;
  return 3 * static_cast<std::uint64_t>(mr.dense_total_params + mr.expert_total_params) * sizeof(S) +
         3 * L * E * 8 + datasets * 2048 + placement_history_json.size() + (std::uint64_t(64) << 10);
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
    for (int which = 0; which < 3; ++which) {
      io_tensors<S>(f, model, &opt, nullptr, true, which);
      // Fault injection: a rank killed with the parameters written, the moments not yet.
      if (which == 0 && impl::fault::armed()) impl::fault::at_checkpoint_write(tmp);
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
  const Header header = verify_header(path, *comm);
  CheckpointInfo info;
  if (header.run != 0) info.run_id = std::to_string(header.run);
  std::string err;
  try {
    Hid f = open_file_parallel(path, comm->mpi_comm(), false);
    if (!f.ok()) fail("'" + path + "' cannot be opened");
    if (H5Aexists(f, "format_version") <= 0)
      fail("'" + path + "' is not an ExaMoE checkpoint (no format_version)");
    info.format_version = read_attr<int>(f, "format_version", H5T_NATIVE_INT);
    if (info.format_version != kCheckpointFormatVersion)
      fail("'" + path + "' has format version " + std::to_string(info.format_version) +
           "; this ExaMoE reads version " + std::to_string(kCheckpointFormatVersion));
    info.step = read_attr<long long>(f, "step", H5T_NATIVE_LLONG);
    if (info.step < 0 || info.step > INT_MAX)
      fail("'" + path + "' records step " + std::to_string(info.step) + ", outside [0, 2^31): the file is corrupt");
    info.precision = read_attr_string(f, "precision");
    if (info.precision != "float" && info.precision != "double")
      fail("'" + path + "' records precision '" + info.precision.substr(0, 40) + "' (float or double): the file is corrupt");
    info.world_size = read_attr<int>(f, "world_size", H5T_NATIVE_INT);
    info.dp = read_attr<int>(f, "dp", H5T_NATIVE_INT);
    info.ep = read_attr<int>(f, "ep", H5T_NATIVE_INT);
    if (info.ep < 1 || info.dp < 1 || info.world_size < 1 ||
        static_cast<long long>(info.dp) * info.ep != info.world_size)
      fail("'" + path + "' records a mesh of world_size " + std::to_string(info.world_size) + " = dp " +
           std::to_string(info.dp) + " x ep " + std::to_string(info.ep) + " that does not add up: the file is corrupt");
    info.parameters = read_attr<long long>(f, "parameters", H5T_NATIVE_LLONG);
    info.placement_history = H5Aexists(f, "placement_history") > 0 ? read_attr_string(f, "placement_history") : "[]";
    if (H5Lexists(f, "config", H5P_DEFAULT) <= 0) fail("'" + path + "' has no config group");
    Hid g(H5Gopen2(f, "config", H5P_DEFAULT), H5Gclose);
    for (const auto& k : config_keys())
      if (H5Aexists(g, k.name.c_str()) > 0) info.config.emplace_back(k.name, read_attr_string(g, k.name.c_str()));
    // The [layers][experts] tables: a plausible size (read whole), the same shape each.
    hsize_t table[2] = {0, 0};
    auto table_dims = [&](hid_t ds, const char* dsname, hsize_t* dims) {
      Hid sp(H5Dget_space(ds), H5Sclose);
      if (!sp.ok() || H5Sget_simple_extent_ndims(sp) != 2) fail(std::string("dataset '") + dsname + "' is not [layers][experts]");
      H5Sget_simple_extent_dims(sp, dims, nullptr);
      if (dims[0] < 1 || dims[1] < 1 || dims[0] > (1u << 20) || dims[1] > (1u << 24) || dims[0] * dims[1] > (1u << 26))
        fail(std::string("dataset '") + dsname + "' has an implausible shape [" + std::to_string(dims[0]) + "][" +
             std::to_string(dims[1]) + "]: the file is corrupt");
      if (table[0] == 0) {
        table[0] = dims[0];
        table[1] = dims[1];
      } else if (dims[0] != table[0] || dims[1] != table[1]) {
        fail(std::string("dataset '") + dsname + "' has shape [" + std::to_string(dims[0]) + "][" + std::to_string(dims[1]) +
             "], the other [layers][experts] tables [" + std::to_string(table[0]) + "][" + std::to_string(table[1]) +
             "]: the file is corrupt");
      }
    };
    auto open_ds = [&](const char* dsname) {
      Hid ds(H5Dopen2(f, dsname, H5P_DEFAULT), H5Dclose);
      if (!ds.ok()) fail(std::string("cannot open dataset '") + dsname + "'");
      return ds;
    };
    if (H5Lexists(f, "expert_load_ema", H5P_DEFAULT) > 0) {
      Hid ds = open_ds("expert_load_ema");
      hsize_t dims[2] = {0, 0};
      table_dims(ds, "expert_load_ema", dims);
      std::vector<double> v(dims[0] * dims[1]);
      Transfer t(false);
      if (H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, t.dxpl, v.data()) < 0) fail("cannot read dataset 'expert_load_ema'");
      for (double x : v)
        if (!(x >= 0) || !std::isfinite(x)) fail("dataset 'expert_load_ema' holds " + std::to_string(x) + ": the file is corrupt");
      for (hsize_t l = 0; l < dims[0]; ++l) info.expert_load_ema.emplace_back(v.begin() + l * dims[1], v.begin() + (l + 1) * dims[1]);
    }
    for (const char* dsname : {"placement", "tokens_per_expert"}) {
      if (H5Lexists(f, dsname, H5P_DEFAULT) <= 0) fail(std::string("dataset '") + dsname + "' is missing");
      Hid ds = open_ds(dsname);
      hsize_t dims[2] = {0, 0};
      table_dims(ds, dsname, dims);
      std::vector<long long> v(dims[0] * dims[1]);
      Transfer t(false);
      if (H5Dread(ds, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, t.dxpl, v.data()) < 0)
        fail(std::string("cannot read dataset '") + dsname + "'");
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
  } catch (const Error& e) {
    err = naming(e, path);
  }
  throw_if_any(*comm, err);
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
  std::string err;
  const std::string prec = std::is_same<S, float>::value ? "float" : "double";
  if (info.precision != prec)
    err = "examoe::checkpoint: '" + path + "' holds " + info.precision + " parameters; this run uses " + prec +
          " (set train.precision=" + info.precision + ")";
  for (const auto& [key, value] : info.config) {
    if (key.rfind("model.", 0) != 0 || key.rfind("model.router.", 0) == 0 || key == "model.norm_eps") continue;
    for (const auto& k : config_keys())
      if (k.name == key && k.get(cfg) != value && err.empty())
        err = "examoe::checkpoint: '" + path + "' was written for " + key + " = " + value +
              ", this run has " + key + " = " + k.get(cfg) + ": the model shapes differ";
  }
  throw_if_any(comm, err);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  Hid f = open_file_parallel(path, comm.mpi_comm(), false);
  try {
    if (!f.ok()) fail("'" + path + "' cannot be opened");
    const long long adam_step = read_attr<long long>(f, "adam_step", H5T_NATIVE_LLONG);
    if (adam_step < 0 || adam_step > INT_MAX)
      fail("'" + path + "' records AdamW step " + std::to_string(adam_step) + ", outside [0, 2^31): the file is corrupt");
    opt.set_steps(adam_step);
    for (int which = 0; which < 3; ++which) io_tensors<S>(f, model, nullptr, &opt, false, which);
  } catch (const Error& e) {
    err = naming(e, path);
  }
  throw_if_any(comm, err);
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
template std::string find_bad_checkpoint_state<float>(Model<float>&, const AdamW<float>&);
template std::string find_bad_checkpoint_state<double>(Model<double>&, const AdamW<double>&);
template CheckpointInfo load_checkpoint<float>(const std::string&, Model<float>&, AdamW<float>&, const TrainConfig&);
template CheckpointInfo load_checkpoint<double>(const std::string&, Model<double>&, AdamW<double>&, const TrainConfig&);

}  // namespace examoe
