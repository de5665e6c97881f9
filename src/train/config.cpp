// The training config: the key table (every key once: name, help, text form), JSON config
// files, validation, the canonical text and its hash, and the same-config check over ranks.
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/train.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <set>
#include <sstream>

namespace examoe {

std::string to_string(NonfinitePolicy p) { return p == NonfinitePolicy::stop ? "stop" : "skip"; }

NonfinitePolicy nonfinite_policy_from_string(const std::string& s) {
  for (NonfinitePolicy p : {NonfinitePolicy::skip, NonfinitePolicy::stop})
    if (s == to_string(p)) return p;
  throw Error("examoe::nonfinite_policy_from_string: unknown train.nonfinite '" + clip_for_message(s) +
              "' (expected skip or stop)");
}

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

/// The key, marked as one added later: left out of the canonical text and of checkpoints
/// while it holds its default (ConfigKey::omitted_at_default).
ConfigKey recorded_when_set(ConfigKey k) {
  k.omitted_at_default = true;
  return k;
}

}  // namespace

bool is_recorded(const ConfigKey& key, const TrainConfig& cfg) {
  static const TrainConfig defaults;
  return !key.omitted_at_default || key.get(cfg) != key.get(defaults);
}

const std::vector<ConfigKey>& config_keys() {
  static const std::vector<ConfigKey> keys = {
      recorded_when_set(EXAMOE_KEY_INT("model.vocab_size", model.vocab,
                                        "Vocabulary size V: token ids are in [0, V) (256: bytes; e.g. 50257 for GPT-2 tokens)")),
      EXAMOE_KEY_INT("model.d_model", model.d_model, "Model width d"),
      EXAMOE_KEY_INT("model.n_layers", model.n_layers, "Number of decoder blocks L"),
      EXAMOE_KEY_INT("model.n_heads", model.n_heads, "Attention heads (must divide d_model)"),
      EXAMOE_KEY_INT("model.seq_len", model.seq_len, "Tokens per sequence (context length)"),
      EXAMOE_KEY_INT("model.d_hidden", model.d_hidden, "Expert MLP hidden width"),
      EXAMOE_KEY_INT("model.num_experts", model.num_experts, "Experts per MoE layer E (>= ep)"),
      EXAMOE_KEY_INT("model.top_k", model.top_k, "Experts per token k (1 <= k <= E)"),
      recorded_when_set(EXAMOE_KEY_INT("model.num_shared_experts", model.num_shared_experts,
                                       "Shared experts per block: dense expert MLPs (model.activation) every token "
                                       "passes through, added to the routed output (0 = none)")),
      recorded_when_set(EXAMOE_KEY_INT("model.shared_hidden", model.shared_hidden,
                                       "Hidden width of each shared expert (0 = model.d_hidden)")),
      recorded_when_set(ConfigKey{"model.dispatch_dtype",
                "Type MoE rows travel in between ranks: scalar (train.precision) or bf16 (half the bytes; "
                "compute stays in train.precision)",
                "scalar|bf16", [](const TrainConfig& c) { return std::string(to_string(c.model.dispatch_dtype)); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.model.dispatch_dtype = dispatch_dtype_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: model.dispatch_dtype must be scalar or bf16, got " + quoted(v));
                  }
                }}),
      recorded_when_set(EXAMOE_KEY_BOOL("model.allow_tf32", model.allow_tf32,
                                        "Float expert GEMMs may use TF32 tensor cores (CUDA builds; about 1e-3 relative "
                                        "per product instead of float's 6e-8; no effect in double or on CPUs)")),
      recorded_when_set(EXAMOE_KEY_DBL("model.capacity_factor", model.capacity_factor,
                                       "Expert capacity: each expert keeps at most ceil(f * top_k * T / E) of a step's "
                                       "assignments (T: the expert-parallel group's tokens; largest gates kept, the "
                                       "others dropped to the residual path); 0 = dropless")),
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
      recorded_when_set(ConfigKey{"model.router.score",
                "Router scores: softmax, or sigmoid (DeepSeek-V3: gates are the chosen sigmoid scores normalised over the k)",
                "softmax|sigmoid", [](const TrainConfig& c) { return std::string(to_string(c.model.router.score)); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.model.router.score = router_score_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: model.router.score must be softmax or sigmoid, got " + quoted(v));
                  }
                }}),
      recorded_when_set(EXAMOE_KEY_DBL("model.router.bias_rate", model.router.bias_rate,
                                       "Aux-loss-free balancing: per-expert selection bias moved by rate * sign(mean load - load) "
                                       "after each optimizer step (never enters the gates; 0 = off)")),
      recorded_when_set(EXAMOE_KEY_INT("model.router.groups", model.router.groups,
                                       "Group-limited routing: experts in this many contiguous groups (0 = one per expert-parallel rank)")),
      recorded_when_set(EXAMOE_KEY_INT("model.router.topk_groups", model.router.topk_groups,
                                       "Group-limited routing: each token picks its k experts within its best this-many groups, "
                                       "ranked by the sum of their top two scores (0 = no limit)")),
      EXAMOE_KEY_DBL("model.norm_eps", model.norm_eps, "RMSNorm epsilon"),
      EXAMOE_KEY_INT("parallel.ep", parallel.ep, "Expert-parallel degree; dp = world / ep (0 = world)"),
      EXAMOE_KEY_BOOL("parallel.reshard_after_forward", parallel.reshard_after_forward, "FSDP: free gathered parameters after each unit's forward"),
      EXAMOE_KEY_BOOL("parallel.activation_checkpointing", parallel.activation_checkpointing, "Recompute each block in backward instead of storing it"),
      recorded_when_set(EXAMOE_KEY_BOOL("parallel.overlap_exchange", parallel.overlap_exchange,
                                        "MoE layers compute the rows that stay on a rank while the others travel (false: "
                                        "each all-to-all completes first; the results are the same)")),
      ConfigKey{"parallel.comm", "Collectives backend (auto: nccl when built with it and data is on GPUs, else mpi)",
                "auto|mpi|nccl", [](const TrainConfig& c) { return to_string(c.parallel.comm); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.parallel.comm = comm_backend_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: parallel.comm must be auto, mpi or nccl, got " + quoted(v));
                  }
                }},
      ConfigKey{"parallel.gpu_aware_mpi", "MPI takes GPU buffers directly (auto: ask MPI; false: stage the rows that leave a rank through host memory)",
                "auto|true|false", [](const TrainConfig& c) { return to_string(c.parallel.gpu_aware_mpi); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.parallel.gpu_aware_mpi = gpu_aware_mpi_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: parallel.gpu_aware_mpi must be auto, true or false, got " + quoted(v));
                  }
                }},
      EXAMOE_KEY_DBL("parallel.watchdog_seconds", parallel.watchdog_seconds, "Abort with a report naming the collective and the ranks that did not arrive when a collective takes longer than this (0 = off)"),
      EXAMOE_KEY_INT("train.steps", train.steps, "Optimizer steps"),
      EXAMOE_KEY_INT("train.batch", train.batch, "Global batch in sequences (split over all ranks)"),
      recorded_when_set(EXAMOE_KEY_INT("train.micro_batches", train.micro_batches,
                                       "Gradient accumulation: each rank's share of train.batch runs as this many "
                                       "micro-batches of one optimizer step (the same step as the whole batch, "
                                       "activations of one micro-batch; the share must divide by it)")),
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
                [](const TrainConfig& c) { return to_string(c.train.nonfinite); },
                [](TrainConfig& c, const std::string& v) {
                  try {
                    c.train.nonfinite = nonfinite_policy_from_string(v);
                  } catch (const Error&) {
                    throw Error("examoe::config: train.nonfinite must be skip or stop, got " + quoted(v));
                  }
                }},
      EXAMOE_KEY_INT("train.max_skipped", train.max_skipped, "Checkpoint and stop after this many skipped (non-finite) steps in a row"),
      EXAMOE_KEY_STR("train.memory_limit", train.memory_limit, "Memory per rank: auto (physical/cgroup memory shared by the node's ranks), off, or a size like 8GiB; configs estimated to need more are refused before allocating"),
      EXAMOE_KEY_STR("data.path", data.path, "Training data: a file of bytes or token ids, see data.format (empty: built-in addition corpus)"),
      EXAMOE_KEY_INT("data.digits", data.digits, "Addition corpus: digits per operand (1-6)"),
      EXAMOE_KEY_INT("data.val_problems", data.val_problems, "Addition corpus: held-out problems for accuracy"),
      EXAMOE_KEY_DBL("data.val_fraction", data.val_fraction, "File corpus: fraction kept for validation (0, 0.5]"),
      recorded_when_set(ConfigKey{
          "data.format",
          "How data.path and data.val_path hold tokens: bytes (each byte a token), llmc (llm.c .bin: 256-int32 header "
          "with magic 20240520, then uint16 tokens, or uint32 for version 2), uint16 (headerless uint16, as nanoGPT's np.tofile writes), hdf5 "
          "(a 1-D integer dataset, data.dataset), auto: hdf5 for a .h5/.hdf5 name or the HDF5 signature, llmc when the "
          "file starts with the llm.c magic, else bytes (headerless uint16 needs uint16; with model.vocab_size other "
          "than 256, auto refuses to guess bytes)",
          "bytes|llmc|uint16|hdf5|auto", [](const TrainConfig& c) { return to_string(c.data.format); },
          [](TrainConfig& c, const std::string& v) {
            try {
              c.data.format = token_format_from_string(v);
            } catch (const Error&) {
              throw Error("examoe::config: data.format must be bytes, llmc, uint16, hdf5 or auto, got " + quoted(v));
            }
          }}),
      recorded_when_set(EXAMOE_KEY_STR("data.dataset", data.dataset,
                                       "HDF5 data: the 1-D integer dataset of token ids (empty: 'tokens')")),
      recorded_when_set(EXAMOE_KEY_STR("data.val_path", data.val_path,
                                       "Validation tokens from this file (same formats as data.path; empty: the last "
                                       "data.val_fraction of data.path)")),
      recorded_when_set(EXAMOE_KEY_INT("data.val_sequences", data.val_sequences,
                                       "Token files: validation sequences, spread evenly over the validation part "
                                       "(0 = every window; the set is evaluated in one pass)")),
      EXAMOE_KEY_INT("log.interval", log.interval, "Progress line every N steps"),
      EXAMOE_KEY_INT("log.eval_interval", log.eval_interval, "Validation every N steps (and at the end)"),
      EXAMOE_KEY_STR("log.metrics", log.metrics, "Append JSON lines of metrics to this file (rank 0)"),
      EXAMOE_KEY_BOOL("log.quiet", log.quiet, "Only the summary"),
      recorded_when_set(EXAMOE_KEY_BOOL("log.step_phases", log.step_phases,
                                        "Time each training step's phases (attention, projections, MoE, FSDP, "
                                        "optimizer, ...) for the metrics and the summary; on a GPU this fences once "
                                        "per phase")),
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
  need(model.vocab >= 1 && model.vocab <= ModelConfig::kMaxVocab, "model.vocab_size", "in [1, 16777216 = 2^24]");
  need(model.d_model > 0, "model.d_model", "positive");
  need(model.n_layers > 0, "model.n_layers", "positive");
  need(model.n_heads > 0, "model.n_heads", "positive");
  need(model.d_model % model.n_heads == 0, "model.n_heads", "a divisor of model.d_model = " + text("model.d_model"));
  need(model.seq_len > 0, "model.seq_len", "positive");
  need(model.d_hidden > 0, "model.d_hidden", "positive");
  need(model.num_experts > 0, "model.num_experts",
       "positive (no routed experts is no MoE model; dense MLP blocks: model.num_experts 1 and model.top_k 1, "
       "whose one expert takes every token with gate 1, beside model.num_shared_experts)");
  need(model.top_k >= 1 && model.top_k <= model.num_experts, "model.top_k",
       "in [1, model.num_experts = " + text("model.num_experts") + "]");
  need(model.num_shared_experts >= 0, "model.num_shared_experts", ">= 0 (0 = none)");
  need(model.shared_hidden >= 0, "model.shared_hidden", ">= 0 (0 = model.d_hidden)");
  need(1LL * model.num_shared_experts * model.shared_width() <= INT32_MAX, "model.num_shared_experts",
       "at most (2^31 - 1) / model.shared_hidden");
  need(model.router.temperature > 0, "model.router.temperature", "positive");
  need(model.router.jitter >= 0, "model.router.jitter", ">= 0");
  need(model.router.aux_loss_coef >= 0, "model.router.aux_loss_coef", ">= 0");
  need(model.router.z_loss_coef >= 0, "model.router.z_loss_coef", ">= 0");
  need(model.router.bias_rate >= 0 && std::isfinite(model.router.bias_rate), "model.router.bias_rate", ">= 0");
  need(model.router.groups >= 0 && model.router.groups <= model.num_experts, "model.router.groups",
       "in [0, model.num_experts = " + text("model.num_experts") + "] (0 = one group per expert-parallel rank)");
  need(model.router.topk_groups >= 0 && (model.router.groups == 0 || model.router.topk_groups <= model.router.groups),
       "model.router.topk_groups", "in [0, model.router.groups = " + text("model.router.groups") + "] (0 = no limit)");
  need(model.norm_eps > 0, "model.norm_eps", "positive");
  need(model.capacity_factor >= 0 && std::isfinite(model.capacity_factor), "model.capacity_factor",
       ">= 0 and finite (0 = dropless)");
  model.validate();  // anything the model checks beyond the keys (vocab)
  need(parallel.ep >= 0, "parallel.ep", ">= 0 (0 = the whole world)");
  need(train.steps >= 0, "train.steps", ">= 0");
  need(train.batch > 0, "train.batch", "positive");
  need(train.micro_batches >= 1, "train.micro_batches", ">= 1 (1 = no gradient accumulation)");
  need(train.lr > 0 && std::isfinite(train.lr), "train.lr", "positive");
  need(train.min_lr >= 0 && train.min_lr <= train.lr, "train.min_lr", "in [0, train.lr = " + text("train.lr") + "]");
  need(train.warmup >= 0, "train.warmup", ">= 0");
  need(train.weight_decay >= 0 && std::isfinite(train.weight_decay), "train.weight_decay", ">= 0");
  need(train.beta1 >= 0 && train.beta1 < 1, "train.beta1", "in [0, 1)");
  need(train.beta2 >= 0 && train.beta2 < 1, "train.beta2", "in [0, 1)");
  need(train.eps > 0 && std::isfinite(train.eps), "train.eps", "positive");
  need(train.clip >= 0 && std::isfinite(train.clip), "train.clip", ">= 0 (0 = off)");
  need(train.precision == "float" || train.precision == "double", "train.precision", "float or double");
  need(train.max_skipped >= 1, "train.max_skipped", ">= 1");
  need(parallel.watchdog_seconds >= 0 && std::isfinite(parallel.watchdog_seconds), "parallel.watchdog_seconds",
       ">= 0 (0 = off)");
  std::size_t bytes = 0;
  need(train.memory_limit == "auto" || train.memory_limit == "off" || parse_memory_size(train.memory_limit, bytes),
       "train.memory_limit", "auto, off or a size such as 8GiB, 512MiB or 2e9");
  need(data.digits >= 1 && data.digits <= 6, "data.digits", "in [1, 6]");
  need(data.val_problems > 0, "data.val_problems", "positive");
  need(data.val_fraction > 0 && data.val_fraction <= 0.5, "data.val_fraction", "in (0, 0.5]");
  need(data.val_sequences >= 0, "data.val_sequences", ">= 0 (0 = every window)");
  need(data.val_path.empty() || !data.path.empty(), "data.val_path",
       "empty without data.path (the built-in addition corpus has its own validation problems)");
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
  for (const auto& k : config_keys())
    if (is_recorded(k, cfg)) s += k.name + "=" + k.get(cfg) + "\n";
  return s;
}

std::uint64_t config_hash(const TrainConfig& cfg) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a 64
  for (unsigned char c : canonical_config(cfg)) h = (h ^ c) * 1099511628211ull;
  return h;
}

void check_same_config(const TrainConfig& cfg, Communicator& comm) {
  std::vector<impl::NamedValue> fields;
  for (const auto& k : config_keys()) fields.push_back({k.name, k.get(cfg)});
  impl::check_same_on_every_rank(comm, fields, "examoe::train", "config");
}

void check_same_config(const TrainConfig& cfg, MPI_Comm comm) {
  auto c = make_mpi_communicator(comm);
  check_same_config(cfg, *c);
}

}  // namespace examoe
