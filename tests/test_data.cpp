// Training data: AdditionCorpus and FileCorpus (host only, one rank).
#include <examoe/data.hpp>
#include <examoe/error.hpp>

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

namespace fs = std::filesystem;

// ---- helpers ---------------------------------------------------------------------------

/// A temporary file (unique per process), removed at scope exit.
class TempFile {
 public:
  TempFile(const std::string& tag, const std::string& content) {
    path_ = (fs::temp_directory_path() /
             ("examoe_test_data_" + std::to_string(::getpid()) + "_" + tag + ".bin"))
                .string();
    std::ofstream f(path_, std::ios::binary | std::ios::trunc);
    f.write(content.data(), static_cast<std::streamsize>(content.size()));
  }
  ~TempFile() {
    std::error_code ec;
    fs::remove(path_, ec);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// Pseudo-random bytes (all 256 values), so that a 16-byte window is unique in the file.
std::string random_bytes(std::size_t n, std::uint64_t seed) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) {
    s[i] = static_cast<char>(splitmix64(seed * 1000003u + i) & 0xFF);
  }
  return s;
}

/// Runs `f`, expects examoe::Error whose message contains every needle.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles,
                  const char* what) {
  SCOPED_TRACE(what);
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const examoe::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("examoe::", 0), 0u) << "message should start with the function: " << msg;
    for (const auto& n : needles) {
      EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in message: " << msg;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-examoe exception: " << e.what();
  }
}

bool same_batch(const Batch& x, const Batch& y) {
  return x.batch == y.batch && x.seq_len == y.seq_len && x.tokens == y.tokens &&
         x.targets == y.targets && x.sample_of_row == y.sample_of_row;
}

/// Concatenation of two batches of the same seq_len.
Batch concat(const Batch& x, const Batch& y) {
  Batch c = x;
  c.batch = x.batch + y.batch;
  c.tokens.insert(c.tokens.end(), y.tokens.begin(), y.tokens.end());
  c.targets.insert(c.targets.end(), y.targets.begin(), y.targets.end());
  c.sample_of_row.insert(c.sample_of_row.end(), y.sample_of_row.begin(), y.sample_of_row.end());
  return c;
}

struct Problem {
  std::int64_t a = 0, b = 0;
  int start = 0, len = 0, eq = 0;  // position in the row, length, position of '='
};

/// Parses a decimal number without leading zeros at s[i...]; returns -1 if malformed.
std::int64_t parse_number(const std::vector<int>& s, int& i, int end, bool reversed) {
  std::string digits;
  while (i < end && s[i] >= '0' && s[i] <= '9') digits.push_back(static_cast<char>(s[i++]));
  if (digits.empty() || digits.size() > 7) return -1;
  if (reversed) std::reverse(digits.begin(), digits.end());
  if (digits.size() > 1 && digits[0] == '0') return -1;  // no leading zeros (reversed: trailing)
  return std::stoll(digits);
}

/// Decodes one row of an addition batch into problems, checking the layout: problems back to
/// back from position 0, arithmetic right, no leading zeros, tail all '\n' with target -1 and
/// shorter than `max_len`; targets set exactly on the answer positions.
::testing::AssertionResult parse_row(const Batch& b, int row, int max_len,
                                     std::vector<Problem>& problems, bool last_val_row = false) {
  problems.clear();
  const int L = b.seq_len;
  const std::vector<int> tok(b.tokens.begin() + static_cast<std::ptrdiff_t>(row) * L,
                             b.tokens.begin() + static_cast<std::ptrdiff_t>(row + 1) * L);
  const int* tgt = b.targets.data() + static_cast<std::ptrdiff_t>(row) * L;
  std::vector<int> expect_target(L, -1);
  int i = 0;
  while (i < L && tok[i] != '\n') {
    Problem p;
    p.start = i;
    p.a = parse_number(tok, i, L, false);
    if (p.a < 0 || i >= L || tok[i] != '+') return ::testing::AssertionFailure() << "bad a at " << i;
    ++i;
    p.b = parse_number(tok, i, L, false);
    if (p.b < 0 || i >= L || tok[i] != '=') return ::testing::AssertionFailure() << "bad b at " << i;
    p.eq = i++;
    const std::int64_t c = parse_number(tok, i, L, true);
    if (c < 0 || i >= L || tok[i] != '\n') return ::testing::AssertionFailure() << "bad c at " << i;
    if (p.a + p.b != c) {
      return ::testing::AssertionFailure() << p.a << "+" << p.b << " decoded as " << c;
    }
    ++i;
    p.len = i - p.start;
    for (int k = p.eq; k < i - 1; ++k) expect_target[k] = tok[k + 1];
    problems.push_back(p);
  }
  if (problems.empty()) return ::testing::AssertionFailure() << "row " << row << " has no problem";
  if (L - i >= max_len && !last_val_row) {
    return ::testing::AssertionFailure() << "padding of " << L - i << " bytes could hold a problem";
  }
  for (int k = i; k < L; ++k) {
    if (tok[k] != '\n') return ::testing::AssertionFailure() << "padding byte " << tok[k];
  }
  for (int k = 0; k < L; ++k) {
    if (tgt[k] != expect_target[k]) {
      return ::testing::AssertionFailure()
             << "row " << row << " position " << k << ": target " << tgt[k] << ", expected "
             << expect_target[k];
    }
  }
  return ::testing::AssertionSuccess();
}

