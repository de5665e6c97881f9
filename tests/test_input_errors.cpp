// Bad input, class by class (docs/errors.md lists every row with the test that covers it):
// every config key with a value of the wrong type and out of range, unknown keys, configs that
// differ between ranks, dp x ep against the world size, models that cannot fit in memory,
// bad data files (devices, FIFOs, sparse giants), non-finite layer inputs, eval tokens and
// targets out of range or not integers, values beyond their type, JSON keys given twice, a
// resume past train.steps, malformed environment variables and metrics that cannot be written. Each case asserts
// that EVERY rank throws examoe::Error naming the problem, and that the ranks are still in
// step afterwards (a barrier completes).
#include "test_hdf5.hpp"
#include "test_util.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/config.hpp>
#include <examoe/data.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/model.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <functional>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <tuple>
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
      {"model.dispatch_dtype", "a choice: only the wrong-type case exists"},
      {"model.router.score", "a choice: only the wrong-type case exists"},
      {"train.nonfinite", "a choice: only the wrong-type case exists"},
      {"parallel.gpu_aware_mpi", "a choice: only the wrong-type case exists"},
      {"parallel.comm", "a choice; nccl where this build cannot run it: Comm.BadBackendOptionsFailOnEveryRank"},
      {"model.router.renormalize", "boolean"},
      {"parallel.reshard_after_forward", "boolean"},
      {"parallel.activation_checkpointing", "boolean"},
      {"parallel.overlap_exchange", "boolean; on and off are bitwise the same: Ragged.OverlapIsBitwise*"},
      {"model.allow_tf32", "boolean (CUDA builds only)"},
      {"log.quiet", "boolean"},
      {"log.step_phases", "boolean"},
      {"train.seed", "every 64-bit value is a seed"},
      {"data.path", "a file: InputErrors.DataFiles"},
      {"data.format", "a choice: only the wrong-type case exists; each format's bad files: TokenData.*"},
      {"data.dataset", "an HDF5 dataset name: TokenData.Hdf5BadInputsNameTheProblem"},
      {"log.metrics", "a file: InputErrors.DataFiles (a directory), CheckpointDir.NoOutputOverwritesACheckpointOrAnInput"},
      {"checkpoint.allow_existing", "boolean; what it allows: CheckpointDir.RunIdsAndPruningOfTheRunsOwnCheckpointsOnly"},
      {"checkpoint.resume", "a file: Checkpoint.BadFilesGiveClearErrorsAndDamageNothing"},
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
      {"model.vocab_size", {{"0", {"[1, 16777216"}}, {"16777217", {"[1, 16777216"}}, {"61", {"at least 62"}}}},
      {"model.d_model", {{"0", {"positive"}}, {"-16", {"positive"}}}},
      {"model.n_layers", {{"0", {"positive"}}}},
      {"model.n_heads", {{"0", {"positive"}}, {"3", {"divisor of model.d_model"}}}},
      {"model.seq_len", {{"0", {"positive"}}, {"5", {"seq_len (5) is shorter than the longest"}}}},
      {"model.d_hidden", {{"0", {"positive"}}, {"-1", {"positive"}}}},
      {"model.num_experts", {{"0", {"positive"}}, {"1", {"top_k"}}}},
      {"model.top_k", {{"0", {"[1, model.num_experts"}}, {"5", {"[1, model.num_experts = 4]"}}}},
      {"model.num_shared_experts", {{"-1", {">= 0"}}}},
      {"model.shared_hidden", {{"-2", {">= 0 (0 = model.d_hidden)"}}}},
      {"model.router.temperature", {{"0", {"positive"}}, {"-1", {"positive"}}}},
      {"model.router.jitter", {{"-0.5", {">= 0"}}}},
      {"model.router.aux_loss_coef", {{"-1", {">= 0"}}}},
      {"model.router.z_loss_coef", {{"-1e-3", {">= 0"}}}},
      {"model.router.bias_rate", {{"-1e-3", {">= 0"}}}},
      {"model.router.groups", {{"-1", {"[0, model.num_experts = 4]"}}, {"5", {"[0, model.num_experts = 4]"}}}},
      {"model.router.topk_groups", {{"-1", {"[0, model.router.groups = 0]", "0 = no limit"}}}},
      {"model.norm_eps", {{"0", {"positive"}}, {"-1e-5", {"positive"}}}},
      {"model.capacity_factor", {{"-1", {">= 0 and finite"}}, {"-1e-300", {">= 0 and finite"}}}},
      {"parallel.ep", {{"-1", {">= 0"}}, {std::to_string(world_size() + 1), {"must divide the world size " + P}}}},
      {"train.steps", {{"-1", {">= 0"}}}},
      {"train.batch", {{"0", {"positive"}}}},
      {"train.micro_batches", {{"0", {">= 1"}}, {"3", {"must divide every rank's share of train.batch = 8"}}}},
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
      {"data.val_path", {{"val.bin", {"empty without data.path"}}}},
      {"data.val_sequences", {{"-1", {">= 0"}}}},
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
    const Outcome o = run_catching([&, &text = text] { apply_json_config(c, text, "bad.json"); });
    er.add(o, {"unknown key", needle, "bad.json"}, text);
  }
  // Not JSON, not an object.
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {"{not json", "not valid JSON"}, {"[1, 2]", "must hold a JSON object"}, {"", "not valid JSON"}}) {
    TrainConfig c = base();
    const Outcome o = run_catching([&, &text = text] { apply_json_config(c, text, "bad.json"); });
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
           {R"({"model.d_model": 2147483648})", "model.d_model is out of range: it must be an integer in [-2147483648, 2147483647], got '2147483648'"},
           {R"({"train.seed": -1})", "train.seed must be a non-negative integer, got '-1'"},
           {R"({"train.steps": 1.5})", "train.steps must be an integer, got '1.5'"}}) {
    TrainConfig t = base();
    er.add(run_catching([&, &text = text] { apply_json_config(t, text, "limits.json"); }), {needle}, text);
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
       {"'" + dir + "/a_directory' is a directory, not a regular file"}},
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
  write_int_datasets(path, {{name, &v}}, rows, cols);
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
      {"high.h5", {"examoe eval: token 300 outside [0, 256) at tokens[1][3]", "(the first of 1 bad value)"}},
      {"low.h5", {"examoe eval: token -1 outside [0, 256) at tokens[0][5]"}},
      {"no_tokens.h5", {"has no dataset 'tokens'"}},
      {"short.h5", {"sequences of 5 tokens; the model's seq_len is 16"}},
      {"text.h5", {"cannot open input", "text.h5"}},
      {"missing.h5", {"cannot open input", "missing.h5", "No such file or directory"}},
  };
  for (const auto& [file, needles] : cases) {
    const Outcome o = run_catching([&, &file = file] { eval_file(ckpt, dir + "/" + file, dir + "/out.h5", 0, MPI_COMM_WORLD, nullptr); });
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

// ------------------------------------------------------------------ files that are not what they seem

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

TEST(InputErrors, DataFilesThatAreNotRegularFiles) {
  EveryRank er;
  const std::string dir = shared_dir("special");
  const std::string fifo = dir + "/fifo", fed = dir + "/fed_fifo", sparse = dir + "/sparse.bin";
  const long long sparse_bytes = 50LL << 30;  // `truncate -s 50G`: no block of it is written
  int writer = -1;
  if (world_rank() == 0) {
    EXPECT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
    EXPECT_EQ(::mkfifo(fed.c_str(), 0644), 0);
    // A FIFO with a writer holding it open and bytes waiting (O_RDWR does not block on Linux).
    writer = ::open(fed.c_str(), O_RDWR | O_NONBLOCK);
    EXPECT_GE(writer, 0);
    EXPECT_EQ(::write(writer, "0123456789abcdef0123456789abcdef0123456789", 42), 42);
    const int fd = ::open(sparse.c_str(), O_CREAT | O_WRONLY, 0644);
    EXPECT_EQ(::ftruncate(fd, sparse_bytes), 0);
    ::close(fd);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string not_regular = ", not a regular file (data.path must name a file)";
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"/dev/zero", {"'/dev/zero' is a character device" + not_regular}},
      {"/dev/urandom", {"'/dev/urandom' is a character device" + not_regular}},
      {fifo, {"'" + fifo + "' is a FIFO (named pipe)" + not_regular}},
      {fed, {"'" + fed + "' is a FIFO (named pipe)" + not_regular}},
      // Refused by the memory check before a byte is read (its validation set alone needs
      // more than any node has, and the file counts too).
      {sparse, {"examoe::train: this config needs about", "are available per rank",
                "the data file '" + sparse + "' 50.0 GiB (53687091200 bytes), held whole by every rank"}},
  };
  for (const auto& [path, needles] : cases) {
    TrainConfig c = base();
    c.data.path = path;
    const auto t = std::chrono::steady_clock::now();
    er.add(run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); }), needles, path);
    EXPECT_LT(seconds_since(t), 20.0) << path << " was not refused quickly";
  }
  // The corpus itself (no collective): refuses without blocking, measures without reading.
  const Outcome o = run_catching([&] { FileCorpus corpus(fifo, 1); });
  EXPECT_TRUE(local_error(o, {"examoe::FileCorpus: '" + fifo + "' is a FIFO (named pipe)"}, "FileCorpus(fifo)"));
  EXPECT_EQ(FileCorpus::file_size(sparse), static_cast<std::size_t>(sparse_bytes));
  EXPECT_EQ(FileCorpus::val_sequences(static_cast<std::size_t>(sparse_bytes), 0.1, 16), 335544319)
      << "(5 GiB of validation - 1) / 16 windows";
  EXPECT_EQ(FileCorpus::val_sequences(1ULL << 50, 0.5, 1), 2147483647) << "counted up to INT_MAX";
  EXPECT_EQ(FileCorpus::val_sequences(20, 0.5, 16), 0) << "too short";
  if (writer >= 0) ::close(writer);
  remove_dir(dir);
}

