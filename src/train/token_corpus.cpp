// TokenCorpus: token files (llm.c, uint16, HDF5, bytes read in pieces) as training and validation
// sequences, with FileCorpus's counter-based sampling; the id check split over the ranks.
#include "train/data_util.hpp"
#include "train/token_file.hpp"

#include <examoe/comm.hpp>
#include <examoe/data.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>

#include <climits>
#include <unistd.h>
#include <iomanip>
#include <limits>
#include <sstream>

namespace examoe {

using impl::data::below;
using impl::data::mix;

TokenCorpus::TokenCorpus(std::shared_ptr<const TokenFile> train, std::shared_ptr<const TokenFile> val,
                         std::uint64_t seed, double val_fraction, int max_val_sequences)
    : train_(std::move(train)), val_(std::move(val)), seed_(splitmix64(seed ^ impl::data::kTagFile)),
      val_fraction_(val_fraction), max_val_(max_val_sequences), entropy_(std::numeric_limits<double>::quiet_NaN()) {
  const char* fn = "examoe::TokenCorpus";
  if (!train_) throw Error(std::string(fn) + ": no training file");
  if (max_val_sequences < 0)
    throw Error(std::string(fn) + ": max_val_sequences (" + std::to_string(max_val_sequences) + ") must be >= 0");
  if (val_) {
    train_tokens_ = train_->size();
    val_tokens_ = val_->size();
    val_begin_ = 0;
    return;
  }
  if (!(val_fraction > 0.0 && val_fraction <= 0.5)) {
    std::ostringstream os;
    os << fn << ": val_fraction (" << val_fraction << ") for '" << clip_for_message(train_->path())
       << "' must be in (0, 0.5]";
    throw Error(os.str());
  }
  val_ = train_;
  val_tokens_ = impl::data::val_part_of(train_->size(), val_fraction);
  train_tokens_ = train_->size() - val_tokens_;
  val_begin_ = train_tokens_;
}

long long TokenCorpus::val_sequences(std::uint64_t train_tokens, std::uint64_t val_tokens, int seq_len,
                                     int max_val_sequences) {
  if (seq_len < 1) return 0;
  const std::uint64_t need = static_cast<std::uint64_t>(seq_len) + 1;
  if (train_tokens < need || val_tokens < need) return 0;
  std::uint64_t n = std::min<std::uint64_t>((val_tokens - 1) / static_cast<std::uint64_t>(seq_len), INT_MAX);
  if (max_val_sequences > 0) n = std::min<std::uint64_t>(n, static_cast<std::uint64_t>(max_val_sequences));
  return static_cast<long long>(n);
}

std::uint64_t TokenCorpus::val_offset(int i, int seq_len) const {
  const std::uint64_t windows = (val_tokens_ - 1) / static_cast<std::uint64_t>(seq_len);
  const std::uint64_t m = static_cast<std::uint64_t>(num_val_sequences(seq_len));
  const std::uint64_t w = static_cast<std::uint64_t>(
      static_cast<impl::data::u128>(static_cast<std::uint64_t>(i)) * windows / m);  // = i when m = windows
  return val_begin_ + w * static_cast<std::uint64_t>(seq_len);
}

void TokenCorpus::check_seq_len(const char* fn, int seq_len) const {
  if (seq_len < 1) throw Error(std::string(fn) + ": seq_len (" + std::to_string(seq_len) + ") must be >= 1");
  const std::uint64_t need = static_cast<std::uint64_t>(seq_len) + 1;
  if (train_tokens_ >= need && val_tokens_ >= need) return;
  std::ostringstream os;
  os << fn << ": ";
  if (val_ == train_)
    os << "'" << clip_for_message(train_->path()) << "' holds " << train_->size() << " tokens, too few for seq_len "
       << seq_len << ": its training part has " << train_tokens_ << " tokens and its validation part " << val_tokens_
       << " (val_fraction " << val_fraction_ << ")";
  else
    os << "the training file '" << clip_for_message(train_->path()) << "' holds " << train_tokens_
       << " tokens and the validation file '" << clip_for_message(val_->path()) << "' " << val_tokens_
       << ", too few for seq_len " << seq_len;
  os << "; each part needs at least seq_len+1 = " << need << " tokens";
  throw Error(os.str());
}

void TokenCorpus::check(int seq_len) const { check_seq_len("examoe::TokenCorpus::check", seq_len); }

std::uint64_t TokenCorpus::train_offset(std::uint64_t step, std::uint64_t seq, int seq_len) const {
  // Valid window starts: 0 .. train_tokens - (seq_len+1).
  const std::uint64_t starts = train_tokens_ - static_cast<std::uint64_t>(seq_len);
  return below(mix(mix(seed_, step), seq), starts);
}

void TokenCorpus::read_window(const TokenFile& file, std::uint64_t off, int row, int seq_len, Batch& out) const {
  thread_local std::vector<int> window;
  window.resize(static_cast<std::size_t>(seq_len) + 1);
  file.read(off, window.size(), window.data());
  const std::size_t base = static_cast<std::size_t>(row) * static_cast<std::size_t>(seq_len);
  for (int i = 0; i < seq_len; ++i) {
    out.tokens[base + i] = window[i];
    out.targets[base + i] = window[i + 1];
  }
}

void TokenCorpus::train_batch(std::uint64_t step, int first, int count, int seq_len, Batch& out) const {
  const char* fn = "examoe::TokenCorpus::train_batch";
  check_seq_len(fn, seq_len);
  impl::data::check_range(fn, first, count);
  impl::data::reset_batch(out, count, seq_len, 0);
  for (int row = 0; row < count; ++row) {
    const std::uint64_t seq = static_cast<std::uint64_t>(first) + static_cast<std::uint64_t>(row);
    read_window(*train_, train_offset(step, seq, seq_len), row, seq_len, out);
  }
}

int TokenCorpus::num_val_sequences(int seq_len) const {
  check_seq_len("examoe::TokenCorpus::num_val_sequences", seq_len);
  return static_cast<int>(val_sequences(train_tokens_, val_tokens_, seq_len, max_val_));
}

void TokenCorpus::val_batch(int first, int count, int seq_len, Batch& out) const {
  const char* fn = "examoe::TokenCorpus::val_batch";
  check_seq_len(fn, seq_len);
  impl::data::check_range(fn, first, count);
  const int nseq = num_val_sequences(seq_len);
  if (static_cast<std::int64_t>(first) + count > nseq) {
    std::ostringstream os;
    os << fn << ": sequences [" << first << ", " << static_cast<std::int64_t>(first) + count << ") exceed the " << nseq
       << " validation sequences of seq_len " << seq_len << " in '" << clip_for_message(val_->path()) << "'";
    throw Error(os.str());
  }
  impl::data::reset_batch(out, count, seq_len, 0);
  for (int row = 0; row < count; ++row) {
    read_window(*val_, val_offset(first + row, seq_len), row, seq_len, out);
  }
}

void TokenCorpus::check_vocab(Communicator& comm, int vocab) {
  const char* fn = "examoe::TokenCorpus::check_vocab";
  // The tokens in order, training part then validation part, cut into one contiguous range
  // per rank: the lowest rank that finds a bad id holds the first one.
  const std::uint64_t total = train_tokens_ + val_tokens_;
  const auto cut = [&](int r) {
    return static_cast<std::uint64_t>(static_cast<impl::data::u128>(total) * static_cast<unsigned>(r) /
                                      static_cast<unsigned>(comm.size()));
  };
  const std::uint64_t lo = cut(comm.rank()), hi = cut(comm.rank() + 1);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(vocab), 0);
  impl::agree(comm, [&] {
    const bool separate = val_ != train_;
    auto report = [&](const TokenFile& file, const char* which, const BadToken& bad) {
      if (!bad.found) return;
      std::ostringstream os;
      os << fn << ": token id " << bad.value << " at " << file.where(bad.index) << " of " << which << "'"
         << clip_for_message(file.path()) << "' is outside the vocabulary [0, " << vocab << ") (model.vocab_size = "
         << vocab << "; the first such id" << (separate ? ", the training file read before the validation file" : "")
         << ")";
      throw Error(os.str());
    };
    if (lo < train_tokens_)
      report(*train_, separate ? "the training file " : "", train_->scan(lo, std::min(hi, train_tokens_), vocab, &counts));
    if (hi > train_tokens_) {
      const std::uint64_t a = std::max(lo, train_tokens_) - train_tokens_, b = hi - train_tokens_;
      report(*val_, separate ? "the validation file " : "", val_->scan(val_begin_ + a, val_begin_ + b, vocab, nullptr));
    }
  });
  comm.allreduce_sum(counts.data(), counts.size(), DataType::i64);
  entropy_ = impl::data::entropy_of(counts);
}