// ---- hashing ---------------------------------------------------------------------------

TEST(Data, Splitmix64KnownValues) {
  // First outputs of the reference splitmix64 generator seeded with 0.
  EXPECT_EQ(splitmix64(0), 0xE220A8397B1DCDAFull);
  EXPECT_EQ(splitmix64(0x9E3779B97F4A7C15ull), 0x6E789E6AA1B965F4ull);
}

// ---- AdditionCorpus --------------------------------------------------------------------

TEST(Data, AdditionDeterministicAndRankSplit) {
  const AdditionCorpus c(42, 2, 64);
  const AdditionCorpus c2(42, 2, 64);
  Batch x, y, p, q, other;
  c.train_batch(7, 0, 8, 48, x);
  c2.train_batch(7, 0, 8, 48, y);
  EXPECT_TRUE(same_batch(x, y));
  EXPECT_EQ(x.batch, 8);
  EXPECT_EQ(x.seq_len, 48);
  EXPECT_EQ(x.tokens.size(), 8u * 48u);
  // Rank split: sequences [0,3) on one rank and [3,8) on another, in either call order.
  c.train_batch(7, 3, 5, 48, q);
  c.train_batch(7, 0, 3, 48, p);
  EXPECT_TRUE(same_batch(concat(p, q), x));
  for (int v : x.sample_of_row) EXPECT_EQ(v, -1);
  // Other steps and seeds give other data; rows of one batch differ.
  c.train_batch(8, 0, 8, 48, other);
  EXPECT_NE(other.tokens, x.tokens);
  AdditionCorpus(43, 2, 64).train_batch(7, 0, 8, 48, other);
  EXPECT_NE(other.tokens, x.tokens);
  EXPECT_FALSE(std::equal(x.tokens.begin(), x.tokens.begin() + 48, x.tokens.begin() + 48));
  // Validation batches split the same way.
  const int nv = c.num_val_sequences(48);
  ASSERT_GE(nv, 4);
  c.val_batch(0, nv, 48, x);
  c.val_batch(0, 2, 48, p);
  c.val_batch(2, nv - 2, 48, q);
  EXPECT_TRUE(same_batch(concat(p, q), x));
  c2.val_batch(0, nv, 48, y);
  EXPECT_TRUE(same_batch(x, y));
  // Empty request is fine.
  c.train_batch(7, 5, 0, 48, p);
  EXPECT_EQ(p.batch, 0);
  EXPECT_TRUE(p.tokens.empty());
}