TEST(InputErrors, DataFileCountsInTheMemoryCheck) {
  // A 64 MiB (sparse) file with a validation part of 68 bytes: the model, batch and
  // validation set need far less, so the file decides. Refused with one byte less than
  // model + file, accepted (read and trained on) with exactly that.
  EveryRank er;
  const std::string dir = shared_dir("datamem");
  const std::string path = dir + "/zeros.bin";
  const std::size_t bytes = 64u << 20;
  if (world_rank() == 0) {
    const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY, 0644);
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    ::close(fd);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  TrainConfig c = base();
  c.data.path = path;
  c.data.val_fraction = 1e-6;
  const int W = world_size(), seq = c.model.seq_len;
  const long long val = FileCorpus::val_sequences(bytes, c.data.val_fraction, seq);
  EXPECT_EQ(val, 4) << "ceil(64 MiB x 1e-6) = 68 bytes of validation: (68 - 1) / 16 windows";
  const long long rows = std::max<long long>((c.train.batch + W - 1) / W, (val + W - 1) / W) * seq;
  const std::size_t model = estimate_memory(c.model, c.parallel, W, W, rows, sizeof(double)).total();
  EXPECT_LT(model, bytes / 8) << "the file must be what does not fit";
  c.train.memory_limit = std::to_string(model + bytes - 1);
  er.add(run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); }),
         {"(" + std::to_string(model + bytes) + " bytes) of memory per rank",
          "(" + std::to_string(model + bytes - 1) + " bytes) are available per rank",
          "the data file '" + path + "' 64.0 MiB (67108864 bytes), held whole by every rank", "use less data"},
         "one byte short");
  c.train.memory_limit = std::to_string(model + bytes);
  EXPECT_EQ(train(c, MPI_COMM_WORLD, nullptr).losses.size(), 1u) << "exactly enough memory";
  remove_dir(dir);
}

