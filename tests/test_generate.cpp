// Generation: the KV-cache decoder against the full forward of the same tokens (every
// position, float and double, ranks without sequences included), sampling (greedy ties,
// top-k and temperature against hand-computed probabilities, reproducible from the seed),
// the same generated tokens at every rank count, the held-out accuracy against the one
// train() reports, and the bad inputs of `examoe generate`, each agreed on every rank.
#include "test_util.hpp"

#include "model/decoder.hpp"

#include <examoe/checkpoint_dir.hpp>
#include <examoe/config.hpp>
#include <examoe/generate.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace examoe::test {
namespace {

ModelConfig small_model(Activation act) {
  ModelConfig m;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 2;
  m.seq_len = 8;
  m.d_hidden = 24;
  m.num_experts = 4;
  m.top_k = 2;
  m.activation = act;
  return m;
}

/// Sequences of this rank: rank 1 has none (it only serves its experts), rank r another r + 2.
int sequences_of_rank(int rank) { return rank == 1 ? 0 : rank + 2; }

/// Random tokens of this rank's sequences, [B][S], a hash of (rank, sequence, position).
Batch random_batch(int rank, int B, int S) {
  Batch b;
  b.batch = B;
  b.seq_len = S;
  for (int i = 0; i < B * S; ++i)
    b.tokens.push_back(static_cast<int>(impl::hash_key(99, static_cast<std::uint64_t>(rank), static_cast<std::uint64_t>(i), 0) % 256));
  b.targets.assign(b.tokens.size(), -1);
  return b;
}

/// Logits of the decoder fed the batch position by position, in the layout of
/// Model::evaluate ([B*S][V], row b*S + s).
template <class S>
std::vector<double> decoded_logits(Model<S>& model, const Batch& b) {
  const int V = model.config().vocab, Sq = b.seq_len, B = b.batch;
  impl::IncrementalDecoder<S> dec(model, B);
  std::vector<double> out(static_cast<std::size_t>(B) * Sq * V);
  std::vector<S> lg;
  for (int s = 0; s < Sq; ++s) {
    std::vector<int> in;
    for (int i = 0; i < B; ++i) in.push_back(b.tokens[static_cast<std::size_t>(i) * Sq + s]);
    dec.step(in, lg);
    EXPECT_EQ(dec.position(), s + 1);
    for (int i = 0; i < B; ++i)
      for (int c = 0; c < V; ++c)
        out[(static_cast<std::size_t>(i) * Sq + s) * V + c] = lg[static_cast<std::size_t>(i) * V + c];
  }
  return out;
}

template <class S>
void check_cache_against_full_forward(Activation act, double tol_relative, bool ulp_check) {
  Mesh mesh(MPI_COMM_WORLD);
  const ModelConfig cfg = small_model(act);
  Model<S> model(cfg, ParallelConfig{}, mesh, 5);
  const int rank = world_rank(), B = sequences_of_rank(rank), Sq = cfg.seq_len, V = cfg.vocab;
  const Batch b = random_batch(rank, B, Sq);
  std::vector<float> full;
  model.evaluate(b, nullptr, &full);
  const std::vector<double> dec = decoded_logits(model, b);
  ASSERT_EQ(full.size(), dec.size());
  double worst = 0, spread = 0;
  for (int s = 0; s < Sq; ++s) {
    double diff = 0, scale = 0;
    for (int i = 0; i < B; ++i)
      for (int c = 0; c < V; ++c) {
        const std::size_t k = (static_cast<std::size_t>(i) * Sq + s) * V + c;
        diff = std::max(diff, std::abs(dec[k] - full[k]));
        scale = std::max(scale, std::abs(static_cast<double>(full[k])));
        spread = std::max(spread, std::abs(static_cast<double>(full[k]) - full[(static_cast<std::size_t>(i) * Sq) * V + c]));
        if (ulp_check) {  // double: the decoder's logit rounds to the float the full forward gives, within 1 ulp
          const float f = full[k], up = std::nextafter(std::abs(f), std::numeric_limits<float>::infinity());
          EXPECT_LE(std::abs(static_cast<float>(dec[k]) - f), up - std::abs(f)) << "sequence " << i << " position " << s << " id " << c;
        }
      }
    if (B > 0) EXPECT_LE(diff, tol_relative * scale) << "position " << s << ": |decoder - full| " << diff << ", max |logit| " << scale;
    worst = std::max(worst, scale > 0 ? diff / scale : 0.0);
  }
  if (B > 0 && Sq > 1) EXPECT_GT(spread, 1e-2) << "the logits do not depend on the position: the check would be empty";
  if (rank == 0) std::printf("KV cache vs full forward (%s, %s): max relative difference %.3g over %d positions\n",
                             sizeof(S) == 4 ? "float" : "double", act == Activation::gelu ? "gelu" : "swiglu", worst, Sq);
}

TEST(Generate, KvCacheEqualsFullForwardFloat) {
  check_cache_against_full_forward<float>(Activation::gelu, 1e-5, false);
  check_cache_against_full_forward<float>(Activation::swiglu, 1e-5, false);
}

TEST(Generate, KvCacheEqualsFullForwardDouble) {
  check_cache_against_full_forward<double>(Activation::gelu, 1e-7, true);
  check_cache_against_full_forward<double>(Activation::swiglu, 1e-7, true);
}

TEST(Generate, DecoderRefusesAFullCacheAndBadTokensOnEveryRank) {
  Mesh mesh(MPI_COMM_WORLD);
  ModelConfig cfg = small_model(Activation::gelu);
  cfg.seq_len = 3;
  Model<float> model(cfg, ParallelConfig{}, mesh, 5);
  const bool holder = world_rank() == 0;
  impl::IncrementalDecoder<float> dec(model, holder ? 1 : 0);
  std::vector<float> lg;
  const std::vector<int> bad = holder ? std::vector<int>{256} : std::vector<int>{};
  try {
    dec.step(bad, lg);
    ADD_FAILURE() << "token 256 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token 256 (sequence 0) is outside the vocabulary [0, 256)"), std::string::npos) << e.what();
  }
  const std::vector<int> ok = holder ? std::vector<int>{7} : std::vector<int>{};
  for (int s = 0; s < 3; ++s) dec.step(ok, lg);
  EXPECT_EQ(lg.size(), holder ? 256u : 0u);
  try {
    dec.step(ok, lg);
    ADD_FAILURE() << "a fourth position accepted with seq_len 3";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the cache is full"), std::string::npos) << e.what();
  }
  dec.reset();
  dec.step(ok, lg);
  EXPECT_EQ(dec.position(), 1);
}