TEST(Data, AdditionProblemsAreRightAndTargetsOnAnswers) {
  const AdditionCorpus c(1, 2, 256);
  EXPECT_EQ(c.max_problem_length(), 10);
  EXPECT_EQ(AdditionCorpus::format_problem(57, 68), "57+68=521\n");
  EXPECT_EQ(AdditionCorpus::format_problem(5, 5), "5+5=01\n");
  EXPECT_EQ(AdditionCorpus::format_problem(0, 0), "0+0=0\n");
  EXPECT_EQ(AdditionCorpus::format_problem(99, 99), "99+99=891\n");
  std::size_t total = 0, draws64 = 0;
  std::set<std::pair<std::int64_t, std::int64_t>> distinct;
  std::vector<Problem> probs;
  for (int L : {10, 11, 37, 64}) {
    for (std::uint64_t step = 0; step < 40; ++step) {
      Batch b;
      c.train_batch(step, 0, 16, L, b);
      for (int r = 0; r < b.batch; ++r) {
        ASSERT_TRUE(parse_row(b, r, c.max_problem_length(), probs))
            << "seq_len " << L << " step " << step;
        for (const auto& p : probs) {
          EXPECT_LT(p.a, 100);
          EXPECT_LT(p.b, 100);
          EXPECT_FALSE(c.is_held_out(p.a, p.b)) << p.a << "+" << p.b << " is held out";
          if (L == 64) distinct.emplace(p.a, p.b);
        }
        total += probs.size();
        if (L == 64) draws64 += probs.size();
      }
    }
  }
  EXPECT_GT(total, 3000u);
  // Draws are uniform over the ~9000 training problems: n draws at seq_len 64 (the shorter
  // seq_len repeat their prefixes: problem k of a sequence does not depend on seq_len) hit
  // about N (1 - exp(-n/N)) distinct problems.
  int space = 0;
  for (int a = 0; a < 100; ++a)
    for (int b = 0; b < 100; ++b) space += c.is_held_out(a, b) ? 0 : 1;
  const double expect = space * (1.0 - std::exp(-static_cast<double>(draws64) / space));
  EXPECT_GT(static_cast<double>(distinct.size()), 0.95 * expect) << draws64 << " draws";
  EXPECT_LT(static_cast<double>(distinct.size()), 1.05 * expect) << draws64 << " draws";
}

TEST(Data, AdditionHeldOutAndValidation) {
  const std::uint64_t seed = 2024;
  const AdditionCorpus c(seed, 2, 256);
  ASSERT_EQ(c.num_val_problems(), 256);
  // About 10% of the space is held out.
  int held = 0;
  for (int a = 0; a < 100; ++a)
    for (int b = 0; b < 100; ++b) held += c.is_held_out(a, b) ? 1 : 0;
  EXPECT_GT(held, 800);
  EXPECT_LT(held, 1200);
  // The definition: splitmix64(seed_mix ^ (a*10^d + b)) % 10 == 0 with a seed-dependent key.
  const AdditionCorpus other(seed + 1, 2, 256);
  int differ = 0;
  for (int a = 0; a < 100; ++a)
    for (int b = 0; b < 100; ++b) differ += c.is_held_out(a, b) != other.is_held_out(a, b);
  EXPECT_GT(differ, 500);

  // Validation problems: distinct, all held out.
  std::set<std::pair<std::int64_t, std::int64_t>> vset;
  for (int i = 0; i < c.num_val_problems(); ++i) {
    const auto [a, b] = c.val_problem(i);
    EXPECT_TRUE(c.is_held_out(a, b)) << a << "+" << b;
    vset.emplace(a, b);
  }
  EXPECT_EQ(vset.size(), 256u);

  for (int L : {10, 32, 128}) {
    SCOPED_TRACE("seq_len " + std::to_string(L));
    const int nv = c.num_val_sequences(L);
    ASSERT_GE(nv, 1);
    Batch v;
    c.val_batch(0, nv, L, v);
    std::vector<Problem> probs;
    std::vector<int> rows_of(256, 0);
    int next = 0;  // problems appear in order 0, 1, 2, ...
    for (int r = 0; r < nv; ++r) {
      // The last validation sequence may end early (no problems left).
      ASSERT_TRUE(parse_row(v, r, c.max_problem_length(), probs, r == nv - 1)) << "val row " << r;
      for (const auto& p : probs) {
        ASSERT_LT(next, 256);
        EXPECT_EQ(std::make_pair(p.a, p.b), c.val_problem(next));
        EXPECT_TRUE(c.is_held_out(p.a, p.b));
        // sample_of_row = problem index exactly at its target rows.
        for (int k = p.start; k < p.start + p.len; ++k) {
          const std::size_t idx = static_cast<std::size_t>(r) * L + k;
          const bool target_row = k >= p.eq && k < p.start + p.len - 1;
          EXPECT_EQ(v.sample_of_row[idx], target_row ? next : -1);
          EXPECT_EQ(v.targets[idx] != -1, target_row);
        }
        ++next;
      }
    }
    EXPECT_EQ(next, 256) << "every validation problem appears once";
    for (std::size_t i = 0; i < v.sample_of_row.size(); ++i) {
      if (v.sample_of_row[i] >= 0) ++rows_of[static_cast<std::size_t>(v.sample_of_row[i])];
      EXPECT_EQ(v.sample_of_row[i] >= 0, v.targets[i] >= 0);
    }
    for (int p = 0; p < 256; ++p) {
      const auto [a, b] = c.val_problem(p);
      EXPECT_EQ(rows_of[static_cast<std::size_t>(p)],
                static_cast<int>(std::to_string(a + b).size()) + 1)
          << "problem " << p << " covered by the digits of its answer and the newline";
    }
  }
  // Packing: seq_len equal to the longest problem gives one problem per sequence.
  EXPECT_EQ(c.num_val_sequences(10), 256);
}

