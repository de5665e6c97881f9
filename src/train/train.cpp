// Training loop: data sharded over all ranks, FSDP + expert parallelism, AdamW with global
// norm clipping and warmup + cosine schedule, validation, progress and JSON-lines metrics.
#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/error.hpp>
#include <examoe/device.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/files.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <examoe/config.hpp>

#include <csignal>
#include <sys/stat.h>
#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

#include <nlohmann/json.hpp>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <set>
#include <sstream>
#include <type_traits>

namespace examoe {

// ------------------------------------------------------------------ config table
namespace {

/// Shortest decimal text that reads back as exactly v.
std::string fmt_double(double v) {
  for (int prec = 6; prec <= 17; ++prec) {
    std::ostringstream os;
    os << std::setprecision(prec) << v;
    if (std::stod(os.str()) == v || prec == 17) return os.str();
  }
  return std::to_string(v);
}

/// The value as a message quotes it: 'V', at most 200 bytes of it (examoe::clip_for_message).
std::string quoted(const std::string& v) { return "'" + clip_for_message(v) + "'"; }

int parse_int(const std::string& key, const std::string& v) {
  long long x = 0;
  try {
    std::size_t pos = 0;
    x = std::stoll(v, &pos);
    if (pos != v.size()) throw std::invalid_argument(v);
  } catch (const std::out_of_range&) {
    x = INT64_MAX;  // beyond 64 bits: out of range below, not "not an integer"
  } catch (const std::exception&) {
    throw Error("examoe::config: " + key + " must be an integer, got " + quoted(v));
  }
  if (x < INT32_MIN || x > INT32_MAX)
    throw Error("examoe::config: " + key + " is out of range: it must be an integer in [-2147483648, 2147483647], got " +
                quoted(v));
  return static_cast<int>(x);
}
std::uint64_t parse_u64(const std::string& key, const std::string& v) {
  try {
    std::size_t pos = 0;
    if (!v.empty() && v[0] == '-') throw std::invalid_argument(v);
    const unsigned long long x = std::stoull(v, &pos);
    if (pos != v.size()) throw std::invalid_argument(v);
    return x;
  } catch (const std::out_of_range&) {
    throw Error("examoe::config: " + key + " is out of range: it must be an integer in [0, 18446744073709551615], got " +
                quoted(v));
  } catch (const std::exception&) {
    throw Error("examoe::config: " + key + " must be a non-negative integer, got " + quoted(v));
  }
}
double parse_double(const std::string& key, const std::string& v) {
  // strtod, not std::stod: stod throws the same for "fast" and for 1e400.
  const char* s = v.c_str();
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(s, &end);
  if (v.empty() || end == s || end != s + v.size())
    throw Error("examoe::config: " + key + " must be a number, got " + quoted(v));
  if (errno == ERANGE && std::isinf(x))
    throw Error("examoe::config: " + key + " is out of range: " + quoted(v) +
                " is beyond the largest double (about 1.8e308); " + key + " must be a finite number");
  if (errno == ERANGE && x == 0)
    throw Error("examoe::config: " + key + " is out of range: " + quoted(v) +
                " is too close to 0 for a double (it would read as 0)");
  // NaN and infinities parse, but no key has a use for them (a NaN slips through every
  // range check written as a comparison).
  if (!std::isfinite(x)) throw Error("examoe::config: " + key + " must be a finite number, got " + quoted(v));
  return x;
}
bool parse_bool(const std::string& key, const std::string& v) {
  if (v == "true" || v == "1" || v == "on" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "off" || v == "no") return false;
  throw Error("examoe::config: " + key + " must be true or false, got " + quoted(v));
}

#define EXAMOE_KEY_INT(NAME, FIELD, HELP)                                                        \
  ConfigKey{NAME, HELP, "INT", [](const TrainConfig& c) { return std::to_string(c.FIELD); },           \
            [](TrainConfig& c, const std::string& v) { c.FIELD = parse_int(NAME, v); }}
#define EXAMOE_KEY_U64(NAME, FIELD, HELP)                                                        \
  ConfigKey{NAME, HELP, "UINT", [](const TrainConfig& c) { return std::to_string(c.FIELD); },           \
            [](TrainConfig& c, const std::string& v) { c.FIELD = parse_u64(NAME, v); }}
#define EXAMOE_KEY_DBL(NAME, FIELD, HELP)                                                        \
  ConfigKey{NAME, HELP, "FLOAT", [](const TrainConfig& c) { return fmt_double(c.FIELD); },               \
            [](TrainConfig& c, const std::string& v) { c.FIELD = parse_double(NAME, v); }}
#define EXAMOE_KEY_BOOL(NAME, FIELD, HELP)                                                       \
  ConfigKey{NAME, HELP, "BOOL", [](const TrainConfig& c) { return std::string(c.FIELD ? "true" : "false"); }, \
            [](TrainConfig& c, const std::string& v) { c.FIELD = parse_bool(NAME, v); }}
#define EXAMOE_KEY_STR(NAME, FIELD, HELP)                                                        \
  ConfigKey{NAME, HELP, "TEXT", [](const TrainConfig& c) { return c.FIELD; },                          \
            [](TrainConfig& c, const std::string& v) { c.FIELD = v; }}

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string human_bytes(double b) {
  const char* u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    ++i;
  }
  char s[32];
  std::snprintf(s, sizeof s, "%.1f %s", b, u[i]);
  return s;
}

/// The cgroup memory limit of this process (v2 or v1), 0 if none or unreadable.
double cgroup_memory_limit() {
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    std::string v;
    if (in >> v && !v.empty() && v != "max") {
      try {
        const double b = std::stod(v);
        if (b > 0 && b < 1e18) return b;  // v1 reports "unlimited" as ~2^63
      } catch (const std::exception&) {
      }
    }
  }
  return 0;
}

}  // namespace

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = {
      EXAMOE_KEY_INT("model.d_model", model.d_model, "Model width d"),
      EXAMOE_KEY_INT("model.n_layers", model.n_layers, "Number of decoder blocks L"),
      EXAMOE_KEY_INT("model.n_heads", model.n_heads, "Attention heads (must divide d_model)"),
      EXAMOE_KEY_INT("model.seq_len", model.seq_len, "Tokens per sequence (context length)"),
      EXAMOE_KEY_INT("model.d_hidden", model.d_hidden, "Expert MLP hidden width"),
      EXAMOE_KEY_INT("model.num_experts", model.num_experts, "Experts per MoE layer E (>= ep)"),
      EXAMOE_KEY_INT("model.top_k", model.top_k, "Experts per token k (1 <= k <= E)"),
      ConfigKey{"model.activation", "Expert MLP: gelu or swiglu", "gelu|swiglu",
                [](const TrainConfig& c) { return to_string(c.model.activation); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.model.activation = activation_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: model.activation must be gelu or swiglu, got " + quoted(v));
                  }
                }},
      EXAMOE_KEY_DBL("model.router.temperature", model.router.temperature, "Router softmax temperature (> 0)"),
      EXAMOE_KEY_BOOL("model.router.renormalize", model.router.renormalize, "Renormalise the k gates to sum to 1"),
      EXAMOE_KEY_DBL("model.router.jitter", model.router.jitter, "Std-dev of training noise on router logits (0 = off)"),
      EXAMOE_KEY_DBL("model.router.aux_loss_coef", model.router.aux_loss_coef, "Load-balancing loss weight alpha"),
      EXAMOE_KEY_DBL("model.router.z_loss_coef", model.router.z_loss_coef, "Router z-loss weight beta"),
      EXAMOE_KEY_DBL("model.norm_eps", model.norm_eps, "RMSNorm epsilon"),
      EXAMOE_KEY_INT("parallel.ep", parallel.ep, "Expert-parallel degree; dp = world / ep (0 = world)"),
      EXAMOE_KEY_BOOL("parallel.reshard_after_forward", parallel.reshard_after_forward, "FSDP: free gathered parameters after each unit's forward"),
      EXAMOE_KEY_BOOL("parallel.activation_checkpointing", parallel.activation_checkpointing, "Recompute each block in backward instead of storing it"),
      ConfigKey{"parallel.comm", "Collectives backend (auto: nccl when built with it and data is on GPUs, else mpi)",
                "auto|mpi|nccl", [](const TrainConfig& c) { return c.parallel.comm; },
                [](TrainConfig& c, const std::string& v) {
                  if (v != "auto" && v != "mpi" && v != "nccl")
                    throw Error("examoe::config: parallel.comm must be auto, mpi or nccl, got " + quoted(v));
                  c.parallel.comm = v;
                }},
      ConfigKey{"parallel.gpu_aware_mpi", "MPI takes GPU buffers directly (auto: ask MPI; false: stage the rows that leave a rank through host memory)",
                "auto|true|false", [](const TrainConfig& c) { return c.parallel.gpu_aware_mpi; },
                [](TrainConfig& c, const std::string& v) {
                  if (v != "auto" && v != "true" && v != "false")
                    throw Error("examoe::config: parallel.gpu_aware_mpi must be auto, true or false, got " + quoted(v));
                  c.parallel.gpu_aware_mpi = v;
                }},
      EXAMOE_KEY_DBL("parallel.watchdog_seconds", parallel.watchdog_seconds, "Abort with a report naming the collective and the ranks that did not arrive when a collective takes longer than this (0 = off)"),
      EXAMOE_KEY_INT("train.steps", train.steps, "Optimizer steps"),
      EXAMOE_KEY_INT("train.batch", train.batch, "Global batch in sequences (split over all ranks)"),
      EXAMOE_KEY_DBL("train.lr", train.lr, "Peak learning rate"),
      EXAMOE_KEY_DBL("train.min_lr", train.min_lr, "Learning rate at the end of the cosine decay"),
      EXAMOE_KEY_INT("train.warmup", train.warmup, "Linear warmup steps"),
      EXAMOE_KEY_DBL("train.weight_decay", train.weight_decay, "AdamW decoupled weight decay (matrices only)"),
      EXAMOE_KEY_DBL("train.beta1", train.beta1, "AdamW beta1"),
      EXAMOE_KEY_DBL("train.beta2", train.beta2, "AdamW beta2"),
      EXAMOE_KEY_DBL("train.eps", train.eps, "AdamW epsilon"),
      EXAMOE_KEY_DBL("train.clip", train.clip, "Global gradient-norm clip (0 = off)"),
      EXAMOE_KEY_U64("train.seed", train.seed, "Seed of parameters and data"),
      EXAMOE_KEY_STR("train.precision", train.precision, "float or double"),
      ConfigKey{"train.nonfinite", "On a NaN/Inf loss or gradient: skip the step's update, or checkpoint the last good state and stop", "skip|stop",
                [](const TrainConfig& c) { return c.train.nonfinite; },
                [](TrainConfig& c, const std::string& v) {
                  if (v != "skip" && v != "stop")
                    throw Error("examoe::config: train.nonfinite must be skip or stop, got " + quoted(v));
                  c.train.nonfinite = v;
                }},
      EXAMOE_KEY_INT("train.max_skipped", train.max_skipped, "Checkpoint and stop after this many skipped (non-finite) steps in a row"),
      EXAMOE_KEY_STR("train.memory_limit", train.memory_limit, "Memory per rank: auto (physical/cgroup memory shared by the node's ranks), off, or a size like 8GiB; configs estimated to need more are refused before allocating"),
      EXAMOE_KEY_STR("data.path", data.path, "Train a byte-level model on this file (empty: built-in addition corpus)"),
      EXAMOE_KEY_INT("data.digits", data.digits, "Addition corpus: digits per operand (1-6)"),
      EXAMOE_KEY_INT("data.val_problems", data.val_problems, "Addition corpus: held-out problems for accuracy"),
      EXAMOE_KEY_DBL("data.val_fraction", data.val_fraction, "File corpus: fraction kept for validation (0, 0.5]"),
      EXAMOE_KEY_INT("log.interval", log.interval, "Progress line every N steps"),
      EXAMOE_KEY_INT("log.eval_interval", log.eval_interval, "Validation every N steps (and at the end)"),
      EXAMOE_KEY_STR("log.metrics", log.metrics, "Append JSON lines of metrics to this file (rank 0)"),
      EXAMOE_KEY_BOOL("log.quiet", log.quiet, "Only the summary"),
      EXAMOE_KEY_STR("checkpoint.dir", checkpoint.dir, "Directory of the step-<N>.h5 checkpoints"),
      EXAMOE_KEY_INT("checkpoint.interval", checkpoint.interval, "Checkpoint every N steps (0 = only on SIGTERM/SIGUSR1)"),
      EXAMOE_KEY_INT("checkpoint.keep", checkpoint.keep, "Keep the newest K checkpoints of this run (other runs' are never pruned)"),
      EXAMOE_KEY_BOOL("checkpoint.allow_existing", checkpoint.allow_existing, "Start a new run (no --resume) in a checkpoint.dir that already holds other checkpoints; they stay untouched (default: refused)"),
      EXAMOE_KEY_INT("placement.rebalance_interval", placement.rebalance_interval, "Rebalance experts over ranks every N steps from their load (0 = never)"),
      EXAMOE_KEY_DBL("placement.ema", placement.ema, "Decay of the per-expert load average used by the rebalancer"),
      EXAMOE_KEY_STR("checkpoint.resume", checkpoint.resume, "Resume from this checkpoint, or 'latest' in checkpoint.dir"),
  };
  return keys;
}

