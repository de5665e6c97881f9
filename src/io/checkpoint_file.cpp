// The checkpoint file as bytes: the header block in front of the HDF5 data and the
// whole-file checksum that seals it (docs/checkpoint-format.md, "Header"); reading, sealing,
// verifying and peeking at it with plain POSIX calls (no HDF5).
#include "io/checkpoint_file.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/random.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace examoe {

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

using Header = io::CheckpointHeader;

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

}  // namespace

io::CheckpointHeader io::verify_checkpoint_header(const std::string& path, Communicator& comm) {
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
  io::verify_checkpoint_header(path, *comm);
}

}  // namespace examoe
