// Token files: the data.format spellings, format detection, and the readers of byte, llm.c
// and headerless uint16 token files, which read what a batch needs with pread (docs/data.md).
// HDF5: token_hdf5.cpp.
#include "train/data_util.hpp"
#include "train/token_file.hpp"

#include <examoe/config.hpp>
#include <examoe/data.hpp>
#include <examoe/error.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <sstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace examoe {

namespace {

constexpr std::int32_t kLlmcMagic = 20240520;
constexpr std::size_t kLlmcHeaderBytes = 256 * 4;
constexpr unsigned char kHdf5Signature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};

/// Little-endian unsigned integer of `width` bytes at `p` (the files are little-endian
/// whatever the host is).
inline std::uint32_t load_le(const unsigned char* p, int width) {
  std::uint32_t v = 0;
  for (int b = width - 1; b >= 0; --b) v = (v << 8) | p[b];
  return v;
}

inline std::int32_t load_le_i32(const unsigned char* p) {
  const std::uint32_t u = load_le(p, 4);
  std::int32_t v;
  std::memcpy(&v, &u, 4);
  return v;
}

bool ends_with(const std::string& s, const std::string& tail) {
  if (s.size() < tail.size()) return false;
  for (std::size_t i = 0; i < tail.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - tail.size() + i])) != tail[i]) return false;
  return true;
}

/// pread of exactly `n` bytes at `off`; throws (prefixed `fn`) on an error or a short read.
void pread_all(const char* fn, int fd, const std::string& path, unsigned char* buf, std::size_t n, std::size_t off) {
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(off + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = errno;
      throw Error(std::string(fn) + ": cannot read '" + clip_for_message(path) + "': " +
                  (r < 0 ? std::string(std::strerror(err)) : "it shrank after it was opened"));
    }
    got += static_cast<std::size_t>(r);
  }
}

/// Tokens of `width` bytes (1, 2 or 4) after a header of `header` bytes, read with pread():
/// a batch reads the windows it needs, the id check the file in 1 MiB chunks. (A read-only
/// mmap would read the same pages, but every page a window touches stays mapped into the
/// process, so the resident set grows towards the file's size as training samples it -- about
/// 4 MiB a step in ExaMoE's tests -- and a file truncated under the mapping kills the process
/// with SIGBUS instead of an error.) The kernel's page cache keeps what is read often.
class PosixTokenFile final : public TokenFile {
 public:
  PosixTokenFile(const std::string& path, TokenFormat format, int fd, std::size_t header, int width,
                 std::uint64_t count)
      : TokenFile(path, format), fd_(fd), header_(header), width_(width), count_(count) {
    // Batches read windows at random offsets: no read-ahead beyond what they ask for.
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
  }
  ~PosixTokenFile() override { ::close(fd_); }
  PosixTokenFile(const PosixTokenFile&) = delete;
  PosixTokenFile& operator=(const PosixTokenFile&) = delete;

  std::uint64_t size() const override { return count_; }

  void read(std::uint64_t first, std::size_t count, int* out) const override {
    if (first > count_ || count > count_ - first)
      throw Error("examoe::TokenFile::read: tokens [" + std::to_string(first) + ", " + std::to_string(first + count) +
                  ") outside the " + std::to_string(count_) + " tokens of '" + clip_for_message(path()) + "'");
    thread_local std::vector<unsigned char> buf;
    buf.resize(count * static_cast<std::size_t>(width_));
    pread_all("examoe::TokenFile::read", fd_, path(), buf.data(), buf.size(), header_ + first * width_);
    const unsigned char* p = buf.data();
    for (std::size_t i = 0; i < count; ++i, p += width_) out[i] = static_cast<int>(load_le(p, width_));
  }

  BadToken scan(std::uint64_t first, std::uint64_t last, int vocab, std::vector<std::int64_t>* counts) const override {
    constexpr std::size_t kChunk = 1 << 20;  // bytes per read
    std::vector<unsigned char> buf(kChunk);
    std::vector<std::uint32_t> ids(kChunk / static_cast<std::size_t>(width_));
    last = std::min(last, count_);
    for (std::uint64_t i = first; i < last;) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(last - i, ids.size()));
      pread_all("examoe::TokenFile::scan", fd_, path(), buf.data(), n * width_, header_ + i * width_);
      for (std::size_t k = 0; k < n; ++k) ids[k] = load_le(buf.data() + k * width_, width_);
      const BadToken bad = impl::data::check_chunk(ids.data(), n, i, vocab, counts);
      if (bad.found) return bad;
      i += n;
    }
    return {};
  }

  std::string describe() const override {
    switch (format()) {
      case TokenFormat::llmc:
        return std::string("llm.c token file version ") + (width_ == 2 ? "1, uint16 ids" : "2, uint32 ids");
      case TokenFormat::uint16: return "headerless uint16 token file";
      default: return "byte file";
    }
  }

  std::string where(std::uint64_t i) const override {
    if (width_ == 1 && header_ == 0) return "byte offset " + std::to_string(i);
    return "token " + std::to_string(i) + " (byte offset " + std::to_string(header_ + i * width_) + ")";
  }

 private:
  int fd_;
  std::size_t header_;
  int width_;
  std::uint64_t count_;
};