std::string closest_key(const std::string& name) {
  std::string best;
  std::size_t bd = ~std::size_t(0);
  for (const auto& k : config_keys()) {
    // Compare with the full name and with its last component (users often drop the prefix).
    const std::string last = k.name.substr(k.name.rfind('.') + 1);
    const std::size_t d = std::min(edit_distance(name, k.name), edit_distance(name, last));
    if (d < bd) {
      bd = d;
      best = k.name;
    }
  }
  return best;
}

namespace {
/// At most `n` characters of `s` and its length (for messages that quote user input).
std::string clip_text(const std::string& s, std::size_t n = 80) { return clip_for_message(s, n); }
}  // namespace

namespace {
/// Parses `text` as JSON and refuses an object that repeats a key (the parser would keep the
/// last one silently): the parser callback sees every key as it is read, with a stack of the
/// open objects and arrays and the keys each object has so far.
nlohmann::json parse_json_without_duplicates(const std::string& text, const std::string& source) {
  using Event = nlohmann::json::parse_event_t;
  struct Open {
    bool object = false;
    std::string path, last_key;
    std::set<std::string> keys;
  };
  std::vector<Open> open;
  std::string repeated;
  auto callback = [&](int, Event event, nlohmann::json& parsed) {
    if (event == Event::object_start || event == Event::array_start) {
      Open o;
      o.object = event == Event::object_start;
      if (!open.empty())
        o.path = open.back().object ? (open.back().path.empty() ? "" : open.back().path + ".") + open.back().last_key
                                    : open.back().path + "[]";
      open.push_back(std::move(o));
    } else if (event == Event::key && !open.empty()) {
      Open& o = open.back();
      o.last_key = parsed.get<std::string>();
      if (!o.keys.insert(o.last_key).second && repeated.empty())
        repeated = (o.path.empty() ? "" : o.path + ".") + o.last_key;
    } else if ((event == Event::object_end || event == Event::array_end) && !open.empty()) {
      open.pop_back();
    }
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, callback);
  } catch (const std::exception& e) {
    throw Error("examoe::config: " + clip_for_message(source) + " is not valid JSON: " + clip_for_message(e.what()));
  }
  if (!repeated.empty())
    throw Error("examoe::config: key '" + clip_text(repeated) + "' appears twice in the same object of " +
                clip_for_message(source) + " (a key may be given once)");
  return j;
}

/// How a key was spelled in the file, for messages: {"model": {"d_model": ...}}.
std::string json_spelling(const std::vector<std::string>& path) {
  std::string open, close;
  for (const auto& p : path) {
    open += "{\"" + clip_text(p, 40) + "\": ";
    close += "}";
  }
  return open + "..." + close;
}
}  // namespace

void apply_json_config(TrainConfig& cfg, const std::string& text, const std::string& source) {
  const nlohmann::json j = parse_json_without_duplicates(text, source);
  if (!j.is_object()) throw Error("examoe::config: " + clip_for_message(source) + " must hold a JSON object");
  // Keys have at most 3 components (model.router.temperature): deeper objects are unknown
  // keys, reported without walking further (bounded recursion whatever the input).
  constexpr int kMaxDepth = 4;
  std::vector<std::pair<std::string, nlohmann::json>> flat;
  std::map<std::string, std::vector<std::string>> spelled;  // key -> its path in the file
  std::vector<std::string> path;
  std::function<void(const std::string&, const nlohmann::json&, int)> walk =
      [&](const std::string& prefix, const nlohmann::json& o, int depth) {
        for (auto it = o.begin(); it != o.end(); ++it) {
          const std::string name = prefix.empty() ? it.key() : prefix + "." + it.key();
          path.push_back(it.key());
          bool is_key = false;
          for (const auto& k : config_keys()) is_key = is_key || k.name == name;
          if (it->is_object() && !is_key && depth < kMaxDepth) {
            walk(name, *it, depth + 1);
          } else {
            // The same key nested and dotted ({"model": {"d_model": 1}, "model.d_model": 2}):
            // neither may silently win.
            const auto [at, fresh] = spelled.emplace(name, path);
            if (!fresh)
              throw Error("examoe::config: key '" + clip_text(name) + "' is given twice in " + clip_for_message(source) +
                          ": as " + json_spelling(at->second) + " and as " + json_spelling(path) +
                          " (a key may be given once)");
            flat.emplace_back(name, *it);
          }
          path.pop_back();
        }
      };
  walk("", j, 1);
  for (const auto& [name, value] : flat) {
    const ConfigKey* key = nullptr;
    for (const auto& k : config_keys())
      if (k.name == name) key = &k;
    if (!key)
      throw Error("examoe::config: unknown key '" + clip_text(name) + "' in " + clip_for_message(source) + " (did you mean '" +
                  closest_key(name.substr(0, 200)) + "'?)");
    std::string v;
    if (value.is_string()) v = value.get<std::string>();
    else if (value.is_boolean()) v = value.get<bool>() ? "true" : "false";
    else if (value.is_number_unsigned()) v = std::to_string(value.get<std::uint64_t>());
    else if (value.is_number_integer()) v = std::to_string(value.get<std::int64_t>());
    else if (value.is_number()) v = fmt_double(value.get<double>());
    else
      throw Error("examoe::config: key '" + clip_text(name) + "' in " + clip_for_message(source) + " has an unsupported value " +
                  clip_text(value.dump()) + " (expected a string, number or boolean)");
    key->set(cfg, v);
  }
}

