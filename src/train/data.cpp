#include "train/data_util.hpp"

#include <examoe/data.hpp>
#include <examoe/impl/files.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/error.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <limits>
#include <sstream>
#include <unordered_set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace examoe {

std::uint64_t splitmix64(std::uint64_t x) noexcept { return impl::splitmix64(x); }

namespace impl::data {

int open_regular_file(const char* fn, const std::string& path, std::size_t& size, const char* key) {
  const std::string name = "'" + clip_for_message(path) + "'";
  auto refuse_kind = [&](mode_t mode) {
    throw Error(std::string(fn) + ": " + name + " is " + impl::file_kind(mode) + ", not a regular file (" + key +
                " must name a file)");
  };
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    throw Error(std::string(fn) + ": cannot open " + name + ": " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) refuse_kind(st.st_mode);
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw Error(std::string(fn) + ": cannot open " + name + ": " + std::strerror(err));
  }
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(std::string(fn) + ": cannot open " + name + ": " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    refuse_kind(st.st_mode);
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw Error(std::string(fn) + ": " + name + " is empty");
  }
  size = static_cast<std::size_t>(st.st_size);
  return fd;
}

}  // namespace impl::data

namespace {

using impl::data::below;
using impl::data::check_range;
using impl::data::entropy_of;
using impl::data::kTagFile;
using impl::data::mix;
using impl::data::reset_batch;
using impl::data::val_part_of;

// Domain-separation tags: each use of the seed gets its own key.
constexpr std::uint64_t kTagHeldOut = 0x486F6C644F757421ull;  // "HoldOut!"
constexpr std::uint64_t kTagTrain = 0x547261696E696E67ull;    // "Training"
constexpr std::uint64_t kTagVal = 0x56616C6964617465ull;      // "Validate"
constexpr std::uint64_t kTagSample = 0x53616D706C696E67ull;   // "Sampling"

int open_regular_file(const char* fn, const std::string& path, std::size_t& size) {
  return impl::data::open_regular_file(fn, path, size);
}

/// Reversed decimal digits of c (least significant first).
void append_reversed(std::string& s, std::int64_t c) {
  do {
    s.push_back(static_cast<char>('0' + c % 10));
    c /= 10;
  } while (c > 0);
}

/// Appends the answer bytes of a+b (reversed digits of the sum and '\n') to a histogram.
void count_answer(std::array<std::uint64_t, 256>& counts, std::int64_t c) {
  do {
    ++counts[static_cast<unsigned char>('0' + c % 10)];
    c /= 10;
  } while (c > 0);
  ++counts[static_cast<unsigned char>('\n')];
}

/// Writes problem text `s` at position `pos` of row `row` of `out`: tokens, answer targets
/// and (if sample >= 0) sample_of_row at the target rows.
void write_problem(Batch& out, int row, int pos, const std::string& s, int sample) {
  const std::size_t base = static_cast<std::size_t>(row) * out.seq_len + pos;
  const std::size_t len = s.size();
  const std::size_t eq = s.find('=');
  for (std::size_t i = 0; i < len; ++i) out.tokens[base + i] = static_cast<unsigned char>(s[i]);
  // Target at position i is byte i+1: from the '=' (predicts c's first digit) to c's last
  // digit (predicts the final '\n').
  for (std::size_t i = eq; i + 1 < len; ++i) {
    out.targets[base + i] = static_cast<unsigned char>(s[i + 1]);
    out.sample_of_row[base + i] = sample;
  }
}

}  // namespace

void Corpus::check(int seq_len) const {
  if (seq_len < 1) {
    throw Error("examoe::Corpus::check: seq_len (" + std::to_string(seq_len) +
                ") must be >= 1");
  }
}

// ------------------------------------------------------------------------------------------
// AdditionCorpus
// ------------------------------------------------------------------------------------------