// ------------------------------------------------------------------ eval targets and id types

#if EXAMOE_ENABLE_HDF5
struct H5Set {
  const char* name;
  hid_t file_type, mem_type;
  const void* data;
};
/// Rank 0: an eval input of [2][cols] datasets.
void write_h5(const std::string& path, const std::vector<H5Set>& sets, int cols) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hsize_t dims[2] = {2, static_cast<hsize_t>(cols)};
  for (const H5Set& s : sets) {
    hid_t sp = H5Screate_simple(2, dims, nullptr);
    hid_t ds = H5Dcreate2(f, s.name, s.file_type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(H5Dwrite(ds, s.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, s.data), 0) << path;
    H5Dclose(ds);
    H5Sclose(sp);
  }
  H5Fclose(f);
}

TEST(InputErrors, EvalTargetsAndIdTypes) {
  EveryRank er;
  const std::string dir = shared_dir("evalids");
  TrainConfig c = base();
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 1;
  if (world_rank() == 0) train(c, MPI_COMM_SELF, nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string ckpt = checkpoint_path(dir, 1);
  const int seq = c.model.seq_len, n = 2 * seq;
  const long long big = (1LL << 40) + 65;
  std::vector<int> tok(n, 65), none(n, -1);
  auto targets_with = [&](std::vector<std::pair<int, int>> at) {
    std::vector<int> t = none;
    for (auto [i, v] : at) t[i] = v;
    return t;
  };
  const std::vector<int> t999 = targets_with({{3, 999}}), t1e9 = targets_with({{seq, 1000000000}, {seq + 1, 1000000000}}),
                         tneg5 = targets_with({{7, -5}}), tgood = targets_with({{0, 65}, {seq + 2, 66}});
  std::vector<long long> t40(n, -1), k40(n, 65), kneg(n, 65);
  t40[2 * seq - 1] = big;
  k40[0] = big;
  kneg[4] = -(1LL << 40);
  std::vector<unsigned long long> ku(n, 65);
  ku[seq + 5] = (1ULL << 63) + 1;
  const std::vector<float> kf(n, 65.0f);
  const std::vector<double> tf(n, -1.0);
  const std::string fifo = dir + "/fifo.h5";
  if (world_rank() == 0) {
    // HDF5's type macros are comma expressions: name them first (nvcc's front end misparses
    // them inside braced initializers).
    const hid_t I32 = H5T_STD_I32LE, I64 = H5T_STD_I64LE, NI = H5T_NATIVE_INT, NL = H5T_NATIVE_LLONG;
    const hid_t U64 = H5T_STD_U64LE, NU = H5T_NATIVE_ULLONG, F32 = H5T_IEEE_F32LE, NF = H5T_NATIVE_FLOAT;
    const hid_t F64 = H5T_IEEE_F64LE, ND = H5T_NATIVE_DOUBLE;
    write_h5(dir + "/t999.h5", {{"tokens", I32, NI, tok.data()}, {"targets", I32, NI, t999.data()}}, seq);
    write_h5(dir + "/t1e9.h5", {{"tokens", I32, NI, tok.data()}, {"targets", I32, NI, t1e9.data()}}, seq);
    write_h5(dir + "/tneg5.h5", {{"tokens", I32, NI, tok.data()}, {"targets", I32, NI, tneg5.data()}}, seq);
    write_h5(dir + "/t40.h5", {{"tokens", I32, NI, tok.data()}, {"targets", I64, NL, t40.data()}}, seq);
    write_h5(dir + "/k40.h5", {{"tokens", I64, NL, k40.data()}}, seq);
    write_h5(dir + "/kneg.h5", {{"tokens", I64, NL, kneg.data()}}, seq);
    write_h5(dir + "/ku64.h5", {{"tokens", U64, NU, ku.data()}}, seq);
    write_h5(dir + "/kfloat.h5", {{"tokens", F32, NF, kf.data()}}, seq);
    write_h5(dir + "/tfloat.h5", {{"tokens", I32, NI, tok.data()}, {"targets", F64, ND, tf.data()}}, seq);
    write_h5(dir + "/good.h5", {{"tokens", I32, NI, tok.data()}, {"targets", I32, NI, tgood.data()}}, seq);
    EXPECT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string no_target = "-1 marks a position without a target and is the only negative value allowed";
  const std::string floats = "holds floating-point numbers; token ids and targets must be an HDF5 integer type";
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {dir + "/t999.h5", {"examoe eval: target 999 outside [0, 256) at targets[0][3]", no_target, "the first of 1 bad value)"}},
      {dir + "/t1e9.h5", {"target 1000000000 outside [0, 256) at targets[1][0]", "the first of 2 bad values"}},
      {dir + "/tneg5.h5", {"target -5 outside [0, 256) at targets[0][7]", no_target}},
      {dir + "/t40.h5", {"target 1099511627841 outside [0, 256) at targets[1][15]"}},
      {dir + "/k40.h5", {"token 1099511627841 outside [0, 256) at tokens[0][0]"}},
      {dir + "/kneg.h5", {"token -1099511627776 outside [0, 256) at tokens[0][4]"}},
      {dir + "/ku64.h5", {"token 9223372036854775809 outside [0, 256) at tokens[1][5]"}},
      {dir + "/kfloat.h5", {"dataset 'tokens' of '" + dir + "/kfloat.h5' " + floats}},
      {dir + "/tfloat.h5", {"dataset 'targets' of '" + dir + "/tfloat.h5' " + floats}},
      {fifo, {"examoe eval: input '" + fifo + "' is a FIFO (named pipe), not a regular file"}},
      {"/dev/zero", {"examoe eval: input '/dev/zero' is a character device, not a regular file"}},
      {dir, {"examoe eval: input '" + dir + "' is a directory, not a regular file"}},
  };
  for (const auto& [file, needles] : cases) {
    const auto t = std::chrono::steady_clock::now();
    er.add(run_catching([&, &file = file] { eval_file(ckpt, file, dir + "/out.h5", 0, MPI_COMM_WORLD, nullptr); }), needles, file);
    EXPECT_LT(seconds_since(t), 20.0) << file;
  }
  // -1 is "no target": the loss is the mean cross-entropy of the two given targets, computed
  // here from the logits eval wrote.
  const double loss = eval_file(ckpt, dir + "/good.h5", dir + "/good_out.h5", 0, MPI_COMM_WORLD, nullptr);
  std::vector<float> logits(static_cast<std::size_t>(n) * 256);
  hid_t f = H5Fopen((dir + "/good_out.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t ds = H5Dopen2(f, "logits", H5P_DEFAULT);
  EXPECT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, logits.data()), 0);
  H5Dclose(ds);
  H5Fclose(f);
  double ref = 0;
  for (auto [i, target] : std::vector<std::pair<int, int>>{{0, 65}, {seq + 2, 66}}) {
    const float* row = logits.data() + static_cast<std::size_t>(i) * 256;
    const double mx = *std::max_element(row, row + 256);
    double z = 0;
    for (int v = 0; v < 256; ++v) z += std::exp(row[v] - mx);
    ref += (std::log(z) + mx - row[target]) / 2;
  }
  EXPECT_NEAR(loss, ref, 1e-5);
  remove_dir(dir);
}
#endif

// ------------------------------------------------------------------ config values as written

TEST(InputErrors, ConfigValuesReadAsWritten) {
  EveryRank er;
  const std::vector<std::tuple<std::string, std::string, std::vector<std::string>>> cases = {
      {"train.lr", "1e400", {"train.lr is out of range: '1e400' is beyond the largest double", "train.lr must be a finite number"}},
      {"train.lr", "-1e400", {"train.lr is out of range: '-1e400'"}},
      {"train.eps", "1e-400", {"train.eps is out of range: '1e-400' is too close to 0 for a double"}},
      {"model.d_model", "99999999999", {"model.d_model is out of range: it must be an integer in [-2147483648, 2147483647], got '99999999999'"}},
      {"model.d_model", "99999999999999999999999", {"model.d_model is out of range", "got '99999999999999999999999'"}},
      {"train.seed", "18446744073709551616", {"train.seed is out of range: it must be an integer in [0, 18446744073709551615]"}},
  };
  for (const auto& [name, value, needles] : cases) {
    TrainConfig c = base();
    er.add(run_catching([&, &name = name, &value = value] { key(name).set(c, value); }), needles, name + " " + value);
  }
  // A subnormal number is a number (only one that reads as 0 is out of range).
  TrainConfig sub = base();
  key("train.eps").set(sub, "1e-310");
  EXPECT_EQ(sub.train.eps, 1e-310);
  // A 50 MB value: the message quotes 200 bytes of it and its length, whoever reports it.
  const std::string huge_digits(50u << 20, '7'), huge_text(50u << 20, 'x');
  const std::string marker = "... (52428800 bytes)";
  std::vector<Outcome> big;
  TrainConfig c = base();
  big.push_back(run_catching([&] { key("model.d_model").set(c, huge_digits); }));
  big.push_back(run_catching([&] { key("train.lr").set(c, huge_text); }));
  big.push_back(run_catching([&] { apply_json_config(c, "{\"" + huge_text + "\": 1}", "huge.json"); }));
  big.push_back(run_catching([&] { apply_json_config(c, "{\"model\": {\"activation\": \"" + huge_text + "\"}}", "huge.json"); }));
  big.push_back(run_catching([&] {
    TrainConfig t = base();
    t.train.memory_limit = huge_text;
    train(t, MPI_COMM_WORLD, nullptr);
  }));
  for (std::size_t i = 0; i < big.size(); ++i) {
    er.add(big[i], {marker}, "50 MB value, case " + std::to_string(i));
    EXPECT_LT(big[i].what.size(), 1000u) << "case " << i << ": a message of " << big[i].what.size() << " bytes";
  }
}

TEST(InputErrors, JsonKeysGivenTwice) {
  EveryRank er;
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {R"({"train": {"lr": 0.1, "lr": 0.2}})", {"key 'train.lr' appears twice in the same object of dup.json"}},
      {R"({"train.lr": 0.1, "train.lr": 0.2})", {"key 'train.lr' appears twice"}},
      {R"({"a": {"b": 1}, "a": {"c": 2}})", {"key 'a' appears twice"}},
      {R"({"train": {"steps": [{"x": 1, "x": 2}]}})", {"key 'train.steps[].x' appears twice"}},
      {R"({"model": {"d_model": 32}, "model.d_model": 64})",
       {"key 'model.d_model' is given twice in dup.json: as {\"model\": {\"d_model\": ...}} and as {\"model.d_model\": ...}"}},
      {R"({"model.router": {"temperature": 1}, "model": {"router": {"temperature": 2}}})",
       {"key 'model.router.temperature' is given twice in dup.json", "{\"model.router\": {\"temperature\": ...}}"}},
  };
  for (const auto& [text, needles] : cases) {
    TrainConfig c = base();
    er.add(run_catching([&, &text = text] { apply_json_config(c, text, "dup.json"); }), needles, text);
  }
  // Keys of the same name in different objects, nested and dotted mixed: all taken.
  TrainConfig c = base();
  apply_json_config(c, R"({"model": {"d_model": 32, "top_k": 1}, "train": {"steps": 2}, "model.n_layers": 1})", "ok.json");
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_EQ(c.model.top_k, 1);
  EXPECT_EQ(c.train.steps, 2);
  EXPECT_EQ(c.model.n_layers, 1);
}