void TrainConfig::validate() const {
  const std::string f = "examoe::TrainConfig: ";
  // Every message names the key as the command line and config files spell it, and the value.
  auto text = [&](const char* key) {
    for (const auto& k : config_keys())
      if (k.name == key) return k.get(*this);
    return std::string("?");
  };
  auto need = [&](bool ok, const char* key, const std::string& rule) {
    if (!ok) throw Error(f + key + " must be " + rule + " (got " + clip_for_message(text(key)) + ")");
  };
  need(model.d_model > 0, "model.d_model", "positive");
  need(model.n_layers > 0, "model.n_layers", "positive");
  need(model.n_heads > 0, "model.n_heads", "positive");
  need(model.d_model % model.n_heads == 0, "model.n_heads", "a divisor of model.d_model = " + text("model.d_model"));
  need(model.seq_len > 0, "model.seq_len", "positive");
  need(model.d_hidden > 0, "model.d_hidden", "positive");
  need(model.num_experts > 0, "model.num_experts", "positive");
  need(model.top_k >= 1 && model.top_k <= model.num_experts, "model.top_k",
       "in [1, model.num_experts = " + text("model.num_experts") + "]");
  need(model.router.temperature > 0, "model.router.temperature", "positive");
  need(model.router.jitter >= 0, "model.router.jitter", ">= 0");
  need(model.router.aux_loss_coef >= 0, "model.router.aux_loss_coef", ">= 0");
  need(model.router.z_loss_coef >= 0, "model.router.z_loss_coef", ">= 0");
  need(model.norm_eps > 0, "model.norm_eps", "positive");
  model.validate();  // anything the model checks beyond the keys (vocab)
  need(parallel.ep >= 0, "parallel.ep", ">= 0 (0 = the whole world)");
  need(train.steps >= 0, "train.steps", ">= 0");
  need(train.batch > 0, "train.batch", "positive");
  need(train.lr > 0 && std::isfinite(train.lr), "train.lr", "positive");
  need(train.min_lr >= 0 && train.min_lr <= train.lr, "train.min_lr", "in [0, train.lr = " + text("train.lr") + "]");
  need(train.warmup >= 0, "train.warmup", ">= 0");
  need(train.weight_decay >= 0 && std::isfinite(train.weight_decay), "train.weight_decay", ">= 0");
  need(train.beta1 >= 0 && train.beta1 < 1, "train.beta1", "in [0, 1)");
  need(train.beta2 >= 0 && train.beta2 < 1, "train.beta2", "in [0, 1)");
  need(train.eps > 0 && std::isfinite(train.eps), "train.eps", "positive");
  need(train.clip >= 0 && std::isfinite(train.clip), "train.clip", ">= 0 (0 = off)");
  need(train.precision == "float" || train.precision == "double", "train.precision", "float or double");
  need(train.nonfinite == "skip" || train.nonfinite == "stop", "train.nonfinite", "skip or stop");
  need(train.max_skipped >= 1, "train.max_skipped", ">= 1");
  need(parallel.watchdog_seconds >= 0 && std::isfinite(parallel.watchdog_seconds), "parallel.watchdog_seconds",
       ">= 0 (0 = off)");
  need(parallel.comm == "auto" || parallel.comm == "mpi" || parallel.comm == "nccl", "parallel.comm",
       "auto, mpi or nccl");
  need(parallel.gpu_aware_mpi == "auto" || parallel.gpu_aware_mpi == "true" || parallel.gpu_aware_mpi == "false",
       "parallel.gpu_aware_mpi", "auto, true or false");
  std::size_t bytes = 0;
  need(train.memory_limit == "auto" || train.memory_limit == "off" || parse_memory_size(train.memory_limit, bytes),
       "train.memory_limit", "auto, off or a size such as 8GiB, 512MiB or 2e9");
  need(data.digits >= 1 && data.digits <= 6, "data.digits", "in [1, 6]");
  need(data.val_problems > 0, "data.val_problems", "positive");
  need(data.val_fraction > 0 && data.val_fraction <= 0.5, "data.val_fraction", "in (0, 0.5]");
  need(log.interval > 0, "log.interval", "positive");
  need(log.eval_interval > 0, "log.eval_interval", "positive");
  need(!checkpoint.dir.empty(), "checkpoint.dir", "a directory name, not empty");
  need(checkpoint.interval >= 0, "checkpoint.interval", ">= 0 (0 = only on SIGTERM/SIGUSR1)");
  need(checkpoint.keep >= 1, "checkpoint.keep", ">= 1");
  need(placement.rebalance_interval >= 0, "placement.rebalance_interval", ">= 0 (0 = never)");
  need(placement.ema >= 0 && placement.ema < 1, "placement.ema", "in [0, 1)");
}

std::string canonical_config(const TrainConfig& cfg) {
  std::string s;
  for (const auto& k : config_keys()) s += k.name + "=" + k.get(cfg) + "\n";
  return s;
}

std::uint64_t config_hash(const TrainConfig& cfg) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a 64
  for (unsigned char c : canonical_config(cfg)) h = (h ^ c) * 1099511628211ull;
  return h;
}

namespace {
void check_same_config(const TrainConfig& cfg, Communicator& c) {
  std::vector<impl::NamedValue> fields;
  for (const auto& k : config_keys()) fields.push_back({k.name, k.get(cfg)});
  impl::check_same_on_every_rank(c, fields, "examoe::train", "config");
}
}  // namespace

void check_same_config(const TrainConfig& cfg, MPI_Comm comm) {
  auto c = make_mpi_communicator(comm);
  check_same_config(cfg, *c);
}

bool parse_memory_size(const std::string& text, std::size_t& bytes) {
  std::size_t pos = 0;
  double x = 0;
  try {
    x = std::stod(text, &pos);
  } catch (const std::exception&) {
    return false;
  }
  std::string unit = text.substr(pos);
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  static const std::pair<const char*, double> units[] = {
      {"", 1},           {"B", 1},
      {"KB", 1e3},       {"MB", 1e6},           {"GB", 1e9},           {"TB", 1e12},
      {"K", 1024.0},     {"M", 1048576.0},      {"G", 1073741824.0},   {"T", 1099511627776.0},
      {"KiB", 1024.0},   {"MiB", 1048576.0},    {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  for (const auto& [name, scale] : units)
    if (unit == name) {
      const double b = x * scale;
      if (!std::isfinite(b) || b < 0 || b >= 1.8e19) return false;
      bytes = static_cast<std::size_t>(b);
      return true;
    }
  return false;
}

std::size_t memory_limit_bytes(const std::string& setting, MPI_Comm comm, std::string* how) {
  std::size_t bytes = 0;
  if (setting == "off") {
    if (how) *how = "train.memory_limit = off";
    return 0;
  }
  if (setting != "auto") {
    if (!parse_memory_size(setting, bytes))
      throw Error("examoe::TrainConfig: train.memory_limit must be auto, off or a size such as 8GiB, 512MiB or 2e9 (got " +
                  setting + ")");
    if (how) *how = "train.memory_limit = " + setting;
    return bytes;
  }
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  const double phys = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
  const double cg = cgroup_memory_limit();
  const double node = cg > 0 && (phys <= 0 || cg < phys) ? cg : phys;
  const int local = node_local(comm).size;
  if (node <= 0) {
    if (how) *how = "train.memory_limit = auto, but the physical memory is unknown: not checked";
    return 0;
  }
  bytes = static_cast<std::size_t>(node / local);
  if (how)
    *how = "train.memory_limit = auto: " + human_bytes(node) + (node == cg ? " cgroup limit" : " physical memory") +
           " shared by " + std::to_string(local) + (local == 1 ? " rank" : " ranks") + " on this node";
  return bytes;
}

// ------------------------------------------------------------------ training
namespace {

// SIGTERM / SIGUSR1 (what Slurm sends before a time limit) ask for a checkpoint and a clean
// stop at the end of the current step. Installed after MPI_Init, so they replace MPICH's
// own SIGUSR1 handler for the duration of train(); the previous handlers come back after.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void examoe_on_signal(int sig) { g_stop_signal = sig; }
struct SignalGuard {
  struct sigaction old_term {}, old_usr1 {};
  SignalGuard() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = examoe_on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGUSR1, &sa, &old_usr1);
  }
  ~SignalGuard() {
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGUSR1, &old_usr1, nullptr);
  }
};

/// [first, first+count) of n items split as evenly as possible over `parts`.
std::pair<int, int> split(int n, int parts, int part) {
  const int base = n / parts, extra = n % parts;
  const int first = part * base + std::min(part, extra);
  return {first, base + (part < extra ? 1 : 0)};
}

std::size_t peak_rss_bytes() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<std::size_t>(ru.ru_maxrss) * 1024;
}

/// Data every rank holds besides the model (a data file read whole, an eval input), counted
/// in the memory check before it is read.
struct HeldData {
  std::size_t bytes = 0;
  std::string what;  ///< for the message: "the data file 'F'"
};