TEST(Data, AdditionDigitsRange) {
  for (int d = 1; d <= 6; ++d) {
    SCOPED_TRACE("digits " + std::to_string(d));
    const int nval = d == 1 ? 5 : 64;
    const AdditionCorpus c(9, d, nval);
    EXPECT_EQ(c.digits(), d);
    EXPECT_EQ(c.max_problem_length(), 3 * d + 4);
    std::int64_t base = 1;
    for (int i = 0; i < d; ++i) base *= 10;
    Batch b;
    const int L = 4 * c.max_problem_length();
    c.train_batch(3, 0, 32, L, b);
    std::vector<Problem> probs;
    std::int64_t max_a = 0;
    for (int r = 0; r < b.batch; ++r) {
      ASSERT_TRUE(parse_row(b, r, c.max_problem_length(), probs));
      for (const auto& p : probs) {
        EXPECT_LT(p.a, base);
        EXPECT_LT(p.b, base);
        EXPECT_FALSE(c.is_held_out(p.a, p.b));
        max_a = std::max({max_a, p.a, p.b});
      }
    }
    EXPECT_GE(max_a, base / 2) << "operands span the whole range";
    const int nv = c.num_val_sequences(L);
    c.val_batch(0, nv, L, b);
    std::set<int> seen(b.sample_of_row.begin(), b.sample_of_row.end());
    seen.erase(-1);
    EXPECT_EQ(static_cast<int>(seen.size()), nval);
    const double H = c.unigram_entropy();
    EXPECT_GT(H, 1.0);
    EXPECT_LT(H, std::log(11.0));
    EXPECT_FALSE(c.describe().empty());
  }
}

TEST(Data, AdditionUnigramEntropyExact) {
  for (int d : {1, 2}) {
    const AdditionCorpus c(77, d, d == 1 ? 3 : 100);
    std::int64_t base = d == 1 ? 10 : 100;
    std::array<double, 256> n{};
    double total = 0;
    for (std::int64_t a = 0; a < base; ++a) {
      for (std::int64_t b = 0; b < base; ++b) {
        if (c.is_held_out(a, b)) continue;
        const std::string s = AdditionCorpus::format_problem(a, b);
        for (std::size_t k = s.find('=') + 1; k < s.size(); ++k) {
          n[static_cast<unsigned char>(s[k])] += 1;
          total += 1;
        }
      }
    }
    double H = 0;
    for (double v : n) {
      if (v > 0) H -= v / total * std::log(v / total);
    }
    EXPECT_TRUE(c.entropy_is_exact());
    EXPECT_NEAR(c.unigram_entropy(), H, 1e-12) << "digits " << d;
  }
  // Sampled estimate for larger spaces: deterministic, and it agrees with the histogram of
  // the targets train_batch actually produces (long sequences: little packing bias).
  const AdditionCorpus c4(5, 4, 16), c4b(5, 4, 16);
  EXPECT_FALSE(c4.entropy_is_exact());
  EXPECT_EQ(c4.unigram_entropy(), c4b.unigram_entropy());
  std::array<double, 256> n{};
  double total = 0;
  for (std::uint64_t step = 0; step < 50; ++step) {
    Batch b;
    c4.train_batch(step, 0, 32, 512, b);
    for (int t : b.targets) {
      if (t < 0) continue;
      n[static_cast<std::size_t>(t)] += 1;
      total += 1;
    }
  }
  double H = 0;
  for (double v : n) {
    if (v > 0) H -= v / total * std::log(v / total);
  }
  EXPECT_GT(total, 1e5);
  EXPECT_NEAR(c4.unigram_entropy(), H, 0.01);
}

