// Bad input, class by class (docs/errors.md lists every row with the test that covers it):
// every config key with a value of the wrong type and out of range, unknown keys, configs that
// differ between ranks, dp x ep against the world size, models that cannot fit in memory,
// bad data files, non-finite layer inputs and out-of-range eval tokens. Each case asserts
// that EVERY rank throws examoe::Error naming the problem, and that the ranks are still in
// step afterwards (a barrier completes).
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/model.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace examoe::test {
namespace {

int g_tried = 0;  // bad inputs tried in this process (printed by rank 0)

/// Outcome of running `f` on every rank: whether this rank threw examoe::Error, and its text.
struct Outcome {
  bool threw = false, other = false;
  std::string what;
};
template <class F>
Outcome run_catching(F&& f) {
  Outcome o;
  try {
    f();
  } catch (const examoe::Error& e) {
    o.threw = true;
    o.what = e.what();
  } catch (const std::exception& e) {
    o.other = true;
    o.what = e.what();
  }
  return o;
}

/// This rank threw examoe::Error whose message contains every needle and starts with the
/// function that found the problem.
::testing::AssertionResult local_error(const Outcome& o, const std::vector<std::string>& needles, const std::string& what) {
  if (o.other) return ::testing::AssertionFailure() << what << ": threw a non-examoe exception: " << o.what;
  if (!o.threw) return ::testing::AssertionFailure() << what << ": no examoe::Error on rank " << world_rank();
  for (const auto& n : needles)
    if (o.what.find(n) == std::string::npos)
      return ::testing::AssertionFailure() << what << ": the message does not contain '" << n << "': " << o.what;
  if (o.what.rfind("examoe", 0) != 0)
    return ::testing::AssertionFailure() << what << ": the message does not start with the function: " << o.what;
  return ::testing::AssertionSuccess();
}

/// Collects the cases of one test: each is checked on this rank at once, and whether every
/// rank threw is agreed in one allreduce at the end (which also shows that no rank is left
/// behind in a collective: all of them reach it).
class EveryRank {
 public:
  void add(const Outcome& o, const std::vector<std::string>& needles, const std::string& what) {
    EXPECT_TRUE(local_error(o, needles, what));
    threw_.push_back(o.threw && !o.other ? 1 : 0);
    what_.push_back(what);
    ++g_tried;
  }
  ~EveryRank() {
    std::vector<int> all(threw_.size(), 0);
    int n = static_cast<int>(threw_.size()), n0 = n;
    MPI_Bcast(&n0, 1, MPI_INT, 0, MPI_COMM_WORLD);
    EXPECT_EQ(n, n0) << "ranks ran different numbers of cases";
    if (n != n0) return;
    MPI_Allreduce(threw_.data(), all.data(), n, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    for (int i = 0; i < n; ++i) EXPECT_EQ(all[i], 1) << what_[i] << ": not every rank threw examoe::Error";
  }

 private:
  std::vector<int> threw_;
  std::vector<std::string> what_;
};

TrainConfig base() {
  TrainConfig c = tiny_train_config();
  c.train.steps = 1;
  return c;
}

const ConfigKey& key(const std::string& name) {
  for (const auto& k : config_keys())
    if (k.name == name) return k;
  throw std::runtime_error("no config key " + name);
}

std::string shared_dir(const std::string& tag) { return examoe::test::make_shared_dir("input", tag); }
void remove_dir(const std::string& d) { examoe::test::remove_shared_dir(d); }


// ------------------------------------------------------------------ every key, wrong type

/// Values of the wrong type for a key of type `type` (as text, the way the command line and
/// the JSON reader hand them to ConfigKey::set).
std::vector<std::string> wrong_type_values(const std::string& type) {
  if (type == "INT") return {"abc", "1.5", "", "12x", "99999999999"};
  if (type == "UINT") return {"-1", "abc", "1.5", ""};
  if (type == "FLOAT") return {"abc", "", "1.5x", "nan", "inf", "-inf"};
  if (type == "BOOL") return {"maybe", "2", ""};
  if (type.find('|') != std::string::npos) return {"bogus", ""};  // choices
  return {};  // TEXT: any text is a string; wrong JSON types below
}

TEST(InputErrors, EveryKeyWrongType) {
  EveryRank er;
  int tried = 0;
  for (const auto& k : config_keys()) {
    for (const auto& v : wrong_type_values(k.type)) {
      TrainConfig c = base();
      const Outcome o = run_catching([&] { k.set(c, v); });
      er.add(o, {k.name, "'" + v + "'"}, "--" + k.name + " '" + v + "'");
      ++tried;
    }
    // JSON: a string where a number or boolean belongs, and for every key an array, an
    // object, and null (no key takes those).
    std::vector<std::pair<std::string, std::vector<std::string>>> json;
    if (k.type == "INT" || k.type == "UINT" || k.type == "FLOAT" || k.type == "BOOL")
      json.push_back({"\"many\"", {k.name, "'many'"}});
    json.push_back({"[1, 2]", {k.name, "unsupported value"}});
    json.push_back({"null", {k.name, "unsupported value"}});
    json.push_back({"{\"x\": 1}", {k.name, "unsupported value"}});
    for (const auto& [value, needles] : json) {
      TrainConfig c = base();
      const std::string text = "{\"" + k.name + "\": " + value + "}";
      const Outcome o = run_catching([&] { apply_json_config(c, text, "bad.json"); });
      er.add(o, needles, text);
      ++tried;
    }
  }
  if (world_rank() == 0) std::printf("[ inputs ] %d wrong-type values over %zu keys\n", tried, config_keys().size());
}

// ------------------------------------------------------------------ every key, out of range

/// Keys whose every well-typed value is valid, and why; every other key must have an entry in
/// the out-of-range table below (a new key fails this test until it is classified).
const std::map<std::string, std::string>& keys_without_range() {
  static const std::map<std::string, std::string> m = {
      {"model.activation", "a choice: only the wrong-type case exists"},
      {"train.nonfinite", "a choice: only the wrong-type case exists"},
      {"parallel.gpu_aware_mpi", "a choice: only the wrong-type case exists"},
      {"parallel.comm", "a choice; nccl where this build cannot run it: Comm.BadBackendOptionsFailOnEveryRank"},
      {"model.router.renormalize", "boolean"},
      {"parallel.reshard_after_forward", "boolean"},
      {"parallel.activation_checkpointing", "boolean"},
      {"log.quiet", "boolean"},
      {"train.seed", "every 64-bit value is a seed"},
      {"data.path", "a file: InputErrors.DataFiles"},
      {"log.metrics", "a file: InputErrors.DataFiles (a directory), TrainCheckpointDir.NoOutputOverwritesACheckpointOrAnInput"},
      {"checkpoint.allow_existing", "boolean; what it allows: TrainCheckpointDir.RunIdsAndPruningOfTheRunsOwnCheckpointsOnly"},
      {"checkpoint.resume", "a file: TrainCheckpoint.BadFilesGiveClearErrorsAndDamageNothing"},
  };
  return m;
}

struct Bad {
  std::string value;
  std::vector<std::string> needles;  ///< besides the key name
};

/// Out-of-range values per key (valid type), with what the message must also say.
std::map<std::string, std::vector<Bad>> out_of_range() {
  const std::string P = std::to_string(world_size());
  return {
      {"model.d_model", {{"0", {"positive"}}, {"-16", {"positive"}}}},
      {"model.n_layers", {{"0", {"positive"}}}},
      {"model.n_heads", {{"0", {"positive"}}, {"3", {"divisor of model.d_model"}}}},
      {"model.seq_len", {{"0", {"positive"}}, {"5", {"seq_len (5) is shorter than the longest"}}}},
      {"model.d_hidden", {{"0", {"positive"}}, {"-1", {"positive"}}}},
      {"model.num_experts", {{"0", {"positive"}}, {"1", {"top_k"}}}},
      {"model.top_k", {{"0", {"[1, model.num_experts"}}, {"5", {"[1, model.num_experts = 4]"}}}},
      {"model.router.temperature", {{"0", {"positive"}}, {"-1", {"positive"}}}},
      {"model.router.jitter", {{"-0.5", {">= 0"}}}},
      {"model.router.aux_loss_coef", {{"-1", {">= 0"}}}},
      {"model.router.z_loss_coef", {{"-1e-3", {">= 0"}}}},
      {"model.norm_eps", {{"0", {"positive"}}, {"-1e-5", {"positive"}}}},
      {"parallel.ep", {{"-1", {">= 0"}}, {std::to_string(world_size() + 1), {"must divide the world size " + P}}}},
      {"train.steps", {{"-1", {">= 0"}}}},
      {"train.batch", {{"0", {"positive"}}}},
      {"train.lr", {{"0", {"positive"}}, {"-0.1", {"positive"}}}},
      {"train.min_lr", {{"-1", {"[0, train.lr"}}, {"1", {"[0, train.lr = 0.01]"}}}},
      {"train.warmup", {{"-1", {">= 0"}}}},
      {"train.weight_decay", {{"-0.1", {">= 0"}}}},
      {"train.beta1", {{"1", {"[0, 1)"}}, {"-0.1", {"[0, 1)"}}}},
      {"train.beta2", {{"1.5", {"[0, 1)"}}}},
      {"train.eps", {{"0", {"positive"}}}},
      {"train.clip", {{"-1", {">= 0"}}}},
      {"train.precision", {{"half", {"float or double"}}}},
      {"train.max_skipped", {{"0", {">= 1"}}}},
      {"parallel.watchdog_seconds", {{"-1", {">= 0"}}}},
      {"train.memory_limit", {{"lots", {"auto, off or a size"}}, {"-1GiB", {"auto, off or a size"}},
                              {"4KiB", {"4096 bytes", "available per rank"}}}},
      {"data.digits", {{"0", {"[1, 6]"}}, {"7", {"[1, 6]"}}}},
      {"data.val_problems", {{"0", {"positive"}}, {"100000", {"exceeds"}}}},
      {"data.val_fraction", {{"0", {"(0, 0.5]"}}, {"0.75", {"(0, 0.5]"}}}},
      {"log.interval", {{"0", {"positive"}}}},
      {"log.eval_interval", {{"-5", {"positive"}}}},
      {"checkpoint.dir", {{"", {"not empty"}}}},
      {"checkpoint.interval", {{"-1", {">= 0"}}}},
      {"checkpoint.keep", {{"0", {">= 1"}}}},
      {"placement.rebalance_interval", {{"-1", {">= 0"}}}},
      {"placement.ema", {{"1", {"[0, 1)"}}, {"-0.5", {"[0, 1)"}}}},
  };
}

TEST(InputErrors, EveryKeyOutOfRange) {
  EveryRank er;
  const auto table = out_of_range();
  int tried = 0;
  for (const auto& k : config_keys()) {
    const auto it = table.find(k.name);
    if (it == table.end()) {
      EXPECT_TRUE(keys_without_range().count(k.name))
          << k.name << " is neither in the out-of-range table nor listed as having no range";
      continue;
    }
    for (const Bad& b : it->second) {
      TrainConfig c = base();
      k.set(c, b.value);  // well-typed
      std::vector<std::string> needles = b.needles;
      // The message names the key; errors found by the corpus name its own field, and a
      // too-small model.num_experts shows as the top_k that no longer fits.
      if (k.name == "model.seq_len" && b.value == "5") needles.push_back("examoe::AdditionCorpus");
      else if (k.name == "data.val_problems" && b.value != "0") needles.push_back("num_val_problems");
      else if (k.name == "model.num_experts" && b.value == "1") needles.push_back("model.top_k");
      else needles.push_back(k.name);
      const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
      er.add(o, needles, k.name + " = '" + b.value + "'");
      ++tried;
    }
  }
  for (const auto& [name, why] : keys_without_range()) {
    bool exists = false;
    for (const auto& k : config_keys()) exists = exists || k.name == name;
    EXPECT_TRUE(exists) << name << " (" << why << ") is not a config key any more";
  }
  if (world_rank() == 0) std::printf("[ inputs ] %d out-of-range values over %zu keys\n", tried, table.size());
}

TEST(InputErrors, UnknownKeysNameTheNearestKey) {
  EveryRank er;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"model": {"d_modle": 32}})", "model.d_model"},
      {R"({"train": {"wamrup": 3}})", "train.warmup"},
      {R"({"trian": {"steps": 3}})", "train.steps"},
      {R"({"model": {"router": {"temprature": 2}}})", "model.router.temperature"},
      {R"({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}})", "'a.b.c.d"},
  };
  for (const auto& [text, needle] : cases) {
    TrainConfig c = base();
    const Outcome o = run_catching([&] { apply_json_config(c, text, "bad.json"); });
    er.add(o, {"unknown key", needle, "bad.json"}, text);
  }
  // Not JSON, not an object.
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {"{not json", "not valid JSON"}, {"[1, 2]", "must hold a JSON object"}, {"", "not valid JSON"}}) {
    TrainConfig c = base();
    const Outcome o = run_catching([&] { apply_json_config(c, text, "bad.json"); });
    er.add(o, {needle, "bad.json"}, text);
  }
  EXPECT_EQ(closest_key("dmodel"), "model.d_model");
  EXPECT_EQ(closest_key("model.num_expert"), "model.num_experts");
}