/// Refuses, on every rank and before the model allocates anything, a config whose estimated
/// memory per rank exceeds train.memory_limit. `rows`: the most tokens a rank processes at once.
void check_memory(const TrainConfig& cfg, Mesh& mesh, long long rows, std::size_t scalar_bytes,
                  const HeldData& data = {}) {
  std::string how, err;
  const std::size_t limit = memory_limit_bytes(cfg.train.memory_limit, mesh.world().mpi_comm(), &how);
  const MemoryReport m = estimate_memory(cfg.model, cfg.parallel, mesh.world_size(), mesh.ep_size(), rows, scalar_bytes);
  const std::size_t need = m.total() > SIZE_MAX - data.bytes ? SIZE_MAX : m.total() + data.bytes;
  if (limit > 0 && need > limit) {
    auto hb = [](std::size_t b) {
      return human_bytes(static_cast<double>(b)) + " (" + std::to_string(b) + " bytes)";
    };
    const auto per_rank = (cfg.model.num_experts + mesh.ep_size() - 1) / mesh.ep_size();
    std::ostringstream os;
    os << "examoe::train: this config needs about " << hb(need) << " of memory per rank, but "
       << hb(limit) << " are available per rank (" << how << "). Estimate: local experts "
       << human_bytes(static_cast<double>(m.experts)) << " (model.num_experts = " << cfg.model.num_experts
       << " over ep = " << mesh.ep_size() << ": up to " << per_rank << " per rank) + their gradients "
       << human_bytes(static_cast<double>(m.expert_grads)) << " + AdamW moments "
       << human_bytes(static_cast<double>(m.optimizer)) << "; dense shards "
       << human_bytes(static_cast<double>(3 * m.dense_shard)) << " with gradients and decay mask; gathered units "
       << human_bytes(static_cast<double>(m.gathered_peak + m.grad_buffer)) << "; activations and buffers for "
       << rows << " tokens " << human_bytes(static_cast<double>(m.activations) + static_cast<double>(m.buffers));
    if (data.bytes > 0) os << "; " << data.what << " " << hb(data.bytes) << ", held whole by every rank";
    os << ". Reduce model.num_experts, model.d_hidden, model.d_model or train.batch, raise parallel.ep to "
          "spread the experts"
       << (data.bytes > 0 ? ", use less data" : "") << ", or set train.memory_limit.";
    err = os.str();
  }
  throw_if_any(mesh.world(), err);
}

std::string human_time(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) / 60) % 60);
  return buf;
}

template <class S>
EvalResult evaluate(Model<S>& model, const Corpus& corpus, int seq_len) {
  impl::CollectiveLabel label("train.eval");
  Mesh& mesh = model.mesh();
  const int nseq = corpus.num_val_sequences(seq_len);
  const auto [first, count] = split(nseq, mesh.world_size(), mesh.world_rank());
  Batch b;
  corpus.val_batch(first, count, seq_len, b);
  std::vector<int> correct;
  StepStats st = model.evaluate(b, &correct);
  const int np = corpus.num_val_problems();
  // Per problem: number of target rows and of correct ones (problems never span ranks, but
  // summing over ranks does not need that).
  std::vector<double> red(2 + 2 * static_cast<std::size_t>(np), 0.0);
  red[0] = st.ce_sum;
  red[1] = static_cast<double>(st.valid);
  for (std::size_t i = 0; i < correct.size(); ++i) {
    const int p = b.sample_of_row.empty() ? -1 : b.sample_of_row[i];
    if (p >= 0 && b.targets[i] >= 0) {
      red[2 + 2 * p] += 1;
      red[3 + 2 * p] += correct[i];
    }
  }
  mesh.world().allreduce_sum(red.data(), red.size(), DataType::f64);
  EvalResult r;
  r.targets = static_cast<long long>(red[1]);
  r.loss = red[1] > 0 ? red[0] / red[1] : 0.0;
  if (np > 0) {
    int exact = 0;
    for (int p = 0; p < np; ++p) exact += (red[2 + 2 * p] > 0 && red[3 + 2 * p] == red[2 + 2 * p]) ? 1 : 0;
    r.accuracy = static_cast<double>(exact) / np;
  }
  return r;
}

/// Mean cross-entropy from the reduced sum (NaN/Inf pass through).
double ce_or_nan(double ce_sum, long long gvalid) {
  return gvalid > 0 ? ce_sum / static_cast<double>(gvalid) : (std::isfinite(ce_sum) ? 0.0 : ce_sum);
}

/// AdamW settings of a training config.
AdamWConfig adamw_config(const TrainConfig& cfg) {
  AdamWConfig ac;
  ac.beta1 = cfg.train.beta1;
  ac.beta2 = cfg.train.beta2;
  ac.eps = cfg.train.eps;
  ac.weight_decay = cfg.train.weight_decay;
  return ac;
}

CommOptions comm_options(const ParallelConfig& p) {
  CommOptions o;
  o.backend = p.comm;
  o.gpu_aware_mpi = p.gpu_aware_mpi;
  return o;
}

/// Registers every row of the model's parameter table with the optimizer (AdamW tensor i is
/// row i), also where this rank owns no expert. Returns the expert gradient views (for the
/// global norm), in table order.
template <class S>
std::vector<typename AdamW<S>::vector> register_parameters(Model<S>& model, AdamW<S>& opt) {
  std::vector<typename AdamW<S>::vector> expert_grads;
  const auto& table = model.param_table();
  for (int i = 0; i < static_cast<int>(table.size()); ++i) {
    opt.add(model.param_values(i), model.param_grads(i), model.param_decay_mask(i), table[i].decay);
    if (table[i].owner == ParamSlot::Owner::experts) expert_grads.push_back(model.param_grads(i));
  }
  return expert_grads;
}

/// A checkpoint past train.steps cannot be resumed to train.steps: an error on every rank
/// (silently running 0 steps would hide a wrong --train.steps or checkpoint). One exactly at
/// train.steps is a finished run: it says so and runs no step (a requeued job that finds its
/// work done succeeds).
void check_resume_step(long long step, const std::string& path, const TrainConfig& cfg, Communicator& world,
                       std::ostream* log) {
  std::string err;
  if (step > cfg.train.steps)
    err = "examoe::train: checkpoint '" + clip_for_message(path) + "' is at step " + std::to_string(step) +
          ", past train.steps = " + std::to_string(cfg.train.steps) +
          ": there is nothing to resume (raise --train.steps above " + std::to_string(step) +
          " to train on, or resume an earlier checkpoint)";
  throw_if_any(world, err);
  if (step == cfg.train.steps && log)
    *log << "examoe train: checkpoint " << path << " is at step " << step << " = train.steps: training is already "
         << "complete, no step to run (raise --train.steps to train on)" << std::endl;
}

/// The training data, checked on every rank: errors (a missing file, one that is not a
/// regular file, too short, ...) are agreed before anything else, and a data file is measured
/// and counted in the memory check (with the batch and validation set it gives) before it is
/// read, so a 50 GB file is refused in a moment instead of being read by every rank.
template <class S>
std::unique_ptr<Corpus> make_corpus(const TrainConfig& cfg, Mesh& mesh) {
  const int seq = cfg.model.seq_len;
  std::unique_ptr<Corpus> corpus;
  HeldData data;
  long long val = 0;
  std::string err;
  try {
    if (cfg.data.path.empty()) {
      corpus = std::make_unique<AdditionCorpus>(cfg.train.seed, cfg.data.digits, cfg.data.val_problems);
      corpus->check(seq);
      val = corpus->num_val_sequences(seq);
    } else {
      data.bytes = FileCorpus::file_size(cfg.data.path);
      data.what = "the data file '" + clip_for_message(cfg.data.path) + "'";
      val = FileCorpus::val_sequences(data.bytes, cfg.data.val_fraction, seq);
    }
  } catch (const Error& e) {
    err = e.what();
  }
  throw_if_any(mesh.world(), err);
  // The most tokens a rank holds at once: its share of a training batch or of the validation
  // set (evaluated in one pass).
  const long long W = mesh.world_size();
  check_memory(cfg, mesh, std::max((cfg.train.batch + W - 1) / W, (val + W - 1) / W) * seq, sizeof(S), data);
  if (corpus) return corpus;
  try {
    corpus = std::make_unique<FileCorpus>(cfg.data.path, cfg.train.seed, cfg.data.val_fraction);
    corpus->check(seq);
  } catch (const Error& e) {
    err = e.what();
  }
  throw_if_any(mesh.world(), err);
  return corpus;
}