AdditionCorpus::AdditionCorpus(std::uint64_t seed, int digits, int num_val_problems)
    : seed_(seed), digits_(digits) {
  const char* fn = "examoe::AdditionCorpus::AdditionCorpus";
  if (digits < 1 || digits > 6) {
    throw Error(std::string(fn) + ": digits (" + std::to_string(digits) +
                ") must be in [1, 6]");
  }
  constexpr int kMaxValProblems = 1000000;
  if (num_val_problems < 1 || num_val_problems > kMaxValProblems) {
    throw Error(std::string(fn) + ": num_val_problems (" + std::to_string(num_val_problems) +
                ") must be in [1, " + std::to_string(kMaxValProblems) + "]");
  }
  base_ = 1;
  for (int i = 0; i < digits; ++i) base_ *= 10;
  seed_mix_ = splitmix64(seed ^ kTagHeldOut);
  seed_train_ = splitmix64(seed ^ kTagTrain);
  const std::uint64_t seed_val = splitmix64(seed ^ kTagVal);
  const std::uint64_t space = static_cast<std::uint64_t>(base_) * static_cast<std::uint64_t>(base_);

  std::array<std::uint64_t, 256> counts{};
  if (digits <= 3) {
    // Small problem space (<= 10^6): enumerate it. Exact entropy over the training problems,
    // exact held-out list, validation problems = a seeded partial Fisher-Yates shuffle of it.
    std::vector<std::pair<std::int64_t, std::int64_t>> held;
    for (std::int64_t a = 0; a < base_; ++a) {
      for (std::int64_t b = 0; b < base_; ++b) {
        if (is_held_out(a, b)) {
          held.emplace_back(a, b);
        } else {
          count_answer(counts, a + b);
        }
      }
    }
    num_held_out_ = static_cast<std::int64_t>(held.size());
    if (held.size() == space) {
      throw Error(std::string(fn) + ": seed " + std::to_string(seed) +
                  " holds out every problem of " + std::to_string(digits) +
                  " digit(s); choose another seed");
    }
    if (static_cast<std::size_t>(num_val_problems) > held.size()) {
      throw Error(std::string(fn) + ": num_val_problems (" + std::to_string(num_val_problems) +
                  ") exceeds the " + std::to_string(held.size()) + " held-out problems of " +
                  std::to_string(digits) + " digit(s) with seed " + std::to_string(seed));
    }
    for (std::size_t i = 0; i < static_cast<std::size_t>(num_val_problems); ++i) {
      const std::size_t j = i + below(mix(seed_val, i), held.size() - i);
      std::swap(held[i], held[j]);
    }
    held.resize(static_cast<std::size_t>(num_val_problems));
    val_problems_ = std::move(held);
  } else {
    // Large problem space: rejection-sample distinct held-out problems (10% of >= 10^8, far
    // more than the 10^6 allowed), and estimate the entropy from 2^20 training problems.
    std::unordered_set<std::uint64_t> seen;
    val_problems_.reserve(static_cast<std::size_t>(num_val_problems));
    for (std::uint64_t i = 0; static_cast<int>(val_problems_.size()) < num_val_problems; ++i) {
      const std::uint64_t code = below(mix(seed_val, i), space);
      const std::int64_t a = static_cast<std::int64_t>(code) / base_;
      const std::int64_t b = static_cast<std::int64_t>(code) % base_;
      if (!is_held_out(a, b) || !seen.insert(code).second) continue;
      val_problems_.emplace_back(a, b);
    }
    const std::uint64_t sample_key = splitmix64(seed ^ kTagSample);
    for (std::uint64_t k = 0; k < (1u << 20); ++k) {
      for (std::uint64_t r = 0;; ++r) {
        const std::uint64_t code = below(mix(mix(sample_key, k), r), space);
        const std::int64_t a = static_cast<std::int64_t>(code) / base_;
        const std::int64_t b = static_cast<std::int64_t>(code) % base_;
        if (is_held_out(a, b)) continue;
        count_answer(counts, a + b);
        break;
      }
    }
  }
  entropy_ = entropy_of(counts);
}

bool AdditionCorpus::is_held_out(std::int64_t a, std::int64_t b) const {
  const std::uint64_t code = static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(base_) +
                             static_cast<std::uint64_t>(b);
  return splitmix64(seed_mix_ ^ code) % 10 == 0;
}

std::pair<std::int64_t, std::int64_t> AdditionCorpus::val_problem(int i) const {
  if (i < 0 || i >= num_val_problems()) {
    throw Error("examoe::AdditionCorpus::val_problem: index " + std::to_string(i) +
                " outside [0, " + std::to_string(num_val_problems()) + ")");
  }
  return val_problems_[static_cast<std::size_t>(i)];
}

std::string AdditionCorpus::format_problem(std::int64_t a, std::int64_t b) {
  std::string s = std::to_string(a);
  s.push_back('+');
  s += std::to_string(b);
  s.push_back('=');
  append_reversed(s, a + b);
  s.push_back('\n');
  return s;
}