TEST(InputErrors, JsonNumbersAtTheLimits) {
  EveryRank er;
  TrainConfig c = base();
  apply_json_config(c, R"({"train": {"seed": 18446744073709551615}, "model.d_model": 2147483647})", "limits.json");
  EXPECT_EQ(c.train.seed, 18446744073709551615ull) << "the largest seed reads back";
  EXPECT_EQ(c.model.d_model, 2147483647);
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {R"({"model": {"router": {"temperature": 1e400}}})", "limits.json is not valid JSON: [json.exception.out_of_range.406] number overflow"},
           {R"({"model.d_model": 2147483648})", "model.d_model must be an integer, got '2147483648'"},
           {R"({"train.seed": -1})", "train.seed must be a non-negative integer, got '-1'"},
           {R"({"train.steps": 1.5})", "train.steps must be an integer, got '1.5'"}}) {
    TrainConfig t = base();
    er.add(run_catching([&] { apply_json_config(t, text, "limits.json"); }), {needle}, text);
  }
}

// ------------------------------------------------------------------ configs differ between ranks

TEST(InputErrors, ConfigHashCoversEveryKey) {
  const TrainConfig a = base();
  EXPECT_EQ(config_hash(a), config_hash(base()));
  // Changing any one key to another valid value changes the hash.
  for (const auto& k : config_keys()) {
    TrainConfig b = a;
    const std::string v = k.get(a);
    std::string w;
    if (k.type == "INT") w = std::to_string(std::stoi(v) + 1);
    else if (k.type == "UINT") w = std::to_string(std::stoull(v) + 1);
    else if (k.type == "FLOAT") w = std::to_string(std::stod(v) * 0.5 + 0.125);
    else if (k.type == "BOOL") w = v == "true" ? "false" : "true";
    else if (k.type.find('|') != std::string::npos) {  // a choice: another one of them
      std::string rest = k.type + "|";
      for (std::size_t p = 0; (p = rest.find('|')) != std::string::npos; rest.erase(0, p + 1))
        if (rest.substr(0, p) != v) {
          w = rest.substr(0, p);
          break;
        }
    } else
      w = v + "x";
    k.set(b, w);
    EXPECT_NE(config_hash(a), config_hash(b)) << k.name << ": " << v << " -> " << w;
  }
}