// ------------------------------------------------------------------ resume past train.steps

#if EXAMOE_ENABLE_HDF5
TEST(InputErrors, ResumePastTrainSteps) {
  EveryRank er;
  const std::string dir = shared_dir("past");
  TrainConfig c = base();
  c.train.steps = 2;
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 2;
  if (world_rank() == 0) train(c, MPI_COMM_SELF, nullptr);
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string ckpt = checkpoint_path(dir, 2);
  TrainConfig r = c;
  r.checkpoint.resume = ckpt;
  r.train.steps = 1;
  er.add(run_catching([&] { train(r, MPI_COMM_WORLD, nullptr); }),
         {"examoe::train: checkpoint '" + ckpt + "' is at step 2, past train.steps = 1", "raise --train.steps above 2"},
         "resume past train.steps");
  // At train.steps: a finished run, said so; no step runs.
  r.train.steps = 2;
  std::ostringstream os;
  const TrainResult res = train(r, MPI_COMM_WORLD, &os);
  EXPECT_EQ(res.first_step, 2);
  EXPECT_EQ(res.last_step, 2);
  EXPECT_TRUE(res.losses.empty());
  if (world_rank() == 0)
    EXPECT_NE(os.str().find("is at step 2 = train.steps: training is already complete"), std::string::npos) << os.str();
  remove_dir(dir);
}
#endif