std::pair<std::int64_t, std::int64_t> AdditionCorpus::train_problem(std::uint64_t step,
                                                                    std::uint64_t seq,
                                                                    std::uint64_t k) const {
  const std::uint64_t space = static_cast<std::uint64_t>(base_) * static_cast<std::uint64_t>(base_);
  const std::uint64_t key = mix(mix(mix(seed_train_, step), seq), k);
  std::uint64_t code = 0;
  for (std::uint64_t r = 0; r < 1000; ++r) {  // each redraw is held out with probability 0.1
    code = below(mix(key, r), space);
    const std::int64_t a = static_cast<std::int64_t>(code) / base_;
    const std::int64_t b = static_cast<std::int64_t>(code) % base_;
    if (!is_held_out(a, b)) return {a, b};
  }
  // Practically unreachable (probability 1e-1000): walk to the next training problem. The
  // constructor made sure one exists for digits <= 3; larger spaces have ~90% of them.
  for (std::uint64_t i = 1; i <= space; ++i) {
    const std::uint64_t c = (code + i) % space;
    const std::int64_t a = static_cast<std::int64_t>(c) / base_;
    const std::int64_t b = static_cast<std::int64_t>(c) % base_;
    if (!is_held_out(a, b)) return {a, b};
  }
  throw Error("examoe::AdditionCorpus::train_batch: no training problem left");
}

void AdditionCorpus::check_seq_len(const char* fn, int seq_len) const {
  if (seq_len < max_problem_length()) {
    std::ostringstream os;
    os << fn << ": seq_len (" << seq_len << ") is shorter than the longest " << digits_
       << "-digit addition problem (" << max_problem_length() << " bytes, e.g. \""
       << std::string(static_cast<std::size_t>(digits_), '9') << "+"
       << std::string(static_cast<std::size_t>(digits_), '9') << "=...\\n\")";
    throw Error(os.str());
  }
}

void AdditionCorpus::check(int seq_len) const {
  check_seq_len("examoe::AdditionCorpus::check", seq_len);
}

void AdditionCorpus::train_batch(std::uint64_t step, int first, int count, int seq_len,
                                 Batch& out) const {
  const char* fn = "examoe::AdditionCorpus::train_batch";
  check_seq_len(fn, seq_len);
  check_range(fn, first, count);
  reset_batch(out, count, seq_len, '\n');
  for (int row = 0; row < count; ++row) {
    const std::uint64_t seq = static_cast<std::uint64_t>(first) + static_cast<std::uint64_t>(row);
    int pos = 0;
    for (std::uint64_t k = 0;; ++k) {
      const auto [a, b] = train_problem(step, seq, k);
      const std::string s = format_problem(a, b);
      if (pos + static_cast<int>(s.size()) > seq_len) break;  // tail stays '\n' / -1
      write_problem(out, row, pos, s, -1);
      pos += static_cast<int>(s.size());
    }
  }
}

const std::vector<int>& AdditionCorpus::val_starts(int seq_len) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto it = val_starts_cache_.find(seq_len);
  if (it != val_starts_cache_.end()) return it->second;
  // Greedy packing in problem order: a sequence takes whole problems while they fit.
  std::vector<int> starts;
  int pos = seq_len;  // forces a new sequence for problem 0
  for (int p = 0; p < num_val_problems(); ++p) {
    const auto [a, b] = val_problems_[static_cast<std::size_t>(p)];
    const int len = static_cast<int>(format_problem(a, b).size());
    if (pos + len > seq_len) {
      starts.push_back(p);
      pos = 0;
    }
    pos += len;
  }
  starts.push_back(num_val_problems());  // sentinel: end of the last sequence
  return val_starts_cache_.emplace(seq_len, std::move(starts)).first->second;
}

int AdditionCorpus::num_val_sequences(int seq_len) const {
  check_seq_len("examoe::AdditionCorpus::num_val_sequences", seq_len);
  return static_cast<int>(val_starts(seq_len).size()) - 1;
}

void AdditionCorpus::val_batch(int first, int count, int seq_len, Batch& out) const {
  const char* fn = "examoe::AdditionCorpus::val_batch";
  check_seq_len(fn, seq_len);
  check_range(fn, first, count);
  const std::vector<int>& starts = val_starts(seq_len);
  const int nseq = static_cast<int>(starts.size()) - 1;
  if (static_cast<std::int64_t>(first) + count > nseq) {
    std::ostringstream os;
    os << fn << ": sequences [" << first << ", " << static_cast<std::int64_t>(first) + count
       << ") exceed the " << nseq << " validation sequences of seq_len " << seq_len;
    throw Error(os.str());
  }
  reset_batch(out, count, seq_len, '\n');
  for (int row = 0; row < count; ++row) {
    const int s = first + row;
    int pos = 0;
    for (int p = starts[static_cast<std::size_t>(s)]; p < starts[static_cast<std::size_t>(s) + 1];
         ++p) {
      const auto [a, b] = val_problems_[static_cast<std::size_t>(p)];
      const std::string text = format_problem(a, b);
      write_problem(out, row, pos, text, p);
      pos += static_cast<int>(text.size());
    }
  }
}