TEST(InputErrors, ConfigDiffersBetweenRanks) {
  EveryRank er;
  const int P = world_size(), me = world_rank();
  if (P == 1) GTEST_SKIP() << "needs at least 2 ranks";
  // Rank 1 has another expert width; the last rank (if not 1) another learning rate and
  // batch. Keys whose difference would hang or crash a collective later (sizes of all-to-all
  // buffers, the mesh) are caught first.
  TrainConfig c = base();
  if (me == 1) c.model.d_hidden = 32;
  if (me == P - 1 && P > 2) {
    c.train.lr = 0.02;
    c.train.batch = 12;
  }
  const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
  std::vector<std::string> needles = {"config differs between ranks", "rank 1 has model.d_hidden = 32 (rank 0: 24)"};
  if (P > 2) {
    needles.push_back("rank " + std::to_string(P - 1) + " has train.batch = 12 (rank 0: 8)");
    needles.push_back("train.lr = 0.02 (rank 0: 0.01)");
  }
  er.add(o, needles, "differing configs");
  // A difference in a key no collective depends on (the metrics file) is still a difference.
  TrainConfig m = base();
  if (me == P - 1) m.log.metrics = "/tmp/other.jsonl";
  const Outcome om = run_catching([&] { train(m, MPI_COMM_WORLD, nullptr); });
  er.add(om, {"rank " + std::to_string(P - 1) + " has log.metrics = /tmp/other.jsonl (rank 0: )"},
                               "differing metrics path");
  // parallel.ep differing between ranks.
  TrainConfig e = base();
  if (me == 0) e.parallel.ep = 1;
  const Outcome oe = run_catching([&] { train(e, MPI_COMM_WORLD, nullptr); });
  er.add(oe, {"differs between ranks", "parallel.ep = 0 (rank 0: 1)"}, "differing ep");
  // Same config again: trains.
  const auto r = train(base(), MPI_COMM_WORLD, nullptr);
  EXPECT_EQ(r.losses.size(), 1u);
}