template <class S>
TrainResult run(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out) {
  using Clock = std::chrono::steady_clock;
  Mesh mesh(comm, cfg.parallel.ep, comm_options(cfg.parallel));
  const bool root = mesh.world_rank() == 0;
  std::ostream* log = root ? out : nullptr;
  if (cfg.model.num_experts < mesh.ep_size())
    throw Error("examoe::train: model.num_experts (" + std::to_string(cfg.model.num_experts) +
                ") must be at least the expert-parallel size ep = " + std::to_string(mesh.ep_size()) +
                " (every rank of an expert-parallel group holds at least one expert; set parallel.ep)");

  std::string err;
  std::unique_ptr<Corpus> corpus = make_corpus<S>(cfg, mesh);
  // The checkpoint directory: refuses a new run beside other checkpoints, takes its lock
  // (docs/checkpoint-format.md, "The checkpoint directory"); released when run() returns or throws.
  RunCheckpoints ckdir(cfg.checkpoint, mesh.world(), log);

  Model<S> model(cfg.model, cfg.parallel, mesh, cfg.train.seed);
  AdamW<S> opt(adamw_config(cfg));
  using U = typename AdamW<S>::vector;
  auto& F = model.fsdp();
  std::vector<U> expert_grads = register_parameters(model, opt);

  TrainResult res;
  res.unigram_entropy = corpus->unigram_entropy();
  const int seq = cfg.model.seq_len;
  SignalGuard signals;
  // Cumulative tokens per expert, [layer][expert] (global counts, identical on every rank).
  std::vector<std::vector<long long>> tokens_cum(
      model.n_layers(), std::vector<long long>(cfg.model.num_experts, 0));
  std::ofstream metrics;
  if (root && !cfg.log.metrics.empty()) {
    // Appending to a checkpoint or an input would destroy it.
    const std::string why = metrics_output_conflict(cfg);
    if (!why.empty()) err = why;
    else metrics.open(cfg.log.metrics, std::ios::app);
    if (err.empty() && !metrics) err = "examoe::train: cannot open metrics file '" + clip_for_message(cfg.log.metrics) + "'";
  }
  throw_if_any(mesh.world(), err);
  // Rank 0 writes the metrics; a failed write (a full disk, /dev/full) is kept and agreed at
  // the next progress point (agree_metrics), where every rank throws it.
  std::string metrics_err;
  long long metrics_step = 0;  // the step whose line is written
  auto emit_metrics = [&](const nlohmann::json& j) {
    if (!metrics.is_open() || !metrics_err.empty()) return;
    errno = 0;
    metrics << j.dump() << "\n";
    metrics.flush();
    if (!metrics) {
      const int e = errno;
      metrics_err = "examoe::train: cannot write metrics file '" + clip_for_message(cfg.log.metrics) + "' at step " +
                    std::to_string(metrics_step) + (e != 0 ? std::string(": ") + std::strerror(e) : std::string()) +
                    " (log.metrics; training stops rather than lose its records)";
    }
  };
  auto agree_metrics = [&] {
    if (cfg.log.metrics.empty()) return;  // the same on every rank: all call it or none
    impl::CollectiveLabel label("train.metrics");
    throw_if_any(mesh.world(), metrics_err);
  };
  nlohmann::json placement_history = nlohmann::json::array();
  // Dynamic expert placement: greedy LPT on the EMA of the tokens each expert received;
  // weights and AdamW moments move with their expert. Outputs do not depend on placement.
  std::vector<std::vector<double>> load_ema(model.n_layers(), std::vector<double>(cfg.model.num_experts, 0.0));
  bool have_ema = false;  // load_ema holds an average (from training or a checkpoint)
  /// Moves layer l's experts (weights and AdamW moments) to `np`; returns the old owners.
  auto move_layer = [&](int l, const Placement& np) {
    auto& m = model.moe(l);
    std::vector<int> old_owner = m.placement().owners();
    std::vector<int> slots;
    for (ExpertTensor t : m.expert_tensors()) slots.push_back(model.param_slot(l, t));
    std::vector<typename MoELayer<S>::flat_vector> state;
    for (int i : slots) {
      state.push_back(opt.m(i));
      state.push_back(opt.v(i));
    }
    m.set_placement(np, state);
    for (std::size_t t = 0; t < slots.size(); ++t) {
      const int i = slots[t];
      opt.rebind(i, model.param_values(i), model.param_grads(i), state[2 * t], state[2 * t + 1]);
      expert_grads[l * slots.size() + t] = model.param_grads(i);
    }
    return old_owner;
  };
  auto rebalance = [&](long long step_done) {
    for (int l = 0; l < model.n_layers(); ++l) {
      auto& m = model.moe(l);
      const Placement np = Placement::rebalance_lpt(load_ema[l], mesh.ep_size());
      if (np == m.placement()) continue;
      const double before = m.placement().imbalance(load_ema[l]), after = np.imbalance(load_ema[l]);
      const std::vector<int> old_owner = move_layer(l, np);
      ++res.migrations;
      res.imbalance_before.push_back(before);
      res.imbalance_after.push_back(after);
      nlohmann::json j;
      j["migration"] = true;
      j["step"] = step_done;
      j["layer"] = l;
      j["imbalance_before"] = before;
      j["imbalance_after"] = after;
      nlohmann::json moved = nlohmann::json::array();
      for (int e = 0; e < cfg.model.num_experts; ++e)
        if (old_owner[e] != np.owner(e)) moved.push_back({{"expert", e}, {"from", old_owner[e]}, {"to", np.owner(e)}});
      j["moved"] = moved;
      j["placement"] = np.owners();
      placement_history.push_back(j);
      if (log && !cfg.log.quiet)
        *log << "  rebalanced layer " << l << " at step " << step_done << ": imbalance " << before << " -> "
             << after << " (" << moved.size() << " experts moved)\n";
      emit_metrics(j);
    }
  };
  auto write_checkpoint = [&](long long step_done) {
    impl::CollectiveLabel label("checkpoint.write");
    const std::string path = ckdir.prepare_write(step_done);
    const auto t0 = Clock::now();
    save_checkpoint(path, model, opt, cfg, step_done, tokens_cum, placement_history.dump(), load_ema, ckdir.run_id());
    ckdir.after_write();
    res.last_checkpoint = path;
    if (log && !cfg.log.quiet)
      *log << "  checkpoint " << path << " written in "
           << std::chrono::duration<double>(Clock::now() - t0).count() << " s\n";
  };
  const auto [first, count] = split(cfg.train.batch, mesh.world_size(), mesh.world_rank());
  if (log && !cfg.log.quiet) {
    *log << "examoe train: " << mesh.world_size() << " ranks (dp " << mesh.dp_size() << " x ep "
         << mesh.ep_size() << "), " << Kokkos::DefaultExecutionSpace::name() << " with "
         << mesh.backend() << " collectives, " << cfg.train.precision << ", " << corpus->describe() << "\n";
    *log << "  model: d=" << cfg.model.d_model << " L=" << cfg.model.n_layers << " heads="
         << cfg.model.n_heads << " seq=" << seq << " E=" << cfg.model.num_experts << " k="
         << cfg.model.top_k << " h=" << cfg.model.d_hidden << " " << to_string(cfg.model.activation)
         << "; batch " << cfg.train.batch << " x " << seq << " tokens, " << cfg.train.steps << " steps\n";
  }
  long long start_step = 0;
  std::string resumed_from;
  if (!cfg.checkpoint.resume.empty()) {
    impl::CollectiveLabel label("checkpoint.resume");
    // "latest": temporary files of interrupted writes are never taken; removed with a note.
    const std::string path = ckdir.resolve_resume(cfg.checkpoint.resume);
    resumed_from = path;
    {
      // Same expert-parallel size: take over the saved placement (other sizes rebalance anew).
      const CheckpointInfo head = read_checkpoint_info(path, mesh.world().mpi_comm());
      check_resume_step(head.step, path, cfg, mesh.world(), log);
      // (A table of another shape belongs to another model: load_checkpoint names the
      // difference below.)
      bool same_shape = static_cast<int>(head.placement.size()) == model.n_layers();
      for (const auto& row : head.placement) same_shape = same_shape && static_cast<int>(row.size()) == cfg.model.num_experts;
      if (head.ep == mesh.ep_size() && same_shape)
        for (int l = 0; l < model.n_layers(); ++l) {
          const Placement saved = Placement::from_owners(head.placement[l], mesh.ep_size());
          if (saved != model.moe(l).placement()) move_layer(l, saved);
        }
      try {
        placement_history = nlohmann::json::parse(head.placement_history);
      } catch (const std::exception&) {
        placement_history = nlohmann::json::array();
      }
      if (!placement_history.is_array()) placement_history = nlohmann::json::array();  // history only
    }
    const CheckpointInfo info = load_checkpoint(path, model, opt, cfg);
    ckdir.adopt_run_id(info.run_id);  // the run goes on; its checkpoints are pruned as one
    start_step = info.step;
    for (int l = 0; l < model.n_layers() && l < static_cast<int>(info.tokens_per_expert.size()); ++l)
      for (int e = 0; e < cfg.model.num_experts && e < static_cast<int>(info.tokens_per_expert[l].size()); ++e)
        tokens_cum[l][e] = info.tokens_per_expert[l][e];
    for (int l = 0; l < model.n_layers() && l < static_cast<int>(info.expert_load_ema.size()); ++l)
      for (int e = 0; e < cfg.model.num_experts && e < static_cast<int>(info.expert_load_ema[l].size()); ++e)
        load_ema[l][e] = info.expert_load_ema[l][e];
    have_ema = !info.expert_load_ema.empty();
    if (log && !cfg.log.quiet)
      *log << "  resumed from " << path << " at step " << start_step << " (written by " << info.world_size
           << " ranks, dp " << info.dp << " x ep " << info.ep << ")\n";
  }
  res.first_step = start_step;
  res.initial = evaluate(model, *corpus, seq);
  {
    const MemoryReport mr = model.memory();
    if (log && !cfg.log.quiet) {
      *log << "  memory per rank: dense shards " << human_bytes(static_cast<double>(mr.dense_shard))
           << " (of " << human_bytes(static_cast<double>(mr.dense_total_params * sizeof(S)))
           << " dense in all), largest gathered unit " << human_bytes(static_cast<double>(mr.gathered_unit_max))
           << ", local experts " << human_bytes(static_cast<double>(mr.experts)) << " (of "
           << human_bytes(static_cast<double>(mr.expert_total_params * sizeof(S))) << "), optimizer state "
           << human_bytes(static_cast<double>(mr.optimizer)) << ", activations "
           << human_bytes(static_cast<double>(mr.activations))
           << (cfg.parallel.activation_checkpointing
                   ? " (checkpointing; " + human_bytes(static_cast<double>(mr.activations_without_checkpointing)) + " without)"
                   : std::string()) << "\n";
      *log << "  before training: val loss " << std::fixed << std::setprecision(4) << res.initial.loss
           << " nats (unigram entropy " << res.unigram_entropy << ")";
      if (res.initial.accuracy >= 0) *log << ", exact match " << std::setprecision(1) << 100 * res.initial.accuracy << " %";
      *log << std::defaultfloat << "\n";
    }
  }

  const auto t_start = Clock::now();
  auto t_interval = t_start;
  double interval_tokens = 0;
  Batch b;
  int skipped_in_a_row = 0;
  for (int step = static_cast<int>(start_step); step < cfg.train.steps; ++step) {
    metrics_step = step + 1;
    if (impl::fault::armed()) impl::fault::set_context(mesh.world_rank(), step + 1);
    corpus->train_batch(static_cast<std::uint64_t>(step), first, count, seq, b);
    long long valid = 0;
    for (int t : b.targets) valid += t >= 0 ? 1 : 0;
    long long gvalid = valid;
    {
      impl::CollectiveLabel label("train.count_targets");
      mesh.world().allreduce_sum(&gvalid, 1, DataType::i64);
    }
    StepStats st = model.forward_backward(b, gvalid, static_cast<std::uint64_t>(step));
    if (impl::fault::armed()) {  // fault injection (docs/faults.md)
      impl::fault::at_step();
      double v = 0;
      if (impl::fault::poison("loss", v)) st.ce_sum = v;
      if (impl::fault::poison("grad", v)) {
        for (int u = 0; u < F.num_units(); ++u)
          if (F.shard_numel(u) > 0) {
            Kokkos::deep_copy(Kokkos::subview(F.shard_grad(u), 0), static_cast<S>(v));
            break;
          }
      }
    }

    // Global gradient norm over every shard and every expert (experts counted once: on the
    // first replica of each expert-parallel group), and the agreement on a non-finite step.
    // [grad norm^2 | CE sum | stop signal seen on any rank | ranks that saw NaN/Inf]
    double sq[4] = {0, st.ce_sum, g_stop_signal ? 1.0 : 0.0, 0};
    for (int u = 0; u < F.num_units(); ++u) sq[0] += sum_squares(U(F.shard_grad(u).data(), F.shard_numel(u)));
    if (mesh.dp_rank() == 0)
      for (const auto& g : expert_grads) sq[0] += sum_squares(g);
    // Any NaN/Inf in this rank's gradients shows in its sum of squares (expert gradients of
    // other replicas equal the first replica's after their allreduce); aux and z are global.
    sq[3] = std::isfinite(sq[0]) && std::isfinite(st.ce_sum) && std::isfinite(st.aux) && std::isfinite(st.z) ? 0.0 : 1.0;
    {
      impl::CollectiveLabel label("optimizer.clip");
      mesh.world().allreduce_sum(sq, 4, DataType::f64);
    }
    // Identical on every rank: all decide from the same reduced values.
    const bool nonfinite = sq[3] > 0 || !std::isfinite(sq[0]) || !std::isfinite(sq[1]);
    const double gnorm = std::sqrt(sq[0]);
    const double scale = (cfg.train.clip > 0 && gnorm > cfg.train.clip) ? cfg.train.clip / gnorm : 1.0;
    const double lr = lr_schedule(step, cfg.train.steps, cfg.train.warmup, cfg.train.lr, cfg.train.min_lr);
    if (!nonfinite) {
      skipped_in_a_row = 0;
      opt.step(lr, scale);
      for (int l = 0; l < model.n_layers(); ++l)  // before validation overwrites the stats
        for (int e = 0; e < cfg.model.num_experts; ++e) {
          const double t = static_cast<double>(model.moe(l).stats().tokens_per_expert[e]);
          tokens_cum[l][e] += model.moe(l).stats().tokens_per_expert[e];
          load_ema[l][e] = !have_ema ? t : cfg.placement.ema * load_ema[l][e] + (1 - cfg.placement.ema) * t;
        }
      have_ema = true;
    } else {
      // Skipped: no update of weights, AdamW moments or step count, nor of the expert loads.
      ++skipped_in_a_row;
      ++res.skipped_steps;
      res.skipped.push_back(step + 1);
      const bool loss_bad = !std::isfinite(sq[1]) || !std::isfinite(st.aux) || !std::isfinite(st.z);
      const bool grad_bad = !std::isfinite(sq[0]);
      const std::string what = loss_bad && grad_bad ? "loss and gradient" : loss_bad ? "loss" : "gradient";
      const bool stop_now = cfg.train.nonfinite == "stop" || skipped_in_a_row >= cfg.train.max_skipped;
      if (log)
        *log << "  step " << step + 1 << ": non-finite " << what << " (seen on " << static_cast<int>(sq[3])
             << " of " << mesh.world_size() << " ranks); update skipped (" << res.skipped_steps << " skipped, "
             << skipped_in_a_row << " in a row)" << (stop_now ? "; stopping" : "") << std::endl;
      if (metrics.is_open()) {
        nlohmann::json j;
        j["step"] = step + 1;
        j["nonfinite"] = what;
        j["ranks"] = static_cast<int>(sq[3]);
        j["skipped"] = res.skipped_steps;
        j["skipped_in_a_row"] = skipped_in_a_row;
        j["action"] = stop_now ? "stop" : "skip";
        emit_metrics(j);
      }
      if (stop_now) {
        // The weights and optimizer state are those of the last good step; the checkpoint
        // carries this step's number, so a resumed run goes on with the next batch. Unless
        // they are not finite themselves (an earlier update overflowed): nothing is written.
        const std::string bad_state = find_bad_checkpoint_state(model, opt);
        if (bad_state.empty()) write_checkpoint(step + 1);
        res.losses.push_back(ce_or_nan(sq[1], gvalid) + st.aux + st.z);
        res.ce.push_back(ce_or_nan(sq[1], gvalid));
        res.last_step = step + 1;
        res.stopped_nonfinite = true;
        res.stop_message =
            "training stopped at step " + std::to_string(step + 1) + ": non-finite " + what +
            (cfg.train.nonfinite == "stop" ? std::string(" (train.nonfinite = stop)")
                                           : " in " + std::to_string(skipped_in_a_row) +
                                                 " steps in a row (train.max_skipped = " +
                                                 std::to_string(cfg.train.max_skipped) + ")") +
            (bad_state.empty() ? "; the last good weights and optimizer state are in " + res.last_checkpoint +
                                     " (resume with --resume latest; it goes on after this step)"
                               : invalid_state_note(bad_state, res.last_checkpoint.empty() ? resumed_from
                                                                                               : res.last_checkpoint));
        if (log) *log << "examoe: " << res.stop_message << std::endl;
        res.final = evaluate(model, *corpus, seq);
        break;
      }
    }
    if (cfg.placement.rebalance_interval > 0 && (step + 1) % cfg.placement.rebalance_interval == 0)
      rebalance(step + 1);

    const double ce = ce_or_nan(sq[1], gvalid);
    const double loss = ce + st.aux + st.z;
    res.losses.push_back(loss);
    res.ce.push_back(ce);
    interval_tokens += static_cast<double>(cfg.train.batch) * seq;

    const bool last = step + 1 == cfg.train.steps;
    const bool do_log = (step + 1) % cfg.log.interval == 0 || last;
    const bool do_eval = (step + 1) % cfg.log.eval_interval == 0 || last;
    // Load statistics of this training step, every layer (before validation overwrites them).
    double imb = 0;
    long long bytes = 0;
    std::array<double, kNumPhases> ph{};
    std::vector<std::vector<std::int64_t>> tpe;
    if (do_log || do_eval) {
      for (int l = 0; l < model.n_layers(); ++l) {
        const LayerStats& ls = model.moe(l).stats();
        imb = std::max(imb, ls.imbalance);
        bytes += ls.bytes_sent_dispatch + ls.bytes_sent_combine;
        for (int p = 0; p < kNumPhases; ++p) ph[p] += ls.seconds[p];
        tpe.push_back(ls.tokens_per_expert);
      }
    }
    EvalResult ev;
    if (do_eval) ev = evaluate(model, *corpus, seq);
    if (do_log || do_eval) {
      long long gbytes = bytes;
      {
        impl::CollectiveLabel label("train.metrics");
        mesh.world().allreduce_sum(&gbytes, 1, DataType::i64);
      }
      const double now = std::chrono::duration<double>(Clock::now() - t_start).count();
      const double dt = std::chrono::duration<double>(Clock::now() - t_interval).count();
      const double tps = dt > 0 ? interval_tokens / dt : 0.0;
      const double done = static_cast<double>(step + 1 - start_step);
      const double eta = done > 0 ? now / done * (cfg.train.steps - step - 1) : 0.0;
      t_interval = Clock::now();
      interval_tokens = 0;
      if (log && !cfg.log.quiet && do_log) {
        char line[256];
        std::snprintf(line, sizeof line,
                      "step %*d/%d | loss %.4f | aux %.4f | lr %.2e | %.0f tok/s | imbalance %.2f | ETA %s",
                      static_cast<int>(std::to_string(cfg.train.steps).size()), step + 1,
                      cfg.train.steps, loss, st.aux, lr, tps, imb, human_time(eta).c_str());
        *log << line;
        if (res.skipped_steps > 0) *log << " | skipped " << res.skipped_steps;
        if (do_eval) {
          std::snprintf(line, sizeof line, " | val %.4f", ev.loss);
          *log << line;
          if (ev.accuracy >= 0) {
            std::snprintf(line, sizeof line, " acc %.1f%%", 100 * ev.accuracy);
            *log << line;
          }
        }
        *log << std::endl;
      }
      if (metrics.is_open()) {
        nlohmann::json j;
        j["step"] = step + 1;
        j["loss"] = loss;
        j["ce"] = ce;
        j["aux"] = st.aux;
        j["z"] = st.z;
        j["lr"] = lr;
        j["grad_norm"] = gnorm;
        j["skipped"] = res.skipped_steps;
        j["tokens_per_s"] = tps;
        j["imbalance"] = imb;
        j["bytes_moved"] = gbytes;
        j["peak_rss_bytes"] = peak_rss_bytes();
        j["tokens_per_expert"] = tpe;
        nlohmann::json phs;
        for (int p = 0; p < kNumPhases; ++p) phs[phase_name(static_cast<Phase>(p))] = ph[p];
        j["moe_phase_s"] = phs;
        if (do_eval) {
          j["val_loss"] = ev.loss;
          if (ev.accuracy >= 0) j["val_accuracy"] = ev.accuracy;
        }
        emit_metrics(j);
      }
      agree_metrics();
    }
    res.last_step = step + 1;
    const bool stop = sq[2] > 0;
    if ((cfg.checkpoint.interval > 0 && (step + 1) % cfg.checkpoint.interval == 0) || stop)
      write_checkpoint(step + 1);
    if (last) res.final = ev;
    if (stop && !last) {
      if (log)
        *log << "stopping at step " << step + 1 << " on a signal; resume with --resume latest\n";
      res.stopped_by_signal = true;
      res.final = evaluate(model, *corpus, seq);
      break;
    }
  }
  if (res.last_step == 0) res.last_step = start_step;
  if (start_step >= cfg.train.steps) res.final = res.initial;
  // A run of 0 steps with checkpoints on writes the initial model (step-00000000.h5).
  if (cfg.train.steps == 0 && start_step == 0 && cfg.checkpoint.interval > 0) write_checkpoint(0);
  res.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  res.tokens_per_second = res.seconds > 0 ? static_cast<double>(cfg.train.batch) * seq * (res.last_step - start_step) / res.seconds : 0;
  res.memory = model.memory();
  if (log) {
    *log << std::fixed << std::setprecision(4) << "summary: " << res.last_step - start_step << " steps in "
         << std::setprecision(1) << res.seconds << " s (" << std::setprecision(0) << res.tokens_per_second
         << " tokens/s); val loss " << std::setprecision(4) << res.initial.loss << " -> " << res.final.loss
         << " nats (unigram entropy " << res.unigram_entropy << ")";
    if (res.final.accuracy >= 0)
      *log << "; exact match on " << corpus->num_val_problems() << " held-out problems "
           << std::setprecision(1) << 100 * res.initial.accuracy << " % -> " << 100 * res.final.accuracy << " %";
    if (res.skipped_steps > 0)
      *log << "; " << res.skipped_steps << (res.skipped_steps == 1 ? " step" : " steps")
           << " skipped (non-finite loss or gradient)";
    *log << std::defaultfloat << "; peak RSS " << human_bytes(static_cast<double>(peak_rss_bytes())) << "\n";
  }
  if (metrics.is_open()) {
    nlohmann::json j;
    j["summary"] = true;
    j["steps"] = cfg.train.steps;
    j["seconds"] = res.seconds;
    j["tokens_per_s"] = res.tokens_per_second;
    j["val_loss_initial"] = res.initial.loss;
    j["val_loss_final"] = res.final.loss;
    j["unigram_entropy"] = res.unigram_entropy;
    j["skipped_steps"] = res.skipped_steps;
    if (res.stopped_nonfinite) j["stopped"] = "nonfinite";
    if (res.stopped_by_signal) j["stopped"] = "signal";
    if (res.final.accuracy >= 0) j["val_accuracy"] = res.final.accuracy;
    emit_metrics(j);
  }
  agree_metrics();
  return res;
}

}  // namespace