std::string AdditionCorpus::describe() const {
  std::ostringstream os;
  os << "addition: " << digits_ << "-digit a+b=c with c reversed (least significant digit "
     << "first), " << base_ * base_ << " problems, ";
  if (num_held_out_ >= 0) {
    os << num_held_out_ << " held out";
  } else {
    os << "~10% held out";
  }
  os << ", " << num_val_problems() << " validation problems, seed " << seed_
     << ", unigram target entropy " << std::fixed << std::setprecision(4) << entropy_
     << " nats" << (entropy_is_exact() ? "" : " (sampled)");
  return os.str();
}

void Corpus::check_vocab(Communicator&, int) {}

void AdditionCorpus::check_vocab(Communicator&, int vocab) {
  // The largest byte of "a+b=c\n" is '=' (61).
  if (vocab <= '=')
    throw Error("examoe::AdditionCorpus::check_vocab: model.vocab_size (" + std::to_string(vocab) +
                ") is too small for the built-in addition corpus: its tokens are the bytes '\\n' (10), '+' (43), "
                "'0'-'9' (48-57) and '=' (61), so model.vocab_size must be at least 62 (256 by default)");
}

// ------------------------------------------------------------------------------------------
// FileCorpus
// ------------------------------------------------------------------------------------------

FileCorpus::FileCorpus(const std::string& path, std::uint64_t seed, double val_fraction)
    : path_(path), seed_(splitmix64(seed ^ kTagFile)), val_fraction_(val_fraction) {
  const char* fn = "examoe::FileCorpus";
  if (!(val_fraction > 0.0 && val_fraction <= 0.5)) {
    std::ostringstream os;
    os << fn << ": val_fraction (" << val_fraction << ") for '" << clip_for_message(path)
       << "' must be in (0, 0.5]";
    throw Error(os.str());
  }
  std::size_t size = 0;
  const int fd = open_regular_file(fn, path, size);
  // Exactly the size stat() gave: a file that grows while it is read is read as it was.
  data_.resize(size);
  std::size_t got = 0;
  while (got < size) {
    const ssize_t r = ::read(fd, data_.data() + got, size - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = errno;
      ::close(fd);
      throw Error(std::string(fn) + ": cannot read '" + clip_for_message(path) + "': " +
                  (r < 0 ? std::string(std::strerror(err))
                         : "it shrank while being read (" + std::to_string(got) + " of " +
                               std::to_string(size) + " bytes)"));
    }
    got += static_cast<std::size_t>(r);
  }
  ::close(fd);
  train_bytes_ = data_.size() - val_part_size(data_.size());

  std::array<std::uint64_t, 256> counts{};
  for (std::size_t i = 0; i < train_bytes_; ++i) ++counts[data_[i]];
  entropy_ = entropy_of(counts);
}

std::size_t FileCorpus::val_part_size(std::size_t file_size) const {
  return val_part_of(file_size, val_fraction_);
}

std::size_t FileCorpus::file_size(const std::string& path) {
  std::size_t size = 0;
  ::close(open_regular_file("examoe::FileCorpus", path, size));
  return size;
}

long long FileCorpus::val_sequences(std::size_t bytes, double val_fraction, int seq_len) {
  if (seq_len < 1 || bytes == 0 || !(val_fraction > 0.0 && val_fraction <= 0.5)) return 0;
  const std::size_t val = val_part_of(bytes, val_fraction);
  const std::size_t need = static_cast<std::size_t>(seq_len) + 1;
  if (val < need || bytes - val < need) return 0;
  const std::size_t n = (val - 1) / static_cast<std::size_t>(seq_len);
  return static_cast<long long>(std::min<std::size_t>(n, std::numeric_limits<int>::max()));
}

std::size_t FileCorpus::min_file_size(int seq_len) const {
  const std::size_t need = static_cast<std::size_t>(std::max(seq_len, 0)) + 1;
  // Both parts grow monotonically with the file size; start just below the bound
  // ceil(n * val_fraction) >= need  <=>  n > (need - 1) / val_fraction and walk up.
  const double lower = static_cast<double>(need - 1) / val_fraction_ - 2.0;
  if (lower > 1e18) return std::numeric_limits<std::size_t>::max();  // absurd val_fraction
  std::size_t n = lower > 1.0 ? static_cast<std::size_t>(lower) : 1;
  n = std::max(n, 2 * need - 2);
  while (val_part_size(n) < need || n - val_part_size(n) < need) ++n;
  return n;
}