// ------------------------------------------------------------------ environment variables

TEST(InputErrors, DeviceIdMustBeAnId) {
  EveryRank er;
  for (const char* v : {"abc", "-1", "", "1.5", " 1", "+1", "1e3", "99999999999"}) {
    ::setenv("EXAMOE_DEVICE_ID", v, 1);
    for (int devices : {0, 4}) {  // 0: a CPU build, which checks it too
      er.add(run_catching([&] { device_for_rank(MPI_COMM_WORLD, devices); }),
             {"examoe: EXAMOE_DEVICE_ID='" + std::string(v) + "' is not a device id: it must be a non-negative integer"},
             "EXAMOE_DEVICE_ID='" + std::string(v) + "', " + std::to_string(devices) + " devices");
    }
  }
  // Malformed on the last rank only: every rank reports it.
  ::setenv("EXAMOE_DEVICE_ID", world_rank() == world_size() - 1 ? "abc" : "0", 1);
  er.add(run_catching([&] { device_for_rank(MPI_COMM_WORLD, 0); }), {"EXAMOE_DEVICE_ID='abc'"}, "on one rank");
  // Well-formed: used where there are devices, unused (-1) on a CPU build.
  ::setenv("EXAMOE_DEVICE_ID", "3", 1);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 4), 3);
  EXPECT_EQ(device_for_rank(MPI_COMM_WORLD, 0), -1);
  ::unsetenv("EXAMOE_DEVICE_ID");
}