TrainResult train(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out) {
  // First of all (before any collective whose shape depends on the config): the config must
  // be the same on every rank. Then validation errors are identical on every rank.
  {
    auto c = make_mpi_communicator(comm);
    check_same_config(cfg, *c);
    std::string err;
    try {
      cfg.validate();
    } catch (const Error& e) {
      err = e.what();
    }
    throw_if_any(*c, err);
    const int P = c->size(), ep = cfg.parallel.ep;
    if (ep > 0 && (ep > P || P % ep != 0))
      throw Error("examoe::train: parallel.ep = " + std::to_string(ep) + " must divide the world size " +
                  std::to_string(P) + " (world = dp x ep; parallel.ep = 0 means the whole world)");
    // Fault injection (tests of the fault handling): EXAMOE_FAULT, read once per run.
    try {
      const std::string spec = impl::fault::arm_from_env();
      impl::fault::check_reachable(P, cfg.train.steps);
      if (!spec.empty() && c->rank() == 0 && out) *out << "examoe: fault injection armed: EXAMOE_FAULT=" << spec << "\n";
    } catch (const Error& e) {
      err = e.what();
    }
    const std::string agreed = c->first_error(err);
    if (!agreed.empty()) {
      impl::fault::disarm();
      throw Error(agreed);
    }
  }
  struct Disarm {
    ~Disarm() { impl::fault::disarm(); }
  } disarm;
  impl::ScopedWatchdogSeconds watchdog(cfg.parallel.watchdog_seconds);
  return cfg.train.precision == "double" ? run<double>(cfg, comm, out) : run<float>(cfg, comm, out);
}

