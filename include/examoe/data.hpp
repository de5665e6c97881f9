// Training data: synthetic addition corpus, byte files, and token files (llm.c / nanoGPT token
// files, HDF5 datasets of token ids; docs/data.md).
//
// Tokens are ids in [0, model.vocab_size) (256 by default: bytes). Every step the training app
// samples a global batch of `batch` sequences of `seq_len` tokens; sequence i of the global
// batch of step s goes to whichever rank holds it. All randomness is a counter-based hash of
// (seed, step, global sequence index, ...), so a sequence never depends on the rank count, on
// which rank asks for it, or on the order of the calls: train_batch(s, 0, 8) is exactly the
// concatenation of train_batch(s, 0, 3) and train_batch(s, 3, 5).
//
// Targets are next-token predictions; target -1 means "no loss at this position".
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace examoe {

class Communicator;  // examoe/comm.hpp

/// splitmix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mixer. All randomness
/// of the data pipeline is built from it (counter-based, no generator state).
std::uint64_t splitmix64(std::uint64_t x) noexcept;

/// A batch of `batch` sequences of `seq_len` tokens, row-major [sequence][position].
struct Batch {
  int batch = 0, seq_len = 0;      // sequences in this batch, tokens per sequence
  std::vector<int> tokens;         // [batch*seq_len], token ids in [0, vocab)
  std::vector<int> targets;        // [batch*seq_len], next token or -1 (ignored)
  std::vector<int> sample_of_row;  // [batch*seq_len]: for eval batches, index of the problem a
                                   // target row belongs to, else -1
};

class Corpus {
 public:
  virtual ~Corpus() = default;
  virtual std::string name() const = 0;
  /// Throws examoe::Error if sequences of `seq_len` tokens cannot be produced. The batch
  /// functions call it too; calling it once up front gives the error before training starts.
  /// The default accepts any seq_len >= 1.
  virtual void check(int seq_len) const;
  /// Training sequences [first, first+count) of the global batch of `step` (deterministic
  /// from the seed). `out` is resized to count x seq_len.
  virtual void train_batch(std::uint64_t step, int first, int count, int seq_len,
                           Batch& out) const = 0;
  /// Validation set: a fixed list of sequences (same on every rank), num_val_sequences() of
  /// them; val_batch fills [first, first+count).
  virtual int num_val_sequences(int seq_len) const = 0;
  virtual void val_batch(int first, int count, int seq_len, Batch& out) const = 0;
  /// Entropy (nats) of the unigram distribution of the training TARGET bytes: the loss of a
  /// model that ignores context.
  virtual double unigram_entropy() const = 0;
  /// Number of held-out problems in the validation set for exact-match accuracy, 0 if none.
  virtual int num_val_problems() const = 0;
  virtual std::string describe() const = 0;  // one line for people
  /// Collective over `comm`: throws examoe::Error on every rank, naming the first id outside
  /// [0, vocab) and where it is, when the corpus holds one. The default accepts every vocab;
  /// the corpora held by every rank (addition, FileCorpus) check locally and reach the same
  /// verdict on every rank; TokenCorpus splits the pass over the ranks and learns its unigram
  /// entropy in it.
  virtual void check_vocab(Communicator& comm, int vocab);
};

/// Synthetic multi-digit addition. A problem is "a+b=c\n" with a, b uniform in
/// [0, 10^digits), written in decimal without leading zeros, and c = a+b written with its
/// digits REVERSED (least significant first), e.g. "57+68=521\n", "5+5=01\n", "0+0=0\n".
///
/// Training sequences are problems concatenated back to back: a sequence starts at a problem
/// boundary, problems are appended while they fit completely, and the tail is padded with '\n'
/// (target -1). Targets are set only on the answer: the target at the '=' is c's first
/// (least significant) digit, ..., the target at c's last digit is the final '\n'; all other
/// targets are -1.
///
/// Held-out problems: (a, b) is held out iff
///   splitmix64(seed_mix ^ (a * 10^digits + b)) % 10 == 0,   seed_mix = splitmix64(seed ^ C)
/// (10% of the problem space). Training never produces a held-out problem (a held-out draw
/// is replaced by a deterministic redraw). The validation set is num_val_problems distinct
/// held-out problems chosen deterministically from the seed, packed like training sequences
/// (in problem order, as many whole problems per sequence as fit); sample_of_row holds the
/// problem index (0..num_val_problems-1) at each target row of that problem and -1
/// elsewhere, so exact match of problem p = every row with sample_of_row == p predicted
/// correctly (teacher-forced argmax, equal to greedy decoding exact match).
/// seq_len must be at least max_problem_length() = 3*digits + 4.
class AdditionCorpus : public Corpus {
 public:
  explicit AdditionCorpus(std::uint64_t seed, int digits = 2, int num_val_problems = 256);

  std::string name() const override { return "addition"; }
  void check(int seq_len) const override;
  void train_batch(std::uint64_t step, int first, int count, int seq_len,
                   Batch& out) const override;
  int num_val_sequences(int seq_len) const override;
  void val_batch(int first, int count, int seq_len, Batch& out) const override;
  double unigram_entropy() const override { return entropy_; }
  int num_val_problems() const override { return static_cast<int>(val_problems_.size()); }
  std::string describe() const override;
  /// Its tokens are the bytes '\n', '+', '0'-'9' and '=' (61): vocab must exceed 61.
  void check_vocab(Communicator& comm, int vocab) override;

  int digits() const { return digits_; }
  /// Length in bytes of the longest problem, "99+99=891\n" for 2 digits: 3*digits + 4.
  int max_problem_length() const { return 3 * digits_ + 4; }
  /// Whether (a, b) is a held-out (validation-only) problem.
  bool is_held_out(std::int64_t a, std::int64_t b) const;
  /// Validation problem i (0 <= i < num_val_problems()) as (a, b).
  std::pair<std::int64_t, std::int64_t> val_problem(int i) const;
  /// The text "a+b=reversed(a+b)\n".
  static std::string format_problem(std::int64_t a, std::int64_t b);
  /// Entropy computed exactly over the whole non-held-out problem space (digits <= 3) or from
  /// a deterministic sample of 2^20 training problems (digits >= 4).
  bool entropy_is_exact() const { return digits_ <= 3; }

 private:
  std::pair<std::int64_t, std::int64_t> train_problem(std::uint64_t step, std::uint64_t seq,
                                                      std::uint64_t k) const;
  const std::vector<int>& val_starts(int seq_len) const;  // first problem of each val sequence
  void check_seq_len(const char* fn, int seq_len) const;

  std::uint64_t seed_;
  int digits_;
  std::int64_t base_;       // 10^digits
  std::uint64_t seed_mix_;  // held-out hash key
  std::uint64_t seed_train_;
  std::int64_t num_held_out_ = -1;  // exact count for digits <= 3, else -1 (about 10%)
  std::vector<std::pair<std::int64_t, std::int64_t>> val_problems_;
  double entropy_ = 0.0;
  mutable std::mutex cache_mutex_;
  mutable std::map<int, std::vector<int>> val_starts_cache_;
};

/// Any file as bytes. The first bytes (all but ceil(size * val_fraction)) are the training
/// part, the rest the validation part. A training sequence is a window of seq_len+1 bytes at
/// a pseudo-random offset (hash of seed, step, global sequence index) inside the training
/// part: tokens are its first seq_len bytes, targets the next byte at every position.
/// Validation sequences are consecutive windows of the validation part whose tokens do not
/// overlap (stride seq_len, each reading seq_len+1 bytes), (val_bytes-1)/seq_len of them;
/// every validation byte but the first is a target exactly once (except the tail that does
/// not fill a window). The file is read whole into memory in the constructor; it must be a
/// regular file (file_size()). train() measures it first and counts it in its memory check.
class FileCorpus : public Corpus {
 public:
  FileCorpus(const std::string& path, std::uint64_t seed, double val_fraction = 0.1);

  /// Size in bytes of the data file `path`, without reading it. Throws examoe::Error when it
  /// is missing, empty or not a regular file: a directory, FIFO, device (/dev/zero,
  /// /dev/urandom) or socket is refused from stat() without being opened, so a FIFO cannot
  /// block and a device cannot be read without end.
  static std::size_t file_size(const std::string& path);
  /// num_val_sequences(seq_len) of the corpus a file of `bytes` bytes gives (0 if it is too
  /// short), known before the file is read.
  static long long val_sequences(std::size_t bytes, double val_fraction, int seq_len);

  std::string name() const override { return "file"; }
  /// Both parts must hold at least seq_len+1 bytes; the message says the minimum file size.
  void check(int seq_len) const override;
  void train_batch(std::uint64_t step, int first, int count, int seq_len,
                   Batch& out) const override;
  int num_val_sequences(int seq_len) const override;
  void val_batch(int first, int count, int seq_len, Batch& out) const override;
  /// Entropy of the byte histogram of the training part.
  double unigram_entropy() const override { return entropy_; }
  int num_val_problems() const override { return 0; }
  std::string describe() const override;
  /// Every byte must be below vocab (only a vocab under 256 can fail).
  void check_vocab(Communicator& comm, int vocab) override;

  const std::string& path() const { return path_; }
  std::size_t size() const { return data_.size(); }
  std::size_t train_bytes() const { return train_bytes_; }
  std::size_t val_bytes() const { return data_.size() - train_bytes_; }
  /// Offset in the file of training sequence `seq` of step `step` (a window of seq_len+1).
  std::size_t train_offset(std::uint64_t step, std::uint64_t seq, int seq_len) const;
  /// Smallest file size for which check(seq_len) passes with this val_fraction.
  std::size_t min_file_size(int seq_len) const;

 private:
  void check_seq_len(const char* fn, int seq_len) const;
  std::size_t val_part_size(std::size_t file_size) const;  // ceil(file_size * val_fraction)

  std::string path_;
  std::uint64_t seed_;
  double val_fraction_;
  std::vector<unsigned char> data_;
  std::size_t train_bytes_ = 0;
  double entropy_ = 0.0;
};

// ------------------------------------------------------------------------------------------
// Token files (docs/data.md)
// ------------------------------------------------------------------------------------------

/// How a data file holds its tokens (`data.format`):
/// - bytes: every byte is a token (ids 0..255);
/// - llmc: llm.c's token file: a header of 256 little-endian int32 (header[0] = 20240520,
///   header[1] = version: 1 for uint16 tokens, 2 for uint32 tokens, header[2] = token count),
///   then the tokens, little-endian;
/// - uint16: headerless little-endian uint16 tokens (what nanoGPT's prepare.py writes with
///   numpy's tofile);
/// - hdf5: a 1-D dataset of any HDF5 integer type (`data.dataset`);
/// - automatic ("auto"): hdf5 when the name ends in .h5 or .hdf5 or the file starts with the
///   HDF5 signature, llmc when it starts with the llm.c magic, else bytes (a headerless uint16
///   file cannot be told from bytes: it needs format uint16).
enum class TokenFormat { bytes, llmc, uint16, hdf5, automatic };
/// The config spellings: "bytes", "llmc", "uint16", "hdf5", "auto".
std::string to_string(TokenFormat f);
/// Parses a config spelling; throws examoe::Error (not collective) for any other text.
TokenFormat token_format_from_string(const std::string& s);
/// What `automatic` reads `path` as (never `automatic`). Looks at the name and at most the
/// first 8 bytes of a regular file; a path that is not a non-empty regular file gives bytes
/// (whose reader then names the problem). Throws nothing.
TokenFormat detect_token_format(const std::string& path);

/// The first token outside [0, vocab) of a part of a token file, if any.
struct BadToken {
  bool found = false;
  std::uint64_t index = 0;  ///< token index in the file (0 = its first token)
  std::string value;        ///< the id as stored (signed or unsigned, any width)
};

/// A read-only array of token ids in a file, never loaded whole: what a batch needs is read when
/// it is needed (llm.c, uint16 and byte files with pread(), HDF5 datasets by hyperslab), so
/// nothing of the file counts in the process's memory but the page cache the kernel keeps.
class TokenFile {
 public:
  virtual ~TokenFile() = default;
  /// Number of tokens.
  virtual std::uint64_t size() const = 0;
  /// Tokens [first, first+count) into `out`, which must hold count ints. The ids must have been
  /// checked (scan) to be below a vocab <= INT_MAX: they are not checked again here.
  virtual void read(std::uint64_t first, std::size_t count, int* out) const = 0;
  /// One pass over tokens [first, last) in chunks of 1 MiB or so (pread / hyperslab reads into
  /// one buffer, so the pass adds 1 MiB to the resident set whatever the file's size): the first id
  /// outside [0, vocab), and, when `counts` is not null, adds the histogram of the valid ids
  /// to counts[0..vocab).
  virtual BadToken scan(std::uint64_t first, std::uint64_t last, int vocab,
                        std::vector<std::int64_t>* counts) const = 0;
  /// "llm.c token file (version 1, uint16)", "HDF5 dataset 'tokens' (uint32)", ...
  virtual std::string describe() const = 0;
  /// Where token i lies, for messages: "token 12 (byte 1048)", "tokens[12]".
  virtual std::string where(std::uint64_t i) const = 0;
  const std::string& path() const { return path_; }
  TokenFormat format() const { return format_; }

 protected:
  TokenFile(std::string path, TokenFormat format) : path_(std::move(path)), format_(format) {}

 private:
  std::string path_;
  TokenFormat format_;
};

/// Opens `path` as `format` (automatic: detect_token_format) and checks its structure: a
/// regular, non-empty file (refused from stat() before it is opened, as FileCorpus does);
/// llmc: the magic, the version, the token count against the file size; uint16: an even size,
/// no llm.c header; hdf5: the dataset `dataset` exists (empty: the file's dataset 'tokens'), is
/// 1-D, integer, not empty; `dataset` must be empty for the other formats. `key` is the config
/// key the path came from (for messages). Not collective; errors are examoe::Error prefixed
/// "examoe::open_token_file: ".
std::unique_ptr<TokenFile> open_token_file(const std::string& path, TokenFormat format,
                                           const std::string& dataset = std::string(),
                                           const char* key = "data.path");

/// Token files as a corpus, with the sampling contract of FileCorpus: a training sequence is a
/// window of seq_len+1 tokens at the offset hash(seed, step, global sequence index) of the
/// training part; validation sequences are windows of the validation part: its n = (tokens-1)
/// / seq_len consecutive windows (stride seq_len) or, when `max_val_sequences` (> 0) is
/// smaller, m = max_val_sequences of them spread evenly: window floor(k * n / m) for k < m
/// (the validation set is evaluated in one pass, so a large file's must be capped). Without a validation file the last ceil(size * val_fraction) tokens of
/// the training file are the validation part (as FileCorpus does with bytes, so a file read
/// as bytes here gives FileCorpus's batches exactly); with one, the training part is the
/// whole training file and the validation part the whole validation file. Nothing is read
/// until a batch needs it. check_vocab must run (collectively) before training: it checks
/// every id and computes the unigram entropy (NaN before).
class TokenCorpus : public Corpus {
 public:
  TokenCorpus(std::shared_ptr<const TokenFile> train, std::shared_ptr<const TokenFile> val,
              std::uint64_t seed, double val_fraction = 0.1, int max_val_sequences = 0);

  std::string name() const override { return "tokens"; }
  /// Both parts must hold at least seq_len+1 tokens.
  void check(int seq_len) const override;
  void train_batch(std::uint64_t step, int first, int count, int seq_len,
                   Batch& out) const override;
  int num_val_sequences(int seq_len) const override;
  void val_batch(int first, int count, int seq_len, Batch& out) const override;
  /// Entropy of the id histogram of the training part (after check_vocab).
  double unigram_entropy() const override { return entropy_; }
  int num_val_problems() const override { return 0; }
  std::string describe() const override;
  /// Every id of both parts checked against vocab: the pass is split into one contiguous
  /// range per rank (training part, then validation part), so each rank reads 1/size of the
  /// tokens, and the lowest failing rank holds the first bad id; the histogram of the training
  /// part is summed over the ranks (one allreduce of vocab int64), so the entropy does not
  /// depend on the rank count.
  void check_vocab(Communicator& comm, int vocab) override;

  std::uint64_t train_tokens() const { return train_tokens_; }
  std::uint64_t val_tokens() const { return val_tokens_; }
  /// Token index in the training file of training sequence `seq` of step `step`.
  std::uint64_t train_offset(std::uint64_t step, std::uint64_t seq, int seq_len) const;
  /// num_val_sequences(seq_len) for parts of these sizes (0 if either is too short).
  static long long val_sequences(std::uint64_t train_tokens, std::uint64_t val_tokens, int seq_len,
                                 int max_val_sequences = 0);
  /// Token index in the validation file of validation sequence `i`.
  std::uint64_t val_offset(int i, int seq_len) const;

 private:
  void check_seq_len(const char* fn, int seq_len) const;
  /// Reads window [off, off+seq_len] of `file` into row `row` of `out` (tokens and targets).
  void read_window(const TokenFile& file, std::uint64_t off, int row, int seq_len, Batch& out) const;

  std::shared_ptr<const TokenFile> train_, val_;  // val_ may be train_ (split file)
  std::uint64_t seed_;
  double val_fraction_;
  int max_val_;  // 0: every window
  std::uint64_t train_tokens_ = 0, val_tokens_ = 0;
  std::uint64_t val_begin_ = 0;  // first validation token in val_
  double entropy_;
};

}  // namespace examoe