TEST(InputErrors, FaultsThatCanNeverFire) {
  EveryRank er;
  const std::string P = std::to_string(world_size());
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"nan:step=1:rank=" + P, {"rank=" + P + " is outside this run's ranks [0, " + P + "), so the fault would never fire"}},
      {"kill:rank=" + std::to_string(world_size() + 5) + ":step=1", {"is outside this run's ranks"}},
      {"hang:rank=0:step=1:phase=moe.dispach", {"phase 'moe.dispach' is no collective's label", "moe.dispatch"}},
      {"nan:step=2", {"step=2 is beyond train.steps = 1, so the fault would never fire"}},
  };
  for (const auto& [spec, needles] : cases) {
    ::setenv("EXAMOE_FAULT", spec.c_str(), 1);
    std::vector<std::string> n = needles;
    n.push_back("EXAMOE_FAULT='" + spec + "'");
    er.add(run_catching([&] { train(base(), MPI_COMM_WORLD, nullptr); }), n, spec);
    EXPECT_FALSE(impl::fault::armed()) << spec;
  }
  ::unsetenv("EXAMOE_FAULT");
}

#if EXAMOE_ENABLE_HDF5
TEST(InputErrors, FaultPhasesAreCollectiveLabels) {
  // phase= accepts collective_labels() only: every label the trainer's collectives carry must
  // be in it. Steps, validation, metrics, checkpoints, rebalancing and a resume, fault armed
  // (a NaN loss at the last step: skipped) so the hook records every label it sees.
  const std::string dir = shared_dir("labels");
  TrainConfig c = base();
  c.train.steps = 2;
  c.checkpoint.dir = dir;
  c.checkpoint.interval = 1;
  c.placement.rebalance_interval = 1;
  c.log.eval_interval = 1;
  c.log.metrics = dir + "/metrics.jsonl";
  std::set<std::string> seen;
  ::setenv("EXAMOE_FAULT", "nan:step=2:where=loss", 1);
  train(c, MPI_COMM_WORLD, nullptr);
  for (const auto& l : impl::fault::labels_seen()) seen.insert(l);
  TrainConfig r = c;
  r.checkpoint.resume = checkpoint_path(dir, 1);
  train(r, MPI_COMM_WORLD, nullptr);
  for (const auto& l : impl::fault::labels_seen()) seen.insert(l);
  ::unsetenv("EXAMOE_FAULT");
  const auto& known = impl::fault::collective_labels();
  for (const auto& l : seen)
    EXPECT_NE(std::find(known.begin(), known.end(), l), known.end()) << "collective label '" << l << "' is not in collective_labels()";
  for (const char* l : {"moe.dispatch", "fsdp.allgather", "optimizer.clip", "train.eval", "checkpoint.write", "checkpoint.resume"})
    EXPECT_TRUE(seen.count(l)) << l << " was not seen";
  remove_dir(dir);
}
#endif