TEST(Data, AdditionErrors) {
  expect_error([] { AdditionCorpus c(1, 0); }, {"digits", "0"}, "digits 0");
  expect_error([] { AdditionCorpus c(1, 7); }, {"digits", "7"}, "digits 7");
  expect_error([] { AdditionCorpus c(1, 2, 0); }, {"num_val_problems"}, "no val problems");
  expect_error([] { AdditionCorpus c(1, 1, 256); }, {"num_val_problems", "held-out"},
               "more val problems than held out");
  const AdditionCorpus c(1, 2, 16);
  Batch b;
  expect_error([&] { c.train_batch(0, 0, 4, 9, b); }, {"train_batch", "seq_len", "10"},
               "seq_len too short");
  expect_error([&] { c.check(9); }, {"seq_len"}, "check");
  EXPECT_NO_THROW(c.check(10));
  expect_error([&] { c.train_batch(0, -1, 4, 32, b); }, {"first"}, "negative first");
  const int nv = c.num_val_sequences(32);
  expect_error([&] { c.val_batch(nv - 1, 2, 32, b); }, {"val_batch", "validation sequences"},
               "val range");
}

// ---- FileCorpus ------------------------------------------------------------------------

TEST(Data, FileWindowsTargetsAndSplit) {
  const std::string text = random_bytes(1000, 3);
  TempFile f("windows", text);
  const FileCorpus c(f.path(), 11);
  EXPECT_EQ(c.size(), 1000u);
  EXPECT_EQ(c.train_bytes(), 900u);
  EXPECT_EQ(c.val_bytes(), 100u);
  EXPECT_EQ(c.num_val_problems(), 0);
  const int L = 16;
  const std::string train = text.substr(0, 900);
  std::size_t min_off = 1000, max_off = 0;
  for (std::uint64_t step = 0; step < 50; ++step) {
    Batch b;
    c.train_batch(step, 0, 8, L, b);
    ASSERT_EQ(b.tokens.size(), 8u * L);
    for (int r = 0; r < 8; ++r) {
      const std::size_t off = c.train_offset(step, static_cast<std::uint64_t>(r), L);
      ASSERT_LE(off + L + 1, c.train_bytes()) << "window leaves the training part";
      min_off = std::min(min_off, off);
      max_off = std::max(max_off, off);
      std::string window(static_cast<std::size_t>(L) + 1, '\0');
      for (int i = 0; i < L; ++i) {
        const std::size_t k = static_cast<std::size_t>(r) * L + static_cast<std::size_t>(i);
        ASSERT_GE(b.tokens[k], 0);
        ASSERT_LE(b.tokens[k], 255);
        window[static_cast<std::size_t>(i)] = static_cast<char>(b.tokens[k]);
        if (i + 1 < L) {
          EXPECT_EQ(b.targets[k], b.tokens[k + 1]) << "target = next byte";
        }
        EXPECT_EQ(b.sample_of_row[k], -1);
      }
      window[static_cast<std::size_t>(L)] =
          static_cast<char>(b.targets[static_cast<std::size_t>(r) * L + L - 1]);
      // The whole window (tokens + last target) is found in the training part, at `off`.
      EXPECT_EQ(train.find(window), off);
    }
  }
  EXPECT_LT(min_off, 100u);
  EXPECT_GT(max_off, 780u);

  // Determinism and rank split.
  Batch x, p, q;
  c.train_batch(5, 0, 8, L, x);
  c.train_batch(5, 3, 5, L, q);
  c.train_batch(5, 0, 3, L, p);
  EXPECT_TRUE(same_batch(concat(p, q), x));
  Batch y;
  FileCorpus(f.path(), 11).train_batch(5, 0, 8, L, y);
  EXPECT_TRUE(same_batch(x, y));
  FileCorpus(f.path(), 12).train_batch(5, 0, 8, L, y);
  EXPECT_NE(x.tokens, y.tokens);

  // Validation: consecutive windows of the tail, stride L, targets = next byte.
  const int nv = c.num_val_sequences(L);
  EXPECT_EQ(nv, (100 - 1) / L);
  Batch v;
  c.val_batch(0, nv, L, v);
  for (int r = 0; r < nv; ++r) {
    for (int i = 0; i < L; ++i) {
      const std::size_t pos = 900 + static_cast<std::size_t>(r) * L + static_cast<std::size_t>(i);
      const std::size_t k = static_cast<std::size_t>(r) * L + static_cast<std::size_t>(i);
      EXPECT_EQ(v.tokens[k], static_cast<unsigned char>(text[pos]));
      EXPECT_EQ(v.targets[k], static_cast<unsigned char>(text[pos + 1]));
      EXPECT_EQ(v.sample_of_row[k], -1);
    }
  }
  c.val_batch(1, nv - 1, L, y);
  c.val_batch(0, 1, L, x);
  EXPECT_TRUE(same_batch(concat(x, y), v));
  // Longest window that fits the 100-byte validation part: one sequence.
  EXPECT_EQ(c.num_val_sequences(99), 1);
  EXPECT_NO_THROW(c.check(99));
  EXPECT_FALSE(c.describe().empty());
}

