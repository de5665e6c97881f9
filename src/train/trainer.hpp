#pragma once
// The training loop as a component: Trainer<S> owns the mesh, the data, the model, the
// optimizer, the checkpoint directory and the run log, and keeps the loop's state (cumulative
// tokens and load average per expert, placement history, skipped steps, timing) as members.
// One step is a list of calls: forward_backward, update_or_skip, rebalance, report, checkpoint.
// Private to src/train; examoe::train() is `Trainer<S>(cfg, comm, out).run()`.
#include "train/run_log.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/mesh.hpp>
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <nlohmann/json.hpp>

#include <mpi.h>

#include <chrono>
#include <csignal>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace examoe::impl {

/// SIGTERM / SIGUSR1 (what Slurm sends before a time limit) ask for a checkpoint and a clean
/// stop at the end of the current step, while an object of this type lives. Installed after
/// MPI_Init, so they replace MPICH's own SIGUSR1 handler; the previous handlers come back after.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  /// Whether a stop signal arrived on this rank.
  static bool seen();

 private:
  struct sigaction old_term_ {}, old_usr1_ {};
};

template <class S>
class Trainer {
 public:
  /// Builds everything a run needs, collectively over `comm` (errors on every rank): the mesh,
  /// the data (checked and counted in the memory check before it is read), the checkpoint
  /// directory (locked), the model and optimizer, the metrics file. `cfg` must be valid (see
  /// train()) and outlive the trainer. Rank 0 writes to `out` (may be null).
  Trainer(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out);

  /// The banner, the resumed checkpoint (checkpoint.resume) and the evaluation before training.
  void start();
  /// Whether the run is over: train.steps reached, or stopped (a signal, non-finite steps).
  bool finished() const { return stopped_ || next_step_ >= cfg_.train.steps; }
  /// One optimizer step (or a skipped one), its report and checkpoint. Collective.
  void step();
  /// The checkpoint of a 0-step run, the summary line and record; the run's result.
  TrainResult finish();
  /// start(), step() until finished(), finish().
  TrainResult run();

  /// The steps done so far (the next step's 0-based number).
  long long steps_done() const { return next_step_; }
  const TrainResult& result() const { return res_; }

 private:
  using Clock = std::chrono::steady_clock;
  using Vector = typename AdamW<S>::vector;
  /// One step's forward and backward, reduced over the world.
  struct StepSums {
    StepStats stats;
    long long global_valid = 0;  ///< targets of this step on all ranks
    /// [grad norm^2 | CE sum | stop signal seen on any rank | ranks that saw NaN/Inf]
    double sums[4] = {0, 0, 0, 0};
  };

  void resume();
  void adopt_saved_placement(const CheckpointInfo& head);
  void restore_loads(const CheckpointInfo& info);
  StepSums forward_backward(int step);
  /// Adds this step's phases (step_phase_s_, step_s_) to the run's (log.step_phases).
  void add_step_phases();
  void inject_faults(StepStats& st);
  void reduce_norm_and_flags(StepSums& r);
  /// The update of a finite step, or the non-finite policy (train.nonfinite, train.max_skipped).
  /// Returns false when the run stops here.
  bool update_or_skip(int step, const StepSums& r, double lr, double scale);
  void accumulate_loads();
  void stop_nonfinite(int step, const StepSums& r, const std::string& what);
  void rebalance(long long step_done);
  /// Moves layer l's experts (weights and AdamW moments) to `np`; returns the old owners.
  std::vector<int> move_layer(int l, const Placement& np);
  /// The progress line and metrics record when due; returns this step's validation (if run).
  EvalResult report(int step, const StepSums& r, double loss, double ce, double lr, double gnorm);
  void write_checkpoint(long long step_done);
  EvalResult evaluate();

  const TrainConfig& cfg_;
  Mesh mesh_;
  std::ostream* out_ = nullptr;  ///< rank 0's output, null elsewhere
  std::unique_ptr<Corpus> corpus_;
  RunCheckpoints ckdir_;
  Model<S> model_;
  AdamW<S> opt_;
  std::vector<Vector> expert_grads_;  ///< for the global norm, in parameter-table order
  TrainResult res_;
  StopSignals signals_;
  RunLog log_;
  /// Cumulative tokens per expert, [layer][expert] (global counts, identical on every rank).
  std::vector<std::vector<long long>> tokens_cum_;
  /// Dynamic expert placement: greedy LPT on the EMA of the tokens each expert received;
  /// weights and AdamW moments move with their expert. Outputs do not depend on placement.
  std::vector<std::vector<double>> load_ema_;
  bool have_ema_ = false;  ///< load_ema_ holds an average (from training or a checkpoint)
  nlohmann::json placement_history_ = nlohmann::json::array();
  int first_ = 0, count_ = 0;  ///< this rank's sequences of every batch
  long long start_step_ = 0;
  std::string resumed_from_;
  int next_step_ = 0;
  bool stopped_ = false;
  int skipped_in_a_row_ = 0;
  Batch batch_;
  std::vector<Batch> micro_;  ///< train.micro_batches > 1: this rank's share in micro-batches
  Clock::time_point t_start_, t_interval_;
  StepPhaseSeconds step_phase_s_{};  ///< this step's time per phase (log.step_phases)
  double step_s_ = 0;                ///< this step's time: forward_backward and update_or_skip
  double interval_tokens_ = 0;
};

extern template class Trainer<float>;
extern template class Trainer<double>;

}  // namespace examoe::impl
