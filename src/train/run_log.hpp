#pragma once
// What a training run tells people and machines: the start banner, the memory line, one
// progress line every log.interval steps, the notes of the loop (rebalancing, checkpoints,
// skipped steps) and the summary on rank 0's stream; JSON lines in the log.metrics file.
// Private to src/train.
#include <examoe/comm.hpp>
#include <examoe/mesh.hpp>
#include <examoe/metrics.hpp>
#include <examoe/train.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

namespace examoe::impl {

/// "42s", "3m05s", "2h07m".
std::string human_time(double s);

/// The figures of one progress point (every log.interval or log.eval_interval steps).
struct ProgressPoint {
  long long step = 0;   ///< steps done (1-based, as printed)
  int steps = 0;        ///< train.steps
  double loss = 0, ce = 0, aux = 0, z = 0, lr = 0, grad_norm = 0;
  double tokens_per_s = 0, imbalance = 0, eta_s = 0;
  long long skipped = 0;      ///< steps skipped so far (non-finite)
  long long bytes_moved = 0;  ///< all-to-all bytes of this step, all ranks and layers
  std::size_t peak_rss = 0;
  std::vector<std::vector<std::int64_t>> tokens_per_expert;  ///< [layer][expert], this step
  std::vector<std::vector<double>> router_bias;  ///< [layer][expert] (router.bias_rate > 0; else empty)
  /// Group-limited routing (router.topk_groups > 0; else -1): the most ranks one of rank 0's
  /// tokens reached this step, over the layers.
  long long max_ranks_per_token = -1;
  /// With a capacity (model.capacity_factor > 0): the assignments each expert dropped,
  /// [layer][expert], this step; empty when dropless.
  std::vector<std::vector<std::int64_t>> dropped_per_expert;
  std::array<double, kNumPhases> phase_s{};                  ///< MoE time per phase, all layers
  bool has_step_phases = false;   ///< log.step_phases: the two below hold this step's
  StepPhaseSeconds step_phase_s{};  ///< rank 0's time per phase of the step
  double step_s = 0;              ///< the step's time (forward, backward, update)
  bool evaluated = false;  ///< `val` holds this step's validation
  EvalResult val;
};

/// Dropped assignments / all assignments of the step, over every layer (0 when dropless).
double dropped_fraction(const ProgressPoint& p);
/// "step  S/N | loss ... | ETA T" [+ " | dropped D%"] [+ " | skipped K"] [+ " | val L acc A%"],
/// then a newline.
void write_progress(std::ostream& os, const ProgressPoint& p);
/// The JSON line of a progress point.
nlohmann::json progress_record(const ProgressPoint& p);

/// "summary: N steps in T s (R tokens/s); val loss A -> B nats ...; peak RSS M", then a newline.
/// `val_problems`: the held-out problems the accuracy is over.
void write_summary(std::ostream& os, const TrainResult& r, int val_problems, std::size_t peak_rss);
/// "  step phases (rank 0, N steps, T s per step): moe 61.2 %, ..." (largest share first, then
/// `other`: the step's time outside every phase), then a newline; nothing without
/// r.has_step_phases or steps.
void write_step_phases(std::ostream& os, const TrainResult& r);
/// The JSON line of the summary (`steps`: train.steps).
nlohmann::json summary_record(const TrainResult& r, int steps);

/// The first two lines: ranks, mesh, space, backend, precision, data; the model and the batch.
void write_banner(std::ostream& os, const TrainConfig& cfg, const Mesh& mesh, const std::string& data);
/// "  memory per rank: ..." (the model's report, `scalar_bytes` per number).
void write_memory(std::ostream& os, const MemoryReport& mr, std::size_t scalar_bytes, bool checkpointing);
/// "  before training: val loss ..." (leaves the stream's precision as the lines after it
/// have always been printed with).
void write_initial(std::ostream& os, const EvalResult& ev, double unigram_entropy);

/// Rank 0's output (the people's log) and the metrics file of one run.
class RunLog {
 public:
  /// Opens log.metrics on rank 0 (refused when it is a checkpoint or an input); collective over
  /// `world`, the error agreed. `out`: where rank 0 writes (null: nowhere).
  RunLog(const TrainConfig& cfg, Communicator& world, std::ostream* out);
  /// Rank 0's output, null elsewhere: for what is printed even with log.quiet.
  std::ostream* out() const { return out_; }
  /// Rank 0's output unless log.quiet, null elsewhere.
  std::ostream* verbose() const { return quiet_ ? nullptr : out_; }
  bool metrics() const { return metrics_.is_open(); }
  /// The step the next JSON lines belong to (named in a write error).
  void set_step(long long step) { step_ = step; }
  /// Appends a JSON line (rank 0, when log.metrics is set). A failed write is kept, and no
  /// line is written after it, until agree_metrics().
  void emit(const nlohmann::json& j);
  /// Collective over the world (when log.metrics is set, the same on every rank): throws a
  /// failed metrics write on every rank (training stops rather than lose its records).
  void agree_metrics();

 private:
  const TrainConfig& cfg_;
  Communicator& world_;
  std::ostream* out_ = nullptr;
  bool quiet_ = false;
  std::ofstream metrics_;
  std::string metrics_err_;
  long long step_ = 0;
};

}  // namespace examoe::impl