// ------------------------------------------------------------------ mesh

TEST(InputErrors, DpTimesEpMustBeTheWorldSize) {
  EveryRank er;
  const int P = world_size();
  std::vector<int> bad = {P + 1, 2 * P};
  if (P == 4) bad.push_back(3);
  for (int ep : bad) {
    TrainConfig c = base();
    c.parallel.ep = ep;
    const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
    er.add(o, {"parallel.ep = " + std::to_string(ep), "must divide the world size " + std::to_string(P)},
                                 "ep " + std::to_string(ep));
  }
  // More ranks in an expert-parallel group than experts.
  if (P >= 2) {
    TrainConfig c = base();
    c.model.num_experts = 1;
    c.model.top_k = 1;
    const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
    er.add(o, {"model.num_experts (1) must be at least the expert-parallel size ep = " + std::to_string(P)},
                                 "1 expert");
  }
}

// ------------------------------------------------------------------ memory

TEST(InputErrors, EstimateMatchesTheModelsOwnAccounting) {
  // The estimate is what the model reports after a step, field by field, for both FSDP
  // modes, with and without activation checkpointing, GELU and SwiGLU, every dp x ep split.
  const int P = world_size();
  // (ep, variant): 0 = reshard after forward, GELU; 1 = keep gathered units (dp = P);
  // 2 = activation checkpointing, SwiGLU.
  for (const auto [ep, variant] : {std::pair<int, int>{P, 0}, {1, 1}, {P, 2}}) {
    {
      TrainConfig c = base();
      c.parallel.ep = ep;
      c.model.num_experts = 5;  // uneven over 2..4 ranks
      c.parallel.reshard_after_forward = variant != 1;
      c.parallel.activation_checkpointing = variant == 2;
      c.model.activation = variant == 2 ? Activation::swiglu : Activation::gelu;
      Mesh mesh(MPI_COMM_WORLD, ep);
      Model<double> model(c.model, c.parallel, mesh, 3);
      AdditionCorpus corpus(c.train.seed, c.data.digits, c.data.val_problems);
      Batch b;
      corpus.train_batch(0, 0, 3, c.model.seq_len, b);  // 3 sequences on every rank
      model.forward_backward(b, 3LL * P * c.model.seq_len, 0);
      const MemoryReport got = model.memory();
      const MemoryReport est = estimate_memory(c.model, c.parallel, P, ep, 3LL * c.model.seq_len, sizeof(double));
      auto max_over_ranks = [](std::size_t v) {
        long long x = static_cast<long long>(v), m = 0;
        MPI_Allreduce(&x, &m, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
        return static_cast<std::size_t>(m);
      };
      const std::string what = "ep " + std::to_string(ep) + " variant " + std::to_string(variant);
      EXPECT_EQ(est.dense_total_params, got.dense_total_params) << what;
      EXPECT_EQ(est.expert_total_params, got.expert_total_params) << what;
      EXPECT_EQ(est.dense_shard, got.dense_shard) << what;
      EXPECT_EQ(est.gathered_unit_max, got.gathered_unit_max) << what;
      EXPECT_EQ(est.gathered_peak, got.gathered_peak) << what;
      EXPECT_EQ(est.grad_buffer, got.grad_buffer) << what;
      EXPECT_EQ(est.experts, max_over_ranks(got.experts)) << what << ": the fullest rank's experts";
      EXPECT_EQ(est.optimizer, max_over_ranks(got.optimizer)) << what;
      EXPECT_EQ(est.activations, got.activations) << what;
      EXPECT_EQ(est.activations_without_checkpointing, got.activations_without_checkpointing) << what;
      EXPECT_GT(est.buffers, 0u);
      EXPECT_GT(est.total(), est.experts + est.optimizer + est.activations);
    }
  }
  // Absurd sizes saturate instead of wrapping around.
  ModelConfig huge;
  huge.d_model = 1 << 30;
  huge.d_hidden = 1 << 30;
  huge.num_experts = 1 << 30;
  huge.n_layers = 1 << 20;
  const MemoryReport h = estimate_memory(huge, ParallelConfig{}, 1, 1, 1LL << 40, 8);
  EXPECT_EQ(h.total(), std::numeric_limits<std::size_t>::max());
}

TEST(InputErrors, MoreExpertsThanMemoryAllows) {
  EveryRank er;
  const int P = world_size();
  // Physical memory (auto): a million experts of 1024 x 4096 cannot fit anywhere. Refused
  // before anything is allocated (this test would otherwise die of it).
  TrainConfig c = base();
  c.model.d_model = 1024;
  c.model.n_heads = 8;
  c.model.d_hidden = 4096;
  c.model.num_experts = 1000000;
  const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
  er.add(o, {"this config needs about", "are available per rank", "train.memory_limit = auto",
                                   "model.num_experts = 1000000 over ep = " + std::to_string(P)},
                               "a million experts");
  // An explicit limit: both numbers in the message, in bytes.
  TrainConfig t = base();
  t.train.memory_limit = "64KiB";
  const MemoryReport m = estimate_memory(t.model, t.parallel, P, P, 0, sizeof(double));
  EXPECT_GT(m.total(), 64u * 1024) << "the tiny model is expected to need more than 64 KiB";
  const Outcome ot = run_catching([&] { train(t, MPI_COMM_WORLD, nullptr); });
  er.add(ot, {"(65536 bytes) are available per rank (train.memory_limit = 64KiB)"}, "64 KiB");
  // Enough memory: trains ("auto" is every other training test's setting).
  TrainConfig g = base();
  g.train.memory_limit = "1GiB";
  EXPECT_EQ(train(g, MPI_COMM_WORLD, nullptr).losses.size(), 1u);
  std::string how;
  EXPECT_EQ(memory_limit_bytes("off", MPI_COMM_WORLD, &how), 0u) << "off: no limit";
  EXPECT_EQ(memory_limit_bytes("3MiB", MPI_COMM_WORLD, &how), 3u << 20);
  EXPECT_GT(memory_limit_bytes("auto", MPI_COMM_WORLD, &how), 0u) << how;
  EXPECT_NE(how.find("on this node"), std::string::npos) << how;
  std::size_t bytes = 0;
  EXPECT_TRUE(parse_memory_size("1.5GiB", bytes));
  EXPECT_EQ(bytes, 1610612736u);
  EXPECT_TRUE(parse_memory_size("2e9", bytes));
  EXPECT_EQ(bytes, 2000000000u);
  EXPECT_TRUE(parse_memory_size("512 MB", bytes));
  EXPECT_EQ(bytes, 512000000u);
  for (const char* bad : {"", "GiB", "-1", "1e30TiB", "nan", "3 apples"}) EXPECT_FALSE(parse_memory_size(bad, bytes)) << bad;
}

// ------------------------------------------------------------------ data files

TEST(InputErrors, DataFiles) {
  EveryRank er;
  const std::string dir = shared_dir("data");
  if (world_rank() == 0) {
    std::ofstream(dir + "/empty.txt").close();
    std::ofstream(dir + "/short.txt") << "0123456789";
    ::mkdir((dir + "/a_directory").c_str(), 0755);
    std::ofstream(dir + "/not_a_dir") << "x";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  struct Case {
    std::string what;
    std::function<void(TrainConfig&)> set;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"missing", [&](TrainConfig& c) { c.data.path = dir + "/missing.txt"; },
       {"cannot open '" + dir + "/missing.txt'", "No such file"}},
      {"empty", [&](TrainConfig& c) { c.data.path = dir + "/empty.txt"; }, {"'" + dir + "/empty.txt' is empty"}},
      {"directory", [&](TrainConfig& c) { c.data.path = dir + "/a_directory"; },
       {"cannot read '" + dir + "/a_directory'", "Is a directory"}},
      {"too short", [&](TrainConfig& c) { c.data.path = dir + "/short.txt"; },
       {"'" + dir + "/short.txt' (10 bytes) is too short for seq_len 16"}},
      {"metrics file is a directory", [&](TrainConfig& c) { c.log.metrics = dir + "/a_directory"; },
       {"cannot open metrics file '" + dir + "/a_directory'"}},
      {"checkpoint dir is a file", [&](TrainConfig& c) { c.checkpoint.dir = dir + "/not_a_dir"; c.checkpoint.interval = 1; },
       {"cannot create checkpoint directory '" + dir + "/not_a_dir'"}},
  };
  for (const auto& cs : cases) {
    TrainConfig c = base();
    cs.set(c);
    const Outcome o = run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); });
    er.add(o, cs.needles, cs.what);
  }
  remove_dir(dir);
}