namespace {

#if EXAMOE_ENABLE_HDF5
/// What an eval input holds, found before any of its values is read.
struct EvalInputShape {
  long long n = 0;       ///< sequences
  bool targets = false;  ///< it has a 'targets' dataset
};

/// Rank 0: `input` is a regular file (a FIFO or a device is refused from stat(), never
/// opened: opening a FIFO blocks), HDF5, and holds a 2-D integer dataset 'tokens'
/// [N][seq_len] and, optionally, 'targets' of the same shape. Returns the error, or "".
std::string inspect_eval_input(const std::string& input, int seq, EvalInputShape& shape) {
  const std::string F = "'" + clip_for_message(input) + "'";
  struct stat st;
  if (::stat(input.c_str(), &st) != 0) return "examoe eval: cannot open input " + F + ": " + std::strerror(errno);
  if (!S_ISREG(st.st_mode)) return "examoe eval: input " + F + " is " + impl::file_kind(st.st_mode) + ", not a regular file";
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t f = H5Fopen(input.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return "examoe eval: cannot open input " + F + " as HDF5";
  std::string err;
  for (const char* name : {"tokens", "targets"}) {
    const std::string D = "dataset '" + std::string(name) + "' of " + F;
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) {
      if (std::strcmp(name, "tokens") == 0) err = "examoe eval: " + F + " has no dataset 'tokens'";
      break;
    }
    const hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    const hid_t sp = H5Dget_space(ds), type = H5Dget_type(ds);
    const H5T_class_t cls = H5Tget_class(type);
    hsize_t dims[2] = {0, 0};
    if (ds < 0 || sp < 0) err = "examoe eval: cannot read " + D;
    else if (H5Sget_simple_extent_ndims(sp) != 2)
      err = "examoe eval: dataset '" + std::string(name) + "' must be 2-D [sequences][seq_len]";
    else if (cls != H5T_INTEGER)
      err = "examoe eval: " + D + " holds " +
            (cls == H5T_FLOAT ? std::string("floating-point numbers") : cls == H5T_STRING ? "strings" : "values that are not integers") +
            "; token ids and targets must be an HDF5 integer type (they are not converted)";
    else {
      H5Sget_simple_extent_dims(sp, dims, nullptr);
      if (dims[1] != static_cast<hsize_t>(seq))
        err = "examoe eval: dataset '" + std::string(name) + "' has sequences of " + std::to_string(dims[1]) +
              " tokens; the model's seq_len is " + std::to_string(seq);
      else if (std::strcmp(name, "targets") == 0 && static_cast<long long>(dims[0]) != shape.n)
        err = "examoe eval: 'targets' and 'tokens' have different shapes";
      else if (std::strcmp(name, "tokens") == 0)
        shape.n = static_cast<long long>(std::min<hsize_t>(dims[0], static_cast<hsize_t>(LLONG_MAX)));
      else
        shape.targets = true;
    }
    if (type >= 0) H5Tclose(type);
    if (sp >= 0) H5Sclose(sp);
    if (ds >= 0) H5Dclose(ds);
    if (!err.empty()) break;
  }
  H5Fclose(f);
  return err;
}

/// Checks the ids read from dataset `name`: tokens in [0, V); targets in [0, V) or -1 (no
/// target), the only negative value allowed. A bad value is reported as it is (beyond 32
/// bits too), with the index of the first one and how many there are. Fills `out`.
template <class I>
std::string check_ids(const std::vector<I>& v, const char* name, const std::string& input, int seq, int V,
                      std::vector<int>& out) {
  const bool target = std::strcmp(name, "targets") == 0;
  std::size_t bad = 0, first = 0;
  out.resize(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const I x = v[i];
    bool ok = x < static_cast<I>(V);
    if constexpr (std::is_signed<I>::value) ok = ok && (x >= 0 || (target && x == -1));
    if (!ok && bad++ == 0) first = i;
    out[i] = ok ? static_cast<int>(x) : -1;
  }
  if (bad == 0) return {};
  const std::size_t row = first / static_cast<std::size_t>(seq), col = first % static_cast<std::size_t>(seq);
  std::ostringstream os;
  os << "examoe eval: " << (target ? "target " : "token ") << v[first] << " outside [0, " << V << ") at " << name << "["
     << row << "][" << col << "] of '" << clip_for_message(input) << "' ("
     << (target ? "-1 marks a position without a target and is the only negative value allowed; " : "")
     << "the first of " << bad << (bad == 1 ? " bad value)" : " bad values)");
  return os.str();
}

/// Rank 0: reads dataset `name` (shape and class checked by inspect_eval_input) as 64-bit
/// integers, signed or unsigned as stored, so no value is clipped before it is checked.
std::string read_eval_ids(const std::string& input, const char* name, int seq, int V, std::vector<int>& out) {
  const hid_t f = H5Fopen(input.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return "examoe eval: cannot open input '" + clip_for_message(input) + "' as HDF5";
  const hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
  const hid_t sp = H5Dget_space(ds), type = H5Dget_type(ds);
  const std::size_t count = static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp));
  const bool is_unsigned = H5Tget_sign(type) == H5T_SGN_NONE;
  std::string err;
  auto read = [&](auto& v, hid_t mem) {
    v.resize(count);
    if (count > 0 && H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
      err = "examoe eval: cannot read dataset '" + std::string(name) + "' of '" + clip_for_message(input) + "'";
    else
      err = check_ids(v, name, input, seq, V, out);
  };
  if (is_unsigned) {
    std::vector<unsigned long long> v;
    read(v, H5T_NATIVE_ULLONG);
  } else {
    std::vector<long long> v;
    read(v, H5T_NATIVE_LLONG);
  }
  H5Tclose(type);
  H5Sclose(sp);
  H5Dclose(ds);
  H5Fclose(f);
  return err;
}
#endif

template <class S>
double eval_run(const TrainConfig& cfg, const std::string& ckpt, const std::string& input,
                const std::string& output, MPI_Comm comm, std::ostream* out) {
  // The input is checked before the mesh is built (a bad file costs one agreement), and its
  // size counted in the memory check before its values are read.
  auto input_comm = make_mpi_communicator(comm);
  Communicator& w0 = *input_comm;
  const bool root = w0.rank() == 0;
  const int seq = cfg.model.seq_len, V = cfg.model.vocab;
  std::vector<int> tokens, targets;
  std::string err;
#if EXAMOE_ENABLE_HDF5
  EvalInputShape shape;
  if (root) err = inspect_eval_input(input, seq, shape);
#else
  struct {
    long long n = 0;
    bool targets = false;
  } shape;
  err = "examoe eval: this ExaMoE was built without HDF5";
#endif
  throw_if_any(w0, err);
  long long n = shape.n;
  int ht = shape.targets ? 1 : 0;
  w0.broadcast(&n, sizeof n, 0);
  w0.broadcast(&ht, sizeof ht, 0);
  // MPI counts are int: the logits gathered on rank 0 must number at most 2^31 - 1.
  const long long max_n = INT_MAX / (static_cast<long long>(seq) * V);
  if (n > max_n)
    throw Error("examoe eval: '" + clip_for_message(input) + "' holds " + std::to_string(n) + " sequences; one eval run " +
                "writes the logits of at most " + std::to_string(max_n) + " sequences of " + std::to_string(seq) +
                " tokens (2^31 - 1 values): split the input");
  input_comm.reset();
  Mesh mesh(comm, cfg.parallel.ep, comm_options(cfg.parallel));
  Communicator& w = mesh.world();

  if (cfg.model.num_experts < mesh.ep_size())
    throw Error("examoe eval: the checkpoint's model.num_experts (" + std::to_string(cfg.model.num_experts) +
                ") must be at least the expert-parallel size ep = " + std::to_string(mesh.ep_size()) + " (set --parallel.ep)");
  {
    // Every rank holds the tokens and targets; rank 0 reads them as 64-bit values and gathers
    // every logit.
    const std::size_t values = static_cast<std::size_t>(n) * static_cast<std::size_t>(seq);
    HeldData held;
    held.bytes = values * (sizeof(int) * (1 + ht) + sizeof(long long) + sizeof(float) * static_cast<std::size_t>(V));
    held.what = "the eval input '" + clip_for_message(input) + "' (its ids and their logits)";
    check_memory(cfg, mesh, (n + w.size() - 1) / w.size() * seq, sizeof(S), held);
  }
#if EXAMOE_ENABLE_HDF5
  if (root) {
    err = read_eval_ids(input, "tokens", seq, V, tokens);
    if (err.empty() && ht) err = read_eval_ids(input, "targets", seq, V, targets);
  }
#endif
  throw_if_any(w, err);
  tokens.resize(static_cast<std::size_t>(n) * seq);
  w.broadcast(tokens.data(), tokens.size() * sizeof(int), 0);
  if (ht) {
    targets.resize(tokens.size());
    w.broadcast(targets.data(), targets.size() * sizeof(int), 0);
  }
  Model<S> model(cfg.model, cfg.parallel, mesh, cfg.train.seed);
  AdamW<S> opt(adamw_config(cfg));
  register_parameters(model, opt);
  load_checkpoint(ckpt, model, opt, cfg);

  const auto [first, count] = split(static_cast<int>(n), w.size(), w.rank());
  Batch b;
  b.batch = count;
  b.seq_len = seq;
  b.tokens.assign(tokens.begin() + static_cast<std::ptrdiff_t>(first) * seq,
                  tokens.begin() + static_cast<std::ptrdiff_t>(first + count) * seq);
  if (ht)
    b.targets.assign(targets.begin() + static_cast<std::ptrdiff_t>(first) * seq,
                     targets.begin() + static_cast<std::ptrdiff_t>(first + count) * seq);
  else
    b.targets.assign(b.tokens.size(), -1);
  std::vector<float> logits;
  const StepStats st = model.evaluate(b, nullptr, &logits);
  double red[2] = {st.ce_sum, static_cast<double>(st.valid)};
  w.allreduce_sum(red, 2, DataType::f64);
  // Gather the logits on rank 0 (sequence order = rank order) and write them.
  std::vector<int> counts(w.size()), displs(w.size());
  const int mine = static_cast<int>(logits.size());
  MPI_Gather(&mine, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, w.mpi_comm());
  std::vector<float> all;
  if (root) {
    long long tot = 0;
    for (int r = 0; r < w.size(); ++r) {
      displs[r] = static_cast<int>(tot);
      tot += counts[r];
    }
    all.resize(static_cast<std::size_t>(tot));
  }
  MPI_Gatherv(logits.data(), mine, MPI_FLOAT, all.data(), counts.data(), displs.data(), MPI_FLOAT, 0, w.mpi_comm());
#if EXAMOE_ENABLE_HDF5
  if (root) {
    const std::string tmp = output + ".tmp";
    hid_t f = H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) {
      err = "examoe eval: cannot create output '" + output + "'";
    } else {
      hsize_t dims[3] = {static_cast<hsize_t>(n), static_cast<hsize_t>(seq), static_cast<hsize_t>(V)};
      hid_t sp = H5Screate_simple(3, dims, nullptr);
      hid_t ds = H5Dcreate2(f, "logits", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      if (ds < 0 || (!all.empty() && H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data()) < 0))
        err = "examoe eval: cannot write logits to '" + output + "'";
      if (ds >= 0) H5Dclose(ds);
      H5Sclose(sp);
      H5Fclose(f);
      if (err.empty() && std::rename(tmp.c_str(), output.c_str()) != 0)
        err = "examoe eval: cannot rename '" + tmp + "' to '" + output + "'";
    }
  }
#endif
  throw_if_any(w, err);
  const double loss = red[1] > 0 ? red[0] / red[1] : 0.0;
  if (out && root) {
    *out << "examoe eval: " << n << " sequences of " << seq << " tokens from " << input << " with " << ckpt
         << " -> " << output << " (logits [" << n << "][" << seq << "][" << V << "])";
    if (red[1] > 0) *out << "; mean cross-entropy " << loss << " nats over " << static_cast<long long>(red[1]) << " targets";
    *out << "\n";
  }
  return loss;
}

}  // namespace