std::string TokenCorpus::describe() const {
  std::ostringstream os;
  os << "tokens '" << clip_for_message(train_->path()) << "' (" << train_->describe() << "): ";
  if (val_ == train_)
    os << train_->size() << " tokens (training " << train_tokens_ << ", validation " << val_tokens_ << ")";
  else
    os << train_tokens_ << " training tokens; validation '" << clip_for_message(val_->path()) << "' ("
       << val_->describe() << "): " << val_tokens_ << " tokens";
  os << ", read as batches need them, not loaded; unigram entropy " << std::fixed << std::setprecision(4) << entropy_
     << " nats";
  return os.str();
}

namespace impl::data {

namespace {
/// `path` (of config key `key`) opened in data.format; auto refuses to guess bytes when the
/// vocabulary is not bytes.
std::shared_ptr<const TokenFile> open_checked(const DataOptions& data, const std::string& path, const char* key,
                                              int vocab) {
  TokenFormat format = data.format;
  if (format == TokenFormat::automatic) {
    format = detect_token_format(path);
    std::size_t bytes = 0;  // a missing file or a directory is named as such, not as bytes
    if (format == TokenFormat::bytes && vocab != 256)
      ::close(open_regular_file("examoe::open_token_file", path, bytes, key));
    if (format == TokenFormat::bytes && vocab != 256)
      throw Error("examoe::open_token_file: data.format auto reads " + std::string(key) + " '" +
                  clip_for_message(path) + "' as bytes (it has no llm.c header and is not HDF5), but model.vocab_size "
                  "is " + std::to_string(vocab) + ", not 256: for headerless uint16 tokens (nanoGPT's train.bin) set "
                  "--data.format uint16; to train on its bytes, set --data.format bytes");
  }
  return open_token_file(path, format, data.dataset, key);
}
}  // namespace

bool reads_bytes_whole(const DataOptions& data, int vocab) {
  if (!data.val_path.empty() || !data.dataset.empty()) return false;
  return data.format == TokenFormat::bytes ||
         (data.format == TokenFormat::automatic && vocab == 256 && detect_token_format(data.path) == TokenFormat::bytes);
}

std::unique_ptr<TokenCorpus> open_token_corpus(const DataOptions& data, std::uint64_t seed, int vocab) {
  auto train = open_checked(data, data.path, "data.path", vocab);
  std::shared_ptr<const TokenFile> val;
  if (!data.val_path.empty()) val = open_checked(data, data.val_path, "data.val_path", vocab);
  return std::make_unique<TokenCorpus>(std::move(train), std::move(val), seed, data.val_fraction, data.val_sequences);
}

}  // namespace impl::data

}  // namespace examoe