// ------------------------------------------------------------------ non-finite layer inputs

TEST(InputErrors, NonFiniteLayerInputs) {
  EveryRank er;
  const int P = world_size(), me = world_rank();
  MoEConfig cfg = small_config(std::max(4, P), 2, Activation::gelu);
  const int T = 3;
  auto make_x = [&](double bad, int bad_rank) {
    Matrix<double> x("test::x", T, cfg.d_model);
    Kokkos::deep_copy(x, 0.25);
    if (me == bad_rank) {
      auto h = Kokkos::create_mirror_view(x);
      Kokkos::deep_copy(h, x);
      h(1, 2) = bad;
      Kokkos::deep_copy(x, h);
    }
    return x;
  };
  MoELayer<double> layer(cfg, MPI_COMM_WORLD);
  Matrix<double> out("test::out", T, cfg.d_model), dx("test::dx", T, cfg.d_model);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  struct Case {
    double v;
    const char* text;
  };
  for (const Case& cs : {Case{nan, "nan"}, Case{inf, "inf"}, Case{-inf, "-inf"}}) {
    const int bad_rank = P - 1;
    const Outcome o = run_catching([&] { layer.forward(make_x(cs.v, bad_rank), out); });
    er.add(o, {"examoe::MoELayer::forward: x contains non-finite values",
                                     std::string("x(1, 2) = ") + cs.text, "rank " + std::to_string(bad_rank)},
                                 cs.text);
  }
  // dout in backward.
  layer.forward(make_x(0.0, -1), out);
  Matrix<double> dout("test::dout", T, cfg.d_model);
  Kokkos::deep_copy(dout, 1.0);
  if (me == 0) {
    auto h = Kokkos::create_mirror_view(dout);
    Kokkos::deep_copy(h, dout);
    h(2, 0) = nan;
    Kokkos::deep_copy(dout, h);
  }
  const Outcome ob = run_catching([&] { layer.backward(dout, dx); });
  er.add(ob, {"examoe::MoELayer::backward: dout contains non-finite values", "dout(2, 0) = nan"},
                               "dout");
  // The layer is still usable: a finite forward/backward runs.
  Kokkos::deep_copy(dout, 1.0);
  layer.forward(make_x(0.0, -1), out);
  layer.backward(dout, dx);
  EXPECT_EQ(layer.stats().tokens, T);
  // With the check off, NaN flows through (the trainer's setting: train.nonfinite decides).
  MoEConfig off = cfg;
  off.check_finite_inputs = false;
  MoELayer<double> unchecked(off, MPI_COMM_WORLD);
  unchecked.forward(make_x(nan, 0), out);
  auto h = Kokkos::create_mirror_view(out);
  Kokkos::deep_copy(h, out);
  if (me == 0) EXPECT_TRUE(std::isnan(h(1, 0))) << "the unchecked layer should pass NaN on";
}

