#pragma once
#include <examoe/model.hpp>

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

namespace examoe {

/// What a step whose loss or gradient is NaN/Inf on any rank does (`train.nonfinite`): skip
/// its update (weights, AdamW moments and step count stay as they were), or write a checkpoint
/// of the last good state and stop.
enum class NonfinitePolicy { skip, stop };
/// The config spellings: "skip", "stop".
std::string to_string(NonfinitePolicy p);
/// Parses a config spelling; throws examoe::Error (not collective) for any other text.
NonfinitePolicy nonfinite_policy_from_string(const std::string& s);

struct TrainOptions {
  int steps = 3000;
  int batch = 32;           ///< global batch, sequences per step (split over all ranks)
  /// Gradient accumulation: each rank's share of the batch runs as this many micro-batches of
  /// one optimizer step (the same step as the whole batch at once; docs/model.md).
  int micro_batches = 1;
  double lr = 3e-3, min_lr = 3e-4;
  int warmup = 60;
  double weight_decay = 0.05, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double clip = 1.0;        ///< global gradient-norm clip (0 = off)
  std::uint64_t seed = 1;
  std::string precision = "float";  ///< float or double
  /// A step whose loss or gradient is NaN/Inf on any rank: skip its update or stop.
  NonfinitePolicy nonfinite = NonfinitePolicy::skip;
  int max_skipped = 10;     ///< stop (with a checkpoint) after this many skipped steps in a row
  /// Memory a rank may use: "auto" (physical memory, or the cgroup limit if lower, shared by
  /// the ranks on the node), "off" (no check), or a size per rank such as "8GiB", "512MiB",
  /// "2e9" (bytes). The trainer refuses, on every rank and before allocating the model, a
  /// config whose estimated need (estimate_memory) exceeds it.
  std::string memory_limit = "auto";
};
struct DataOptions {
  std::string path;         ///< empty: the built-in addition corpus
  int digits = 2;           ///< addition corpus: digits per operand
  int val_problems = 256;
  double val_fraction = 0.1;  ///< file corpus: tail kept for validation
  /// How data.path (and data.val_path) hold their tokens (docs/data.md).
  TokenFormat format = TokenFormat::automatic;
  std::string dataset;      ///< hdf5: the dataset of token ids (empty: 'tokens')
  std::string val_path;     ///< a separate validation file (empty: the tail of data.path)
  /// token files: validation sequences, spread over the validation part (0 = every window)
  int val_sequences = 256;
};
struct LogOptions {
  int interval = 100;       ///< progress line every N steps
  int eval_interval = 500;  ///< validation every N steps (and at the end)
  std::string metrics;      ///< JSON-lines file (rank 0), empty = none
  bool quiet = false;
  /// Time the phases of every training step (Model::set_phase_timing): `step_phase_s` in the
  /// metrics, a line of shares before the summary. On a GPU each phase ends with a fence.
  bool step_phases = true;
};

struct CheckpointOptions {
  std::string dir = "checkpoints";  ///< where step-<N>.h5 files go
  int interval = 0;                 ///< write every N steps (0 = only on SIGTERM/SIGUSR1)
  int keep = 3;                     ///< keep the newest K checkpoints (of this run)
  std::string resume;               ///< "", a checkpoint path, or "latest" (newest in dir)
  /// A new run (no resume) in a directory that already holds checkpoints is refused unless
  /// this is set; they are never pruned or replaced by this run either way.
  bool allow_existing = false;
};

struct PlacementOptions {
  int rebalance_interval = 0;  ///< rebalance the experts every N steps (0 = never)
  double ema = 0.9;            ///< decay of the per-expert load average
};

struct TrainConfig {
  ModelConfig model;
  ParallelConfig parallel;
  TrainOptions train;
  DataOptions data;
  LogOptions log;
  CheckpointOptions checkpoint;
  PlacementOptions placement;
  void validate() const;
};

/// Every config key once: name ("model.d_model"), help, and how to read/write it as text.
/// The command line, the JSON config file and the printed config all come from this table.
struct ConfigKey {
  std::string name, help, type;  ///< type: INT, UINT, FLOAT, BOOL, TEXT or the choices
  std::function<std::string(const TrainConfig&)> get;
  std::function<void(TrainConfig&, const std::string&)> set;  ///< throws examoe::Error
  /// A key added after checkpoints and config hashes existed (model.vocab_size, data.format,
  /// data.dataset, data.val_path): at its default value it is left out of the canonical text
  /// (so the hash) and of a checkpoint's config group, which therefore stay what they were
  /// for every config that does not use it; a checkpoint without it had the default.
  bool omitted_at_default = false;
};
const std::vector<ConfigKey>& config_keys();
/// Whether `key` is part of the canonical text and of a checkpoint's stored config for `cfg`:
/// always, except a key omitted_at_default that holds its default value.
bool is_recorded(const ConfigKey& key, const TrainConfig& cfg);
/// Every recorded key (is_recorded) as "name=value" lines, in table order: the canonical text
/// of a config.
std::string canonical_config(const TrainConfig& cfg);
/// Stable 64-bit hash (FNV-1a) of canonical_config(cfg).
std::uint64_t config_hash(const TrainConfig& cfg);
/// Collective over `comm`: compares the hash of `cfg` on every rank (one allreduce). If they
/// differ, every rank throws examoe::Error naming, per differing rank, the keys whose values
/// differ from rank 0's. Called by train() before any other collective.
void check_same_config(const TrainConfig& cfg, MPI_Comm comm);
/// The same over an existing communicator.
void check_same_config(const TrainConfig& cfg, Communicator& comm);

/// Parses a memory size: "8GiB", "512MiB", "1.5GB", "4G" (binary), "2e9" (bytes). Returns
/// false for anything else (including negative or non-finite sizes).
bool parse_memory_size(const std::string& text, std::size_t& bytes);
/// What `train.memory_limit` allows per rank, in bytes, on this rank (0 = no limit), and how
/// that was found (for messages). Collective over `comm` for "auto" (ranks per node).
std::size_t memory_limit_bytes(const std::string& setting, MPI_Comm comm, std::string* how = nullptr);
/// Applies a JSON object (nested {"model": {"d_model": 64}} or flat {"model.d_model": 64}).
/// Unknown keys are errors naming the closest valid key.
void apply_json_config(TrainConfig& cfg, const std::string& json_text, const std::string& source);
std::string closest_key(const std::string& name);

struct EvalResult {
  double loss = 0;          ///< mean cross-entropy per target (nats)
  double accuracy = -1;     ///< exact-match accuracy on held-out problems, -1 if none
  long long targets = 0;
};

struct TrainResult {
  long long first_step = 0;    ///< 0, or the step a resumed run started from
  long long last_step = 0;     ///< steps done when training stopped
  bool stopped_by_signal = false;
  std::string last_checkpoint; ///< path of the newest checkpoint written, if any
  std::vector<double> losses;  ///< total loss (CE + aux + z) of every step run
  int migrations = 0;          ///< placement changes applied (all layers)
  std::vector<double> imbalance_before, imbalance_after;  ///< of the EMA load, per migration
  std::vector<double> ce;      ///< cross-entropy part of every step
  long long skipped_steps = 0;        ///< steps whose update was skipped (non-finite values)
  std::vector<long long> skipped;     ///< their numbers (1-based, as in the progress lines)
  bool stopped_nonfinite = false;     ///< stopped on a non-finite step (train.nonfinite=stop
                                      ///< or train.max_skipped); the checkpoint holds the last
                                      ///< good state
  std::string stop_message;           ///< why training stopped early, for people ("" if it did not)
  EvalResult initial, final;
  double unigram_entropy = 0;
  double seconds = 0, tokens_per_second = 0;
  /// log.step_phases: rank 0's seconds per phase summed over the steps run, and the steps' own
  /// time (step_phase_other_s: the part of it outside every phase).
  bool has_step_phases = false;
  StepPhaseSeconds step_phase_s{};
  double step_phase_other_s = 0, step_seconds = 0;
  MemoryReport memory;
};

/// Runs the model of checkpoint `ckpt` forward over the token sequences of the HDF5 file
/// `input` (dataset "tokens", int [N][seq_len], ids in [0, V), V = model.vocab_size; optional
/// "targets" of the same shape, -1 = none) and writes "logits" (float [N][seq_len][V]) to `output`, so results can
/// be compared with another framework. Collective over `comm` (any size that `ep` divides).
/// Returns the mean cross-entropy over the given targets (0 if none).
double eval_file(const std::string& ckpt, const std::string& input, const std::string& output, int ep,
                 MPI_Comm comm, std::ostream* out);

/// Trains with `cfg` on `comm` (any size that cfg.parallel.ep divides). Rank 0 writes
/// progress to `out` (may be null). Collective; errors are examoe::Error on every rank.
TrainResult train(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out);

}  // namespace examoe