TEST(Data, FileValFraction) {
  const std::string text = random_bytes(1000, 4);
  TempFile f("fraction", text);
  const FileCorpus half(f.path(), 1, 0.5);
  EXPECT_EQ(half.train_bytes(), 500u);
  const FileCorpus small(f.path(), 1, 0.3);
  EXPECT_EQ(small.val_bytes(), 300u);
  const FileCorpus tiny(f.path(), 1, 0.0001);
  EXPECT_EQ(tiny.val_bytes(), 1u);  // at least one byte, rounded up
}

TEST(Data, FileUnigramEntropy) {
  TempFile one("one", std::string(1000, 'x'));
  EXPECT_EQ(FileCorpus(one.path(), 0).unigram_entropy(), 0.0);
  std::string ab;
  for (int i = 0; i < 500; ++i) ab += "ab";
  TempFile two("two", ab);
  EXPECT_NEAR(FileCorpus(two.path(), 0).unigram_entropy(), std::log(2.0), 1e-12);
  // Only the training part counts: 900 'a' then 100 'b' -> entropy 0.
  TempFile split("split", std::string(900, 'a') + std::string(100, 'b'));
  EXPECT_EQ(FileCorpus(split.path(), 0).unigram_entropy(), 0.0);
}

TEST(Data, FileErrors) {
  const std::string missing =
      (fs::temp_directory_path() / ("examoe_no_such_file_" + std::to_string(::getpid()))).string();
  expect_error([&] { FileCorpus c(missing, 1); }, {missing, "cannot open", std::strerror(ENOENT)},
               "missing file");
  expect_error([&] { FileCorpus c(fs::temp_directory_path().string(), 1); },
               {fs::temp_directory_path().string()}, "directory");
  TempFile empty("empty", "");
  expect_error([&] { FileCorpus c(empty.path(), 1); }, {empty.path(), "empty"}, "empty file");

  TempFile good("good", random_bytes(1000, 5));
  for (double vf : {0.0, -0.1, 0.51, 1.0, std::numeric_limits<double>::quiet_NaN()}) {
    expect_error([&] { FileCorpus c(good.path(), 1, vf); }, {"val_fraction"}, "bad val_fraction");
  }
  EXPECT_NO_THROW(FileCorpus(good.path(), 1, 0.5));

  // seq_len 64 needs 65 bytes in each part: with val_fraction 0.1 that is a 641-byte file.
  TempFile short_file("short", random_bytes(640, 6));
  const FileCorpus c(short_file.path(), 1);
  EXPECT_EQ(c.min_file_size(64), 641u);
  Batch b;
  expect_error([&] { c.check(64); }, {short_file.path(), "seq_len", "641", "640"}, "too short");
  expect_error([&] { c.train_batch(0, 0, 2, 64, b); }, {"train_batch", "641"},
               "too short (train)");
  expect_error([&] { c.val_batch(0, 1, 64, b); }, {"val_batch", "641"}, "too short (val)");
  expect_error([&] { c.num_val_sequences(64); }, {"641"}, "too short (count)");
  EXPECT_NO_THROW(c.check(63));
  TempFile just("just", random_bytes(641, 6));
  const FileCorpus cj(just.path(), 1);
  EXPECT_NO_THROW(cj.check(64));
  EXPECT_EQ(cj.num_val_sequences(64), 1);
  // min_file_size is the exact threshold for other settings too.
  for (double vf : {0.05, 0.1, 0.25, 0.5}) {
    const FileCorpus cf(good.path(), 1, vf);
    for (int L : {1, 7, 30, 100}) {
      const std::size_t n = cf.min_file_size(L);
      TempFile at("at", random_bytes(n, 7)), below("below", random_bytes(n - 1, 7));
      EXPECT_NO_THROW(FileCorpus(at.path(), 1, vf).check(L)) << vf << " " << L << " " << n;
      EXPECT_THROW(FileCorpus(below.path(), 1, vf).check(L), examoe::Error)
          << vf << " " << L << " " << n;
    }
  }
  expect_error([&] { cj.check(0); }, {"seq_len"}, "seq_len 0");
  expect_error([&] { cj.val_batch(0, 2, 64, b); }, {"val_batch", "validation sequences"},
               "val range");
  expect_error([&] { cj.train_batch(0, 0, -1, 8, b); }, {"count"}, "negative count");
}

}  // namespace
}  // namespace examoe::test