void FileCorpus::check_seq_len(const char* fn, int seq_len) const {
  if (seq_len < 1) {
    throw Error(std::string(fn) + ": seq_len (" + std::to_string(seq_len) + ") must be >= 1");
  }
  const std::size_t need = static_cast<std::size_t>(seq_len) + 1;
  if (train_bytes_ < need || val_bytes() < need) {
    std::ostringstream os;
    os << fn << ": '" << clip_for_message(path_) << "' (" << data_.size() << " bytes) is too short for seq_len "
       << seq_len << ": its training part has " << train_bytes_ << " bytes and its validation "
       << "part " << val_bytes() << " (val_fraction " << val_fraction_ << "), each needs at "
       << "least seq_len+1 = " << need << " bytes; the file needs at least "
       << min_file_size(seq_len) << " bytes";
    throw Error(os.str());
  }
}

void FileCorpus::check(int seq_len) const { check_seq_len("examoe::FileCorpus::check", seq_len); }

std::size_t FileCorpus::train_offset(std::uint64_t step, std::uint64_t seq, int seq_len) const {
  // Valid window starts: 0 .. train_bytes - (seq_len+1).
  const std::uint64_t starts = train_bytes_ - static_cast<std::size_t>(seq_len);
  return static_cast<std::size_t>(below(mix(mix(seed_, step), seq), starts));
}

void FileCorpus::train_batch(std::uint64_t step, int first, int count, int seq_len,
                             Batch& out) const {
  const char* fn = "examoe::FileCorpus::train_batch";
  check_seq_len(fn, seq_len);
  check_range(fn, first, count);
  reset_batch(out, count, seq_len, 0);
  for (int row = 0; row < count; ++row) {
    const std::uint64_t seq = static_cast<std::uint64_t>(first) + static_cast<std::uint64_t>(row);
    const std::size_t off = train_offset(step, seq, seq_len);
    const std::size_t base = static_cast<std::size_t>(row) * seq_len;
    for (int i = 0; i < seq_len; ++i) {
      out.tokens[base + i] = data_[off + i];
      out.targets[base + i] = data_[off + i + 1];
    }
  }
}

int FileCorpus::num_val_sequences(int seq_len) const {
  check_seq_len("examoe::FileCorpus::num_val_sequences", seq_len);
  const std::size_t n = (val_bytes() - 1) / static_cast<std::size_t>(seq_len);
  return static_cast<int>(std::min<std::size_t>(n, std::numeric_limits<int>::max()));
}

void FileCorpus::val_batch(int first, int count, int seq_len, Batch& out) const {
  const char* fn = "examoe::FileCorpus::val_batch";
  check_seq_len(fn, seq_len);
  check_range(fn, first, count);
  const int nseq = num_val_sequences(seq_len);
  if (static_cast<std::int64_t>(first) + count > nseq) {
    std::ostringstream os;
    os << fn << ": sequences [" << first << ", " << static_cast<std::int64_t>(first) + count
       << ") exceed the " << nseq << " validation sequences of seq_len " << seq_len << " in '"
       << clip_for_message(path_) << "'";
    throw Error(os.str());
  }
  reset_batch(out, count, seq_len, 0);
  for (int row = 0; row < count; ++row) {
    const std::size_t off =
        train_bytes_ + static_cast<std::size_t>(first + row) * static_cast<std::size_t>(seq_len);
    const std::size_t base = static_cast<std::size_t>(row) * seq_len;
    for (int i = 0; i < seq_len; ++i) {
      out.tokens[base + i] = data_[off + i];
      out.targets[base + i] = data_[off + i + 1];
    }
  }
}

void FileCorpus::check_vocab(Communicator&, int vocab) {
  if (vocab >= 256) return;
  for (std::size_t i = 0; i < data_.size(); ++i)
    if (data_[i] >= vocab) {
      std::ostringstream os;
      os << "examoe::FileCorpus::check_vocab: byte " << static_cast<int>(data_[i]) << " at offset " << i << " of '"
         << clip_for_message(path_) << "' is outside the vocabulary [0, " << vocab << ") (model.vocab_size = "
         << vocab << "; a byte file needs model.vocab_size 256 unless all its bytes are smaller)";
      throw Error(os.str());
    }
}

std::string FileCorpus::describe() const {
  std::ostringstream os;
  os << "file '" << clip_for_message(path_) << "': " << data_.size() << " bytes (training " << train_bytes_
     << ", validation " << val_bytes() << "), unigram entropy " << std::fixed
     << std::setprecision(4) << entropy_ << " nats";
  return os.str();
}

}  // namespace examoe