/// The first 1024 bytes of an llm.c file checked: magic, version, token count against the size.
/// Returns the token width (2 or 4) and sets `count`.
int check_llmc_header(const char* fn, int fd, const std::string& path, std::size_t bytes, std::uint64_t& count) {
  const std::string F = "'" + clip_for_message(path) + "'";
  if (bytes < kLlmcHeaderBytes)
    throw Error(std::string(fn) + ": " + F + " has " + std::to_string(bytes) +
                " bytes, fewer than llm.c's header of 256 int32 (1024 bytes): not an llm.c token file");
  unsigned char h[kLlmcHeaderBytes];
  pread_all(fn, fd, path, h, sizeof h, 0);
  const std::int32_t magic = load_le_i32(h), version = load_le_i32(h + 4), n = load_le_i32(h + 8);
  if (magic != kLlmcMagic)
    throw Error(std::string(fn) + ": " + F + " does not start with llm.c's magic 20240520 (its first int32 is " +
                std::to_string(magic) + "): not an llm.c token file (headerless uint16 tokens need data.format uint16, "
                "an HDF5 file data.format hdf5)");
  if (version != 1 && version != 2)
    throw Error(std::string(fn) + ": " + F + " is an llm.c token file of version " + std::to_string(version) +
                " (header[1]); known are version 1 (uint16 tokens) and 2 (uint32 tokens)");
  const int width = version == 1 ? 2 : 4;
  if (n <= 0)
    throw Error(std::string(fn) + ": " + F + " records " + std::to_string(n) +
                " tokens (header[2]): an llm.c token file holds at least one token");
  const std::uint64_t need = static_cast<std::uint64_t>(n) * width, have = bytes - kLlmcHeaderBytes;
  if (have != need) {
    std::ostringstream os;
    os << fn << ": " << F << " records " << n << " tokens (header[2]) of " << width << " bytes, " << need
       << " bytes after its 1024-byte header, but holds " << have << " bytes after it: "
       << (have < need ? "the file is truncated" : "it has data after its last token");
    throw Error(os.str());
  }
  count = static_cast<std::uint64_t>(n);
  return width;
}

}  // namespace

std::string to_string(TokenFormat f) {
  switch (f) {
    case TokenFormat::bytes: return "bytes";
    case TokenFormat::llmc: return "llmc";
    case TokenFormat::uint16: return "uint16";
    case TokenFormat::hdf5: return "hdf5";
    case TokenFormat::automatic: return "auto";
  }
  return "auto";
}

TokenFormat token_format_from_string(const std::string& s) {
  for (TokenFormat f : {TokenFormat::bytes, TokenFormat::llmc, TokenFormat::uint16, TokenFormat::hdf5,
                        TokenFormat::automatic})
    if (s == to_string(f)) return f;
  throw Error("examoe::token_format_from_string: unknown data.format '" + clip_for_message(s) +
              "' (expected bytes, llmc, uint16, hdf5 or auto)");
}

TokenFormat detect_token_format(const std::string& path) {
  if (ends_with(path, ".h5") || ends_with(path, ".hdf5")) return TokenFormat::hdf5;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) return TokenFormat::bytes;
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return TokenFormat::bytes;
  unsigned char h[8] = {0};
  ssize_t got = 0;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    do got = ::pread(fd, h, sizeof h, 0);
    while (got < 0 && errno == EINTR);
  }
  ::close(fd);
  if (got == 8 && std::memcmp(h, kHdf5Signature, 8) == 0) return TokenFormat::hdf5;
  if (got >= 4 && load_le_i32(h) == kLlmcMagic) return TokenFormat::llmc;
  return TokenFormat::bytes;
}

std::unique_ptr<TokenFile> open_token_file(const std::string& path, TokenFormat format, const std::string& dataset,
                                           const char* key) {
  const char* fn = "examoe::open_token_file";
  if (format == TokenFormat::automatic) format = detect_token_format(path);
  if (format == TokenFormat::hdf5) return impl::data::open_hdf5_token_file(fn, path, dataset, key);
  const std::string F = "'" + clip_for_message(path) + "'";
  if (!dataset.empty())
    throw Error(std::string(fn) + ": data.dataset ('" + clip_for_message(dataset) +
                "') names a dataset of an HDF5 file, but " + F + " is read as " + to_string(format) +
                " (data.format " + to_string(format) + "); leave data.dataset empty or use an HDF5 file");
  std::size_t bytes = 0;
  const int fd = impl::data::open_regular_file(fn, path, bytes, key);
  std::uint64_t count = 0;
  int width = 1;
  std::size_t header = 0;
  try {
    if (format == TokenFormat::llmc) {
      width = check_llmc_header(fn, fd, path, bytes, count);
      header = kLlmcHeaderBytes;
    } else if (format == TokenFormat::uint16) {
      if (bytes % 2 != 0)
        throw Error(std::string(fn) + ": " + F + " has " + std::to_string(bytes) +
                    " bytes, an odd number: a uint16 token file holds 2 bytes per token (a byte file needs "
                    "data.format bytes)");
      unsigned char h[4] = {0};
      pread_all(fn, fd, path, h, bytes >= 4 ? 4 : bytes, 0);
      if (bytes >= kLlmcHeaderBytes && load_le_i32(h) == kLlmcMagic)
        throw Error(std::string(fn) + ": " + F + " starts with llm.c's magic 20240520: it is an llm.c token file, "
                    "whose 1024-byte header data.format uint16 would read as tokens; use data.format llmc (or auto)");
      width = 2;
      count = bytes / 2;
    } else {
      count = bytes;
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  return std::make_unique<PosixTokenFile>(path, format, fd, header, width, count);
}

#if !EXAMOE_ENABLE_HDF5
namespace impl::data {
std::unique_ptr<TokenFile> open_hdf5_token_file(const char* fn, const std::string& path, const std::string&,
                                                const char*) {
  throw Error(std::string(fn) + ": '" + clip_for_message(path) +
              "' is read as HDF5 (data.format hdf5, or auto for a .h5 name or the HDF5 signature), but this ExaMoE "
              "was built without HDF5 (ExaMoE_ENABLE_HDF5=OFF)");
}
}  // namespace impl::data
#endif

}  // namespace examoe