TEST(Generate, GreedyTakesTheLowestIdAmongTies) {
  const SamplingOptions greedy;
  EXPECT_EQ(sample_token({1.0, 3.0, 3.0, 2.0}, greedy, 0), 1);
  EXPECT_EQ(sample_token({-1.0, -1.0}, greedy, 5), 0);
  EXPECT_EQ(sample_token({0.0, 0.0, 4.5}, greedy, 9), 2);
  SamplingOptions top1{1.0, 1, 123};  // top-1 is greedy at any temperature and seed
  for (long long p = 0; p < 50; ++p) EXPECT_EQ(sample_token({0.5, 2.0, 2.0, 1.9}, top1, p), 1);
}

TEST(Generate, SamplingFollowsSoftmaxOfTheTopK) {
  // Top-2 of {0, log 3, -1, -2} are ids 1 and 0 with p = 3/4 and 1/4 at temperature 1; the
  // same at temperature 2 from {0, log 9, ...}: softmax(z / T). The inverse CDF picks id 1
  // exactly when u < 3/4, u = uniform01(hash_key(seed, 0x67656E, position, 0)).
  const std::vector<double> l1 = {0.0, std::log(3.0), -1.0, -2.0}, l2 = {0.0, std::log(9.0), -3.0, -5.0};
  for (const auto& [logits, T] : {std::make_pair(l1, 1.0), std::make_pair(l2, 2.0)}) {
    const SamplingOptions o{T, 2, 42};
    int ones = 0;
    const int n = 4000;
    for (long long p = 0; p < n; ++p) {
      const double u = impl::uniform01(impl::hash_key(42, 0x67656E, static_cast<std::uint64_t>(p), 0));
      const int t = sample_token(logits, o, p);
      ASSERT_EQ(t, u < 0.75 ? 1 : 0) << "position " << p << " u " << u;
      ones += t == 1;
    }
    EXPECT_NEAR(static_cast<double>(ones) / n, 0.75, 0.03);
  }
  // Without top-k every token has its softmax share: {0, 0, log 2} -> 1/4, 1/4, 1/2.
  std::vector<int> count(3, 0);
  for (long long p = 0; p < 8000; ++p) ++count[sample_token({0.0, 0.0, std::log(2.0)}, SamplingOptions{1.0, 0, 7}, p)];
  EXPECT_NEAR(count[0] / 8000.0, 0.25, 0.02);
  EXPECT_NEAR(count[1] / 8000.0, 0.25, 0.02);
  EXPECT_NEAR(count[2] / 8000.0, 0.50, 0.02);
  // Reproducible from the seed, different with another.
  const std::vector<double> flat(50, 0.0);
  std::vector<int> a, b, c;
  for (long long p = 0; p < 20; ++p) {
    a.push_back(sample_token(flat, SamplingOptions{1.0, 0, 3}, p));
    b.push_back(sample_token(flat, SamplingOptions{1.0, 0, 3}, p));
    c.push_back(sample_token(flat, SamplingOptions{1.0, 0, 4}, p));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST(Generate, SamplingRefusesBadOptions) {
  EXPECT_THROW(sample_token({}, SamplingOptions{}, 0), Error);
  EXPECT_THROW(sample_token({1.0}, SamplingOptions{-1.0, 0, 0}, 0), Error);
  EXPECT_THROW(sample_token({1.0}, SamplingOptions{std::nan(""), 0, 0}, 0), Error);
  EXPECT_THROW(sample_token({1.0}, SamplingOptions{1.0, -2, 0}, 0), Error);
}

TEST(Generate, TokenListsParseOrNameTheBadEntry) {
  EXPECT_EQ(parse_token_list("1,2,3"), (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(parse_token_list(" 40 , 5"), (std::vector<int>{40, 5}));
  auto error_of = [](const std::string& text) {
    try {
      parse_token_list(text);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of("1,,2").find("entry 1 ''"), std::string::npos) << error_of("1,,2");
  EXPECT_NE(error_of("1,x").find("entry 1 'x'"), std::string::npos) << error_of("1,x");
  EXPECT_NE(error_of("-1").find("entry 0 '-1'"), std::string::npos) << error_of("-1");
  EXPECT_NE(error_of("99999999999").find("is not a token id"), std::string::npos);
  EXPECT_NE(error_of("").find("entry 0 ''"), std::string::npos);
}

/// generate_tokens on the world and on this rank alone (a 1-rank model of the same seed).
void expect_same_at_every_rank_count(const GenerateOptions& o) {
  const ModelConfig cfg = small_model(Activation::swiglu);
  Mesh world(MPI_COMM_WORLD), alone(MPI_COMM_SELF);
  Model<float> mw(cfg, ParallelConfig{}, world, 5), ma(cfg, ParallelConfig{}, alone, 5);
  const GenerateResult rw = generate_tokens(mw, o), ra = generate_tokens(ma, o);
  EXPECT_EQ(rw.tokens, ra.tokens);
  EXPECT_EQ(rw.stop, ra.stop);
  // Every rank holds the same result.
  std::vector<int> r0 = rw.tokens;
  int n = static_cast<int>(r0.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  r0.resize(n);
  MPI_Bcast(r0.data(), n, MPI_INT, 0, MPI_COMM_WORLD);
  EXPECT_EQ(rw.tokens, r0);
}

TEST(Generate, GreedyAndSampledTokensAreTheSameAtEveryRankCount) {
  GenerateOptions o;
  o.prompt = {'1', '2', '+', '3', '4', '='};
  o.max_new = 4;
  expect_same_at_every_rank_count(o);  // greedy
  o.sampling = SamplingOptions{0.9, 20, 11};
  expect_same_at_every_rank_count(o);
}

TEST(Generate, StopsAtMaxNewTheStopTokenOrTheSequenceLength) {
  ModelConfig cfg = small_model(Activation::gelu);
  cfg.seq_len = 6;
  Mesh mesh(MPI_COMM_WORLD);
  Model<float> model(cfg, ParallelConfig{}, mesh, 5);
  GenerateOptions o;
  o.prompt = {3, 1, 4, 1};
  o.max_new = 100;
  const GenerateResult full = generate_tokens(model, o);
  EXPECT_EQ(full.stop, GenerateStop::seq_len);
  EXPECT_EQ(full.tokens.size(), 3u);  // from positions 3, 4 and 5: 6 - 4 + 1
  o.max_new = 2;
  const GenerateResult two = generate_tokens(model, o);
  EXPECT_EQ(two.stop, GenerateStop::max_new);
  EXPECT_EQ(two.tokens, std::vector<int>(full.tokens.begin(), full.tokens.begin() + 2));
  o.max_new = 100;
  o.stop_token = full.tokens[1];
  const GenerateResult stop = generate_tokens(model, o);
  EXPECT_EQ(stop.stop, GenerateStop::stop_token);
  EXPECT_EQ(stop.tokens.back(), full.tokens[1]);
  EXPECT_LE(stop.tokens.size(), 2u);
}

TEST(Generate, BadPromptsAreAgreedOnEveryRank) {
  const ModelConfig cfg = small_model(Activation::gelu);
  Mesh mesh(MPI_COMM_WORLD);
  Model<float> model(cfg, ParallelConfig{}, mesh, 5);
  auto expect_error = [&](GenerateOptions o, const std::string& needle) {
    try {
      generate_tokens(model, o);
      ADD_FAILURE() << "no error; expected '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    MPI_Barrier(MPI_COMM_WORLD);
  };
  GenerateOptions o;
  expect_error(o, "the prompt is empty");
  o.prompt = {1, 300, 2};
  expect_error(o, "prompt token 300 (position 1) is outside the model's vocabulary [0, 256)");
  o.prompt.assign(9, 65);
  expect_error(o, "the prompt holds 9 tokens; the model was trained with seq_len 8");
  o.prompt = {65};
  o.max_new = 0;
  expect_error(o, "--max-new must be at least 1");
  o.max_new = 3;
  o.sampling.temperature = -0.5;
  expect_error(o, "--temperature must be a finite number >= 0");
}

#if EXAMOE_ENABLE_HDF5  // checkpoints need parallel HDF5
/// One trained checkpoint (double, the addition corpus) shared by the tests that read one,
/// and what train() reported for it.
class GenerateCheckpoint : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_shared_dir("generate", "ckpt");
    TrainConfig c = tiny_train_config();
    c.train.steps = 60;
    c.data.val_problems = 64;
    c.checkpoint.dir = dir_;
    c.checkpoint.interval = c.train.steps;
    result_ = train(c, MPI_COMM_WORLD, nullptr);
    path_ = checkpoint_path(dir_, c.train.steps);
  }
  static void TearDownTestSuite() { remove_shared_dir(dir_); }
  static std::string dir_, path_;
  static TrainResult result_;
};
std::string GenerateCheckpoint::dir_, GenerateCheckpoint::path_;
TrainResult GenerateCheckpoint::result_;

TEST_F(GenerateCheckpoint, HeldOutAccuracyIsTheOneTrainReported) {
  GenerateRequest q;
  q.checkpoint = path_;
  q.held_out = true;
  const GenerateOutcome o = generate_from_checkpoint(q, MPI_COMM_WORLD);
  EXPECT_EQ(o.held_out.problems, 64);
  EXPECT_DOUBLE_EQ(o.held_out.accuracy(), result_.final.accuracy);
  if (world_rank() == 0)
    std::printf("held-out: generated %d/%d exact, train reported %.4f\n", o.held_out.exact, o.held_out.problems,
                result_.final.accuracy);
  // And a prompt: the addition corpus stops at '\n' (or at --max-new / seq_len).
  GenerateRequest p;
  p.checkpoint = path_;
  p.has_text = true;
  p.prompt_text = "12+34=";
  const GenerateOutcome g = generate_from_checkpoint(p, MPI_COMM_WORLD);
  EXPECT_TRUE(g.addition);
  EXPECT_EQ(g.prompt, (std::vector<int>{'1', '2', '+', '3', '4', '='}));
  ASSERT_FALSE(g.result.tokens.empty());
  if (g.result.stop == GenerateStop::stop_token) EXPECT_EQ(g.result.tokens.back(), '\n');
}

TEST_F(GenerateCheckpoint, BadRequestsNameTheProblemOnEveryRank) {
  auto expect_error = [&](GenerateRequest q, const std::string& needle) {
    try {
      generate_from_checkpoint(q, MPI_COMM_WORLD);
      ADD_FAILURE() << "no error; expected '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    MPI_Barrier(MPI_COMM_WORLD);  // every rank got here: nobody hangs
  };
  GenerateRequest q;
  q.checkpoint = dir_ + "/no-such-checkpoint.h5";
  q.has_text = true;
  q.prompt_text = "1+1=";
  expect_error(q, "no-such-checkpoint.h5");
  q.checkpoint = path_;
  GenerateRequest none = q;
  none.has_text = false;
  expect_error(none, "no prompt: give --prompt TEXT or --prompt-tokens");
  GenerateRequest empty = q;
  empty.prompt_text = "";
  expect_error(empty, "the prompt is empty");
  GenerateRequest longer = q;
  longer.prompt_text = std::string(17, '1');
  expect_error(longer, "the prompt holds 17 tokens; the model was trained with seq_len 16");
  GenerateRequest ids = q;
  ids.has_text = false;
  ids.has_tokens = true;
  ids.prompt_tokens = "49,43,256";
  expect_error(ids, "prompt token 256 (position 2) is outside the model's vocabulary [0, 256)");
  ids.prompt_tokens = "49,oops";
  expect_error(ids, "--prompt-tokens entry 1 'oops' is not a token id");
  GenerateRequest both = ids;
  both.has_text = true;
  expect_error(both, "give --prompt or --prompt-tokens, not both");
  GenerateRequest held = q;
  held.held_out = true;
  expect_error(held, "--held-out takes no prompt");
  GenerateRequest zero = q;
  zero.max_new = 0;
  expect_error(zero, "--max-new must be at least 1");
  // Not a checkpoint: the checkpoint reader's own error.
  const std::string junk = dir_ + "/junk.h5";
  if (world_rank() == 0) {
    std::FILE* f = std::fopen(junk.c_str(), "wb");
    std::fputs("not a checkpoint", f);
    std::fclose(f);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  GenerateRequest bad = q;
  bad.checkpoint = junk;
  expect_error(bad, "junk.h5");
}

#endif  // EXAMOE_ENABLE_HDF5

}  // namespace
}  // namespace examoe::test