// ------------------------------------------------------------------ eval input files

#if EXAMOE_ENABLE_HDF5
void write_tokens(const std::string& path, const char* name, const std::vector<int>& v, int rows, int cols) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hsize_t dims[2] = {static_cast<hsize_t>(rows), static_cast<hsize_t>(cols)};
  hid_t sp = H5Screate_simple(2, dims, nullptr);
  hid_t ds = H5Dcreate2(f, name, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Dwrite(ds, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  H5Dclose(ds);
  H5Sclose(sp);
  H5Fclose(f);
}

TEST(InputErrors, EvalInputFiles) {
  EveryRank er;
  const std::string dir = shared_dir("eval");
  TrainConfig c = base();
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 1;
  // Written by rank 0 alone (collective HDF5 writes on oversubscribed ranks are slow); any
  // rank count reads it.
  if (world_rank() == 0) train(c, MPI_COMM_SELF, nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string ckpt = checkpoint_path(dir, 1);
  const int seq = c.model.seq_len;
  if (world_rank() == 0) {
    std::vector<int> ok(2 * seq, 65), high = ok, low = ok;
    high[seq + 3] = 300;
    low[5] = -1;
    write_tokens(dir + "/high.h5", "tokens", high, 2, seq);
    write_tokens(dir + "/low.h5", "tokens", low, 2, seq);
    write_tokens(dir + "/no_tokens.h5", "inputs", ok, 2, seq);
    write_tokens(dir + "/short.h5", "tokens", std::vector<int>(10, 65), 2, 5);
    std::ofstream(dir + "/text.h5") << "not hdf5";
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"high.h5", {"examoe eval: token 300 outside [0, 256)"}},
      {"low.h5", {"examoe eval: token -1 outside [0, 256)"}},
      {"no_tokens.h5", {"has no dataset 'tokens'"}},
      {"short.h5", {"sequences of 5 tokens; the model's seq_len is 16"}},
      {"text.h5", {"cannot open input", "text.h5"}},
      {"missing.h5", {"cannot open input", "missing.h5"}},
  };
  for (const auto& [file, needles] : cases) {
    const Outcome o = run_catching([&] { eval_file(ckpt, dir + "/" + file, dir + "/out.h5", 0, MPI_COMM_WORLD, nullptr); });
    er.add(o, needles, file);
  }
  remove_dir(dir);
}
#endif

// ------------------------------------------------------------------ checkpoints: sealed, wrong inside

/// Copies `from` to `to`, edits it with HDF5 and seals it again (what a tool editing a
/// checkpoint with h5py and re-sealing it produces): the checksum passes, the contents are
/// wrong. Rank 0 only.
void edited_copy(const std::string& from, const std::string& to, const std::function<void(hid_t)>& edit) {
  {
    std::ifstream in(from, std::ios::binary);
    std::ofstream out(to, std::ios::binary | std::ios::trunc);
    out << in.rdbuf();
  }
  hid_t f = H5Fopen(to.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  edit(f);
  H5Fclose(f);
  seal_checkpoint_file(to, MPI_COMM_SELF);
}
void replace_attr(hid_t obj, const char* name, hid_t type, hsize_t n, const void* data) {
  H5Adelete(obj, name);
  hid_t sp = n == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr);
  hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, type, data);
  H5Aclose(a);
  H5Sclose(sp);
}
void overwrite_dataset(hid_t f, const char* name, const std::function<void(std::vector<long long>&)>& change) {
  hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
  hid_t sp = H5Dget_space(ds);
  std::vector<long long> v(static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp)));
  H5Dread(ds, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  change(v);
  H5Dwrite(ds, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  H5Sclose(sp);
  H5Dclose(ds);
}

TEST(InputErrors, CheckpointContentsAfterTheChecksum) {
  EveryRank er;
  const std::string dir = shared_dir("contents");
  TrainConfig c = base();
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 1;
  if (world_rank() == 0) train(c, MPI_COMM_SELF, nullptr);  // written by one rank: fast
  const std::string good = checkpoint_path(dir, 1);
  const long long two[2] = {2, 2};
  const int minus5 = -5, zero = 0;
  struct Case {
    std::string file;
    std::function<void(hid_t)> edit;
    std::vector<std::string> needles;  // empty: must load
  };
  const std::vector<Case> cases = {
      // Found by fuzz_checkpoint: an array where one value belongs overflowed the reader.
      {"array_version.h5", [&](hid_t f) { replace_attr(f, "format_version", H5T_NATIVE_LLONG, 2, two); },
       {"attribute 'format_version' must hold one value"}},
      {"array_precision.h5", [&](hid_t f) {
         hid_t t = H5Tcopy(H5T_C_S1);
         H5Tset_size(t, 6);
         replace_attr(f, "precision", t, 2, "doublefloat!");
         H5Tclose(t);
       }, {"attribute 'precision' must hold one value"}},
      {"string_step.h5", [&](hid_t f) {
         hid_t t = H5Tcopy(H5T_C_S1);
         H5Tset_size(t, 8);
         replace_attr(f, "step", t, 0, "12345678");
         H5Tclose(t);
       }, {"attribute 'step' is not a number"}},
      {"negative_step.h5", [&](hid_t f) { replace_attr(f, "step", H5T_NATIVE_INT, 0, &minus5); },
       {"records step -5, outside [0, 2^31)"}},
      {"no_ep.h5", [&](hid_t f) { replace_attr(f, "ep", H5T_NATIVE_INT, 0, &zero); }, {"records a mesh of world_size"}},
      {"owner.h5", [&](hid_t f) { overwrite_dataset(f, "placement", [](std::vector<long long>& v) { v[3] = 99; }); },
       {"dataset 'placement' holds 99 for expert 3 of layer 0 (an owner must be in [0, ep = 1))"}},
      {"tokens.h5", [&](hid_t f) { overwrite_dataset(f, "tokens_per_expert", [](std::vector<long long>& v) { v[5] = -7; }); },
       {"dataset 'tokens_per_expert' holds -7 for expert 1 of layer 1"}},
      {"shape.h5", [&](hid_t f) {
         H5Ldelete(f, "tokens_per_expert", H5P_DEFAULT);
         hsize_t dims[2] = {3, 4};
         hid_t sp = H5Screate_simple(2, dims, nullptr);
         hid_t ds = H5Dcreate2(f, "tokens_per_expert", H5T_NATIVE_LLONG, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
         std::vector<long long> v(12, 1);
         H5Dwrite(ds, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
         H5Dclose(ds);
         H5Sclose(sp);
       }, {"dataset 'tokens_per_expert' has shape [3][4], the other [layers][experts] tables [2][4]"}},
      // h5py writes variable-length strings: read, not refused. A history that is not a list
      // is history only: the run resumes with a fresh one (and appends to it).
      {"vlen_and_history.h5", [&](hid_t f) {
         hid_t t = H5Tcopy(H5T_C_S1);
         H5Tset_size(t, H5T_VARIABLE);
         const char* v = "double";
         replace_attr(f, "precision", t, 0, &v);
         H5Tclose(t);
         t = H5Tcopy(H5T_C_S1);
         H5Tset_size(t, 2);
         replace_attr(f, "placement_history", t, 0, "{}");
         H5Tclose(t);
       }, {}},
  };
  if (world_rank() == 0)
    for (const auto& cs : cases) edited_copy(good, dir + "/" + cs.file, cs.edit);
  MPI_Barrier(MPI_COMM_WORLD);
  for (const auto& cs : cases) {
    TrainConfig r = base();
    r.checkpoint.dir = dir;
    r.checkpoint.resume = dir + "/" + cs.file;
    r.train.steps = 2;
    r.placement.rebalance_interval = 1;  // appends to the history
    if (cs.needles.empty()) {
      EXPECT_EQ(train(r, MPI_COMM_WORLD, nullptr).first_step, 1) << cs.file;
      continue;
    }
    std::vector<std::string> needles = cs.needles;
    needles.push_back(cs.file);
    // Every reader goes through read_checkpoint_info; the first case also through train().
    const Outcome o = run_catching([&] {
      if (&cs == &cases.front()) train(r, MPI_COMM_WORLD, nullptr);
      else read_checkpoint_info(r.checkpoint.resume, MPI_COMM_WORLD);
    });
    er.add(o, needles, cs.file);
  }
  remove_dir(dir);
}

TEST(InputErrors, Summary) {
  if (world_rank() == 0) std::printf("[ inputs ] %d bad inputs tried in this run, each refused on every rank\n", g_tried);
  SUCCEED();
}

}  // namespace
}  // namespace examoe::test