double eval_file(const std::string& ckpt, const std::string& input, const std::string& output, int ep,
                 MPI_Comm comm, std::ostream* out) {
  {
    // No output may overwrite a checkpoint or an input (compared by device and inode).
    auto c = make_mpi_communicator(comm);
    std::string err;
    if (c->rank() == 0) {
      const std::string why =
          output_conflict(output, {{"the checkpoint being evaluated", ckpt}, {"the input (--input)", input}}, true);
      if (!why.empty())
        err = "examoe eval: --output " + why +
              ": refused, writing the logits would destroy it (no output may overwrite a checkpoint or an input; "
              "choose another --output)";
    }
    throw_if_any(*c, err);
  }
  const CheckpointInfo info = read_checkpoint_info(ckpt, comm);
  TrainConfig cfg;
  // Every rank read the same file, so every rank reaches the same verdict.
  try {
    for (const auto& [key, value] : info.config)
      for (const auto& k : config_keys())
        if (k.name == key) k.set(cfg, value);
    cfg.parallel.ep = ep;
    cfg.checkpoint.resume.clear();
    cfg.validate();
  } catch (const Error& e) {
    throw Error("examoe eval: checkpoint '" + ckpt + "' holds a config this ExaMoE cannot use: " + e.what());
  }
  return cfg.train.precision == "double" ? eval_run<double>(cfg, ckpt, input, output, comm, out)
                                         : eval_run<float>(cfg, ckpt, input, output, comm, out);
}

}  // namespace examoe