TEST(InputErrors, MetricsWriteFailures) {
  EveryRank er;
  TrainConfig c = base();
  c.log.metrics = "/dev/full";
  er.add(run_catching([&] { train(c, MPI_COMM_WORLD, nullptr); }),
         {"examoe::train: cannot write metrics file '/dev/full' at step 1: No space left on device"}, "/dev/full");
}

TEST(InputErrors, MoELayerMemoryEstimate) {
  // By hand: d 4, h 8, E 4 over 2 ranks (2 local), k 2, GELU, 3 tokens, 8-byte values.
  ModelConfig m;
  m.d_model = 4;
  m.d_hidden = 8;
  m.num_experts = 4;
  m.top_k = 2;
  const MoELayerMemory l = estimate_moe_layer_memory(m, 2, 3, 8);
  EXPECT_EQ(l.experts, 2u * (4 * 8 * 2) * 8) << "2 local experts of w1 [4][8] and w2 [8][4]";
  EXPECT_EQ(l.buffers, (3u * (3 * 4 + 3 * 2) + 6u * (8 * 4 + 5 * 8)) * 8) << "router state, 6 assignments' rows";
  // The model's estimate is its layers' (n_layers of them) plus the dense part.
  const MemoryReport r = estimate_memory(m, ParallelConfig{}, 2, 2, 3, 8);
  EXPECT_EQ(r.experts, static_cast<std::size_t>(m.n_layers) * l.experts);
}

TEST(InputErrors, Summary) {
  if (world_rank() == 0) std::printf("[ inputs ] %d bad inputs tried in this run, each refused on every rank\n", g_tried);
  SUCCEED();
}

}  // namespace
}  // namespace examoe::test
