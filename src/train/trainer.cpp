// The training loop: data sharded over all ranks, FSDP + expert parallelism, AdamW with global
// norm clipping and warmup + cosine schedule, the non-finite policy, expert rebalancing,
// validation, checkpoints; train() checks the config and runs a Trainer.
#include "train/trainer.hpp"

#include "train/resources.hpp"
#include "train/setup.hpp"
#include "train/token_file.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/watchdog.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace examoe {
namespace impl {

namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void examoe_on_signal(int sig) { g_stop_signal = sig; }
}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = examoe_on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, &old_term_);
  sigaction(SIGUSR1, &sa, &old_usr1_);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
}

bool StopSignals::seen() { return g_stop_signal != 0; }

namespace {

/// Mean cross-entropy from the reduced sum (NaN/Inf pass through).
double ce_or_nan(double ce_sum, long long gvalid) {
  return gvalid > 0 ? ce_sum / static_cast<double>(gvalid) : (std::isfinite(ce_sum) ? 0.0 : ce_sum);
}

/// Every rank of an expert-parallel group holds at least one expert (not collective: the
/// same verdict on every rank).
Mesh& check_experts_fit(Mesh& mesh, const TrainConfig& cfg) {
  if (cfg.model.num_experts < mesh.ep_size())
    throw Error("examoe::train: model.num_experts (" + std::to_string(cfg.model.num_experts) +
                ") must be at least the expert-parallel size ep = " + std::to_string(mesh.ep_size()) +
                " (every rank of an expert-parallel group holds at least one expert; set parallel.ep)");
  return mesh;
}

/// The training data, checked on every rank: errors (a missing file, one that is not a
/// regular file, too short, a bad token-file header, ...) are agreed before anything else; a
/// byte file read whole is measured and counted in the memory check (with the batch and
/// validation set it gives) before it is read, so a 50 GB file is refused in a moment instead
/// of being read by every rank; token files are read in pieces as batches need them and not
/// counted.
/// Last, every token id is checked against model.vocab_size (docs/data.md).
template <class S>
std::unique_ptr<Corpus> make_corpus(const TrainConfig& cfg, Mesh& mesh) {
  const int seq = cfg.model.seq_len;
  std::unique_ptr<Corpus> corpus;
  HeldData data;
  long long val = 0;
  bool whole = false;
  agree(mesh.world(), [&] {
    if (cfg.data.path.empty()) {
      corpus = std::make_unique<AdditionCorpus>(cfg.train.seed, cfg.data.digits, cfg.data.val_problems);
    } else if ((whole = data::reads_bytes_whole(cfg.data, cfg.model.vocab))) {
      data.bytes = FileCorpus::file_size(cfg.data.path);
      data.what = "the data file '" + clip_for_message(cfg.data.path) + "'";
      val = FileCorpus::val_sequences(data.bytes, cfg.data.val_fraction, seq);
      return;
    } else {
      corpus = data::open_token_corpus(cfg.data, cfg.train.seed, cfg.model.vocab);
    }
    corpus->check(seq);
    val = corpus->num_val_sequences(seq);
  });
  // The most tokens a rank holds at once: one micro-batch of its share of a training batch
  // (the whole share without accumulation), or its share of the validation set (evaluated in
  // one pass).
  const long long W = mesh.world_size();
  const long long train_rows = (cfg.train.batch + W - 1) / W / cfg.train.micro_batches;
  check_memory(cfg, mesh, std::max(train_rows, (val + W - 1) / W) * seq, sizeof(S), data);
  if (whole)
    agree(mesh.world(), [&] {
      corpus = std::make_unique<FileCorpus>(cfg.data.path, cfg.train.seed, cfg.data.val_fraction);
      corpus->check(seq);
    });
  corpus->check_vocab(mesh.world(), cfg.model.vocab);
  return corpus;
}

/// A checkpoint past train.steps cannot be resumed to train.steps: an error on every rank
/// (silently running 0 steps would hide a wrong --train.steps or checkpoint). One exactly at
/// train.steps is a finished run: it says so and runs no step (a requeued job that finds its
/// work done succeeds).
void check_resume_step(long long step, const std::string& path, const TrainConfig& cfg, Communicator& world,
                       std::ostream* log) {
  agree(world, [&] {
    if (step > cfg.train.steps)
      throw Error("examoe::train: checkpoint '" + clip_for_message(path) + "' is at step " + std::to_string(step) +
                  ", past train.steps = " + std::to_string(cfg.train.steps) +
                  ": there is nothing to resume (raise --train.steps above " + std::to_string(step) +
                  " to train on, or resume an earlier checkpoint)");
  });
  if (step == cfg.train.steps && log)
    *log << "examoe train: checkpoint " << path << " is at step " << step << " = train.steps: training is already "
         << "complete, no step to run (raise --train.steps to train on)" << std::endl;
}

}  // namespace

template <class S>
Trainer<S>::Trainer(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out)
    : cfg_(cfg),
      mesh_(comm, cfg.parallel.ep, cfg.parallel.comm_options()),
      out_(mesh_.world_rank() == 0 ? out : nullptr),
      corpus_(make_corpus<S>(cfg, check_experts_fit(mesh_, cfg))),
      // The checkpoint directory: refuses a new run beside other checkpoints, takes its lock
      // (docs/checkpoint-format.md, "The checkpoint directory"); released with the trainer.
      ckdir_(cfg.checkpoint, mesh_.world(), out_),
      model_(cfg.model, cfg.parallel, mesh_, cfg.train.seed),
      opt_(adamw_config(cfg)),
      expert_grads_(register_parameters(model_, opt_)),
      log_(cfg, mesh_.world(), out),
      tokens_cum_(model_.n_layers(), std::vector<long long>(cfg.model.num_experts, 0)),
      load_ema_(model_.n_layers(), std::vector<double>(cfg.model.num_experts, 0.0)) {
  res_.unigram_entropy = corpus_->unigram_entropy();
  res_.has_step_phases = cfg.log.step_phases;
  model_.set_phase_timing(cfg.log.step_phases);
  const auto share = split(cfg_.train.batch, mesh_.world_size(), mesh_.world_rank());
  first_ = share.first;
  count_ = share.second;
}

template <class S>
TrainResult Trainer<S>::run() {
  start();
  while (!finished()) step();
  return finish();
}

template <class S>
void Trainer<S>::start() {
  if (std::ostream* o = log_.verbose()) write_banner(*o, cfg_, mesh_, corpus_->describe());
  if (!cfg_.checkpoint.resume.empty()) resume();
  res_.first_step = start_step_;
  next_step_ = static_cast<int>(start_step_);
  res_.initial = evaluate();
  if (std::ostream* o = log_.verbose()) {
    write_memory(*o, model_.memory(), sizeof(S), cfg_.parallel.activation_checkpointing);
    write_initial(*o, res_.initial, res_.unigram_entropy);
  }
  t_start_ = Clock::now();
  t_interval_ = t_start_;
}

template <class S>
void Trainer<S>::resume() {
  CollectiveLabel label("checkpoint.resume");
  // "latest": temporary files of interrupted writes are never taken; removed with a note.
  const std::string path = ckdir_.resolve_resume(cfg_.checkpoint.resume);
  resumed_from_ = path;
  {
    const CheckpointInfo head = read_checkpoint_info(path, mesh_.world().mpi_comm());
    check_resume_step(head.step, path, cfg_, mesh_.world(), out_);
    adopt_saved_placement(head);
  }
  const CheckpointInfo info = load_checkpoint(path, model_, opt_, cfg_);
  ckdir_.adopt_run_id(info.run_id);  // the run goes on; its checkpoints are pruned as one
  start_step_ = info.step;
  restore_loads(info);
  if (std::ostream* o = log_.verbose())
    *o << "  resumed from " << path << " at step " << start_step_ << " (written by " << info.world_size
       << " ranks, dp " << info.dp << " x ep " << info.ep << ")\n";
}

template <class S>
void Trainer<S>::adopt_saved_placement(const CheckpointInfo& head) {
  // Same expert-parallel size: take over the saved placement (other sizes rebalance anew).
  // (A table of another shape belongs to another model: load_checkpoint names the
  // difference.)
  bool same_shape = static_cast<int>(head.placement.size()) == model_.n_layers();
  for (const auto& row : head.placement) same_shape = same_shape && static_cast<int>(row.size()) == cfg_.model.num_experts;
  if (head.ep == mesh_.ep_size() && same_shape)
    for (int l = 0; l < model_.n_layers(); ++l) {
      const Placement saved = Placement::from_owners(head.placement[l], mesh_.ep_size());
      if (saved != model_.moe(l).placement()) move_layer(l, saved);
    }
  try {
    placement_history_ = nlohmann::json::parse(head.placement_history);
  } catch (const std::exception&) {
    placement_history_ = nlohmann::json::array();
  }
  if (!placement_history_.is_array()) placement_history_ = nlohmann::json::array();  // history only
}

template <class S>
void Trainer<S>::restore_loads(const CheckpointInfo& info) {
  const int L = model_.n_layers(), E = cfg_.model.num_experts;
  for (int l = 0; l < L && l < static_cast<int>(info.tokens_per_expert.size()); ++l)
    for (int e = 0; e < E && e < static_cast<int>(info.tokens_per_expert[l].size()); ++e)
      tokens_cum_[l][e] = info.tokens_per_expert[l][e];
  for (int l = 0; l < L && l < static_cast<int>(info.expert_load_ema.size()); ++l)
    for (int e = 0; e < E && e < static_cast<int>(info.expert_load_ema[l].size()); ++e)
      load_ema_[l][e] = info.expert_load_ema[l][e];
  have_ema_ = !info.expert_load_ema.empty();
}

template <class S>
void Trainer<S>::step() {
  if (finished()) return;
  const int step = next_step_;
  log_.set_step(step + 1);
  if (fault::armed()) fault::set_context(mesh_.world_rank(), step + 1);
  const auto t_step = Clock::now();
  const StepSums r = forward_backward(step);
  const auto t_update = Clock::now();
  const double gnorm = std::sqrt(r.sums[0]);
  const double scale = (cfg_.train.clip > 0 && gnorm > cfg_.train.clip) ? cfg_.train.clip / gnorm : 1.0;
  const double lr = lr_schedule(step, cfg_.train.steps, cfg_.train.warmup, cfg_.train.lr, cfg_.train.min_lr);
  const bool go_on = update_or_skip(step, r, lr, scale);
  if (cfg_.log.step_phases) {
    step_phase_s_[static_cast<int>(StepPhase::optimizer)] += std::chrono::duration<double>(Clock::now() - t_update).count();
    step_s_ = std::chrono::duration<double>(Clock::now() - t_step).count();
    add_step_phases();
  }
  if (!go_on) {
    ++next_step_;
    stopped_ = true;
    return;
  }
  if (cfg_.placement.rebalance_interval > 0 && (step + 1) % cfg_.placement.rebalance_interval == 0)
    rebalance(step + 1);
  const double ce = ce_or_nan(r.sums[1], r.global_valid);
  const double loss = ce + r.stats.aux + r.stats.z;
  res_.losses.push_back(loss);
  res_.ce.push_back(ce);
  interval_tokens_ += static_cast<double>(cfg_.train.batch) * cfg_.model.seq_len;
  const EvalResult ev = report(step, r, loss, ce, lr, gnorm);
  const bool last = step + 1 == cfg_.train.steps;
  res_.last_step = step + 1;
  const bool stop = r.sums[2] > 0;
  if ((cfg_.checkpoint.interval > 0 && (step + 1) % cfg_.checkpoint.interval == 0) || stop)
    write_checkpoint(step + 1);
  if (last) res_.final = ev;
  ++next_step_;
  if (stop && !last) {
    if (out_) *out_ << "stopping at step " << step + 1 << " on a signal; resume with --resume latest\n";
    res_.stopped_by_signal = true;
    res_.final = evaluate();
    stopped_ = true;
  }
}

template <class S>
typename Trainer<S>::StepSums Trainer<S>::forward_backward(int step) {
  const int seq = cfg_.model.seq_len;
  const auto t_data = Clock::now();
  const int M = cfg_.train.micro_batches;
  if (M == 1) {
    corpus_->train_batch(static_cast<std::uint64_t>(step), first_, count_, seq, batch_);
  } else {  // gradient accumulation: the share's sequences in M consecutive micro-batches
    micro_.resize(M);
    for (int m = 0; m < M; ++m)
      corpus_->train_batch(static_cast<std::uint64_t>(step), first_ + m * (count_ / M), count_ / M, seq, micro_[m]);
  }
  StepSums r;
  long long valid = 0;
  auto count_valid = [&valid](const Batch& b) {
    for (int t : b.targets) valid += t >= 0 ? 1 : 0;
  };
  if (M == 1) count_valid(batch_);
  for (int m = 0; M > 1 && m < M; ++m) count_valid(micro_[m]);
  r.global_valid = valid;
  {
    CollectiveLabel label("train.count_targets");
    mesh_.world().allreduce_sum(&r.global_valid, 1, DataType::i64);
  }
  const double data_s = std::chrono::duration<double>(Clock::now() - t_data).count();
  r.stats = M == 1 ? model_.forward_backward(batch_, r.global_valid, static_cast<std::uint64_t>(step))
                   : model_.forward_backward_accumulated(micro_, r.global_valid, static_cast<std::uint64_t>(step));
  step_phase_s_ = model_.phase_seconds();  // before validation times its own forward
  step_phase_s_[static_cast<int>(StepPhase::data)] += data_s;
  if (fault::armed()) inject_faults(r.stats);  // fault injection (docs/faults.md)
  const auto t_norm = Clock::now();
  reduce_norm_and_flags(r);
  step_phase_s_[static_cast<int>(StepPhase::optimizer)] = std::chrono::duration<double>(Clock::now() - t_norm).count();
  return r;
}

template <class S>
void Trainer<S>::add_step_phases() {
  double in_phases = 0;
  for (int i = 0; i < kNumStepPhases; ++i) {
    res_.step_phase_s[i] += step_phase_s_[i];
    in_phases += step_phase_s_[i];
  }
  res_.step_phase_other_s += std::max(0.0, step_s_ - in_phases);
  res_.step_seconds += step_s_;
}

template <class S>
void Trainer<S>::inject_faults(StepStats& st) {
  auto& F = model_.fsdp();
  fault::at_step();
  double v = 0;
  if (fault::poison("loss", v)) st.ce_sum = v;
  if (fault::poison("grad", v)) {
    for (int u = 0; u < F.num_units(); ++u)
      if (F.shard_numel(u) > 0) {
        Kokkos::deep_copy(Kokkos::subview(F.shard_grad(u), 0), static_cast<S>(v));
        break;
      }
  }
}

template <class S>
void Trainer<S>::reduce_norm_and_flags(StepSums& r) {
  // Global gradient norm over every shard and every expert (experts counted once: on the
  // first replica of each expert-parallel group), and the agreement on a non-finite step.
  auto& F = model_.fsdp();
  const StepStats& st = r.stats;
  double* sq = r.sums;
  sq[0] = 0;
  sq[1] = st.ce_sum;
  sq[2] = StopSignals::seen() ? 1.0 : 0.0;
  sq[3] = 0;
  for (int u = 0; u < F.num_units(); ++u) sq[0] += sum_squares(Vector(F.shard_grad(u).data(), F.shard_numel(u)));
  if (mesh_.dp_rank() == 0)
    for (const auto& g : expert_grads_) sq[0] += sum_squares(g);
  // Any NaN/Inf in this rank's gradients shows in its sum of squares (expert gradients of
  // other replicas equal the first replica's after their allreduce); aux and z are global.
  sq[3] = std::isfinite(sq[0]) && std::isfinite(st.ce_sum) && std::isfinite(st.aux) && std::isfinite(st.z) ? 0.0 : 1.0;
  CollectiveLabel label("optimizer.clip");
  mesh_.world().allreduce_sum(sq, 4, DataType::f64);
}

template <class S>
bool Trainer<S>::update_or_skip(int step, const StepSums& r, double lr, double scale) {
  const double* sq = r.sums;
  const StepStats& st = r.stats;
  // Identical on every rank: all decide from the same reduced values.
  const bool nonfinite = sq[3] > 0 || !std::isfinite(sq[0]) || !std::isfinite(sq[1]);
  if (!nonfinite) {
    skipped_in_a_row_ = 0;
    opt_.step(lr, scale);
    for (int l = 0; l < model_.n_layers(); ++l) model_.moe(l).update_router_bias();
    accumulate_loads();
    return true;
  }
  // Skipped: no update of weights, AdamW moments or step count, nor of the expert loads or
  // the router's selection bias.
  for (int l = 0; l < model_.n_layers(); ++l) model_.moe(l).discard_router_loads();
  ++skipped_in_a_row_;
  ++res_.skipped_steps;
  res_.skipped.push_back(step + 1);
  const bool loss_bad = !std::isfinite(sq[1]) || !std::isfinite(st.aux) || !std::isfinite(st.z);
  const bool grad_bad = !std::isfinite(sq[0]);
  const std::string what = loss_bad && grad_bad ? "loss and gradient" : loss_bad ? "loss" : "gradient";
  const bool stop_now = cfg_.train.nonfinite == NonfinitePolicy::stop || skipped_in_a_row_ >= cfg_.train.max_skipped;
  if (out_)
    *out_ << "  step " << step + 1 << ": non-finite " << what << " (seen on " << static_cast<int>(sq[3]) << " of "
          << mesh_.world_size() << " ranks); update skipped (" << res_.skipped_steps << " skipped, "
          << skipped_in_a_row_ << " in a row)" << (stop_now ? "; stopping" : "") << std::endl;
  if (log_.metrics()) {
    nlohmann::json j;
    j["step"] = step + 1;
    j["nonfinite"] = what;
    j["ranks"] = static_cast<int>(sq[3]);
    j["skipped"] = res_.skipped_steps;
    j["skipped_in_a_row"] = skipped_in_a_row_;
    j["action"] = stop_now ? "stop" : "skip";
    log_.emit(j);
  }
  if (!stop_now) return true;
  stop_nonfinite(step, r, what);
  return false;
}

template <class S>
void Trainer<S>::accumulate_loads() {
  for (int l = 0; l < model_.n_layers(); ++l)  // before validation overwrites the stats
    for (int e = 0; e < cfg_.model.num_experts; ++e) {
      const double t = static_cast<double>(model_.layer_stats(l).tokens_per_expert[e]);
      tokens_cum_[l][e] += model_.layer_stats(l).tokens_per_expert[e];
      load_ema_[l][e] = !have_ema_ ? t : cfg_.placement.ema * load_ema_[l][e] + (1 - cfg_.placement.ema) * t;
    }
  have_ema_ = true;
}

template <class S>
void Trainer<S>::stop_nonfinite(int step, const StepSums& r, const std::string& what) {
  // The weights and optimizer state are those of the last good step; the checkpoint carries
  // this step's number, so a resumed run goes on with the next batch. Unless they are not
  // finite themselves (an earlier update overflowed): nothing is written.
  const std::string bad_state = find_bad_checkpoint_state(model_, opt_);
  if (bad_state.empty()) write_checkpoint(step + 1);
  const double ce = ce_or_nan(r.sums[1], r.global_valid);
  res_.losses.push_back(ce + r.stats.aux + r.stats.z);
  res_.ce.push_back(ce);
  res_.last_step = step + 1;
  res_.stopped_nonfinite = true;
  const std::string why =
      cfg_.train.nonfinite == NonfinitePolicy::stop
          ? std::string(" (train.nonfinite = stop)")
          : " in " + std::to_string(skipped_in_a_row_) + " steps in a row (train.max_skipped = " +
                std::to_string(cfg_.train.max_skipped) + ")";
  const std::string where =
      bad_state.empty() ? "; the last good weights and optimizer state are in " + res_.last_checkpoint +
                              " (resume with --resume latest; it goes on after this step)"
                        : invalid_state_note(bad_state, res_.last_checkpoint.empty() ? resumed_from_ : res_.last_checkpoint);
  res_.stop_message = "training stopped at step " + std::to_string(step + 1) + ": non-finite " + what + why + where;
  if (out_) *out_ << "examoe: " << res_.stop_message << std::endl;
  res_.final = evaluate();
}

template <class S>
std::vector<int> Trainer<S>::move_layer(int l, const Placement& np) {
  auto& m = model_.moe(l);
  std::vector<int> old_owner = m.placement().owners();
  std::vector<int> slots;
  for (ExpertTensor t : m.expert_tensors()) slots.push_back(model_.param_slot(l, t));
  std::vector<typename MoELayer<S>::flat_vector> state;
  for (int i : slots) {
    state.push_back(opt_.m(i));
    state.push_back(opt_.v(i));
  }
  m.set_placement(np, state);
  for (std::size_t t = 0; t < slots.size(); ++t) {
    const int i = slots[t];
    opt_.rebind(i, model_.param_values(i), model_.param_grads(i), state[2 * t], state[2 * t + 1]);
    expert_grads_[l * slots.size() + t] = model_.param_grads(i);
  }
  return old_owner;
}

template <class S>
void Trainer<S>::rebalance(long long step_done) {
  for (int l = 0; l < model_.n_layers(); ++l) {
    auto& m = model_.moe(l);
    const Placement np = Placement::rebalance_lpt(load_ema_[l], mesh_.ep_size());
    if (np == m.placement()) continue;
    const double before = m.placement().imbalance(load_ema_[l]), after = np.imbalance(load_ema_[l]);
    const std::vector<int> old_owner = move_layer(l, np);
    ++res_.migrations;
    res_.imbalance_before.push_back(before);
    res_.imbalance_after.push_back(after);
    nlohmann::json j;
    j["migration"] = true;
    j["step"] = step_done;
    j["layer"] = l;
    j["imbalance_before"] = before;
    j["imbalance_after"] = after;
    nlohmann::json moved = nlohmann::json::array();
    for (int e = 0; e < cfg_.model.num_experts; ++e)
      if (old_owner[e] != np.owner(e)) moved.push_back({{"expert", e}, {"from", old_owner[e]}, {"to", np.owner(e)}});
    j["moved"] = moved;
    j["placement"] = np.owners();
    placement_history_.push_back(j);
    // (Printed with the stream's precision as the lines before left it, as it always was.)
    if (std::ostream* o = log_.verbose())
      *o << "  rebalanced layer " << l << " at step " << step_done << ": imbalance " << before << " -> " << after
         << " (" << moved.size() << " experts moved)\n";
    log_.emit(j);
  }
}

template <class S>
EvalResult Trainer<S>::report(int step, const StepSums& r, double loss, double ce, double lr, double gnorm) {
  const bool last = step + 1 == cfg_.train.steps;
  const bool do_log = (step + 1) % cfg_.log.interval == 0 || last;
  const bool do_eval = (step + 1) % cfg_.log.eval_interval == 0 || last;
  EvalResult ev;
  if (!do_log && !do_eval) return ev;
  ProgressPoint p;
  // Load statistics of this training step, every layer (before validation overwrites them).
  for (int l = 0; l < model_.n_layers(); ++l) {
    const LayerStats& ls = model_.layer_stats(l);
    p.imbalance = std::max(p.imbalance, ls.imbalance);
    p.bytes_moved += ls.bytes_sent_dispatch + ls.bytes_sent_combine;
    for (int i = 0; i < kNumPhases; ++i) p.phase_s[i] += ls.seconds[i];
    p.tokens_per_expert.push_back(ls.tokens_per_expert);
    if (cfg_.model.router.bias_rate > 0) p.router_bias.push_back(model_.moe(l).router_bias());
    if (cfg_.model.router.topk_groups > 0) p.max_ranks_per_token = std::max<long long>(p.max_ranks_per_token, ls.max_ranks_per_token);
    if (cfg_.model.capacity_factor > 0) p.dropped_per_expert.push_back(ls.dropped_per_expert);
  }
  if (do_eval) ev = evaluate();
  {
    CollectiveLabel label("train.metrics");
    mesh_.world().allreduce_sum(&p.bytes_moved, 1, DataType::i64);
  }
  const double now = std::chrono::duration<double>(Clock::now() - t_start_).count();
  const double dt = std::chrono::duration<double>(Clock::now() - t_interval_).count();
  const double done = static_cast<double>(step + 1 - start_step_);
  p.step = step + 1;
  p.steps = cfg_.train.steps;
  p.loss = loss;
  p.ce = ce;
  p.aux = r.stats.aux;
  p.z = r.stats.z;
  p.lr = lr;
  p.grad_norm = gnorm;
  p.tokens_per_s = dt > 0 ? interval_tokens_ / dt : 0.0;
  p.eta_s = done > 0 ? now / done * (cfg_.train.steps - step - 1) : 0.0;
  p.skipped = res_.skipped_steps;
  p.evaluated = do_eval;
  p.val = ev;
  p.has_step_phases = cfg_.log.step_phases;
  p.step_phase_s = step_phase_s_;
  p.step_s = step_s_;
  t_interval_ = Clock::now();
  interval_tokens_ = 0;
  if (std::ostream* o = log_.verbose(); o && do_log) write_progress(*o, p);
  if (log_.metrics()) {
    p.peak_rss = peak_rss_bytes();
    log_.emit(progress_record(p));
  }
  log_.agree_metrics();
  return ev;
}

template <class S>
void Trainer<S>::write_checkpoint(long long step_done) {
  CollectiveLabel label("checkpoint.write");
  const std::string path = ckdir_.prepare_write(step_done);
  const auto t0 = Clock::now();
  save_checkpoint(path, model_, opt_, cfg_, step_done, tokens_cum_, placement_history_.dump(), load_ema_,
                  ckdir_.run_id());
  ckdir_.after_write();
  res_.last_checkpoint = path;
  if (std::ostream* o = log_.verbose())
    *o << "  checkpoint " << path << " written in " << std::chrono::duration<double>(Clock::now() - t0).count()
       << " s\n";
}

template <class S>
EvalResult Trainer<S>::evaluate() {
  CollectiveLabel label("train.eval");
  const int seq = cfg_.model.seq_len;
  const int nseq = corpus_->num_val_sequences(seq);
  const auto share = split(nseq, mesh_.world_size(), mesh_.world_rank());
  Batch b;
  corpus_->val_batch(share.first, share.second, seq, b);
  std::vector<int> correct;
  StepStats st = model_.evaluate(b, &correct);
  const int np = corpus_->num_val_problems();
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
  mesh_.world().allreduce_sum(red.data(), red.size(), DataType::f64);
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

template <class S>
TrainResult Trainer<S>::finish() {
  if (res_.last_step == 0) res_.last_step = start_step_;
  if (start_step_ >= cfg_.train.steps) res_.final = res_.initial;
  // A run of 0 steps with checkpoints on writes the initial model (step-00000000.h5).
  if (cfg_.train.steps == 0 && start_step_ == 0 && cfg_.checkpoint.interval > 0) write_checkpoint(0);
  res_.seconds = std::chrono::duration<double>(Clock::now() - t_start_).count();
  res_.tokens_per_second = res_.seconds > 0 ? static_cast<double>(cfg_.train.batch) * cfg_.model.seq_len *
                                                  (res_.last_step - start_step_) / res_.seconds
                                            : 0;
  res_.memory = model_.memory();
  if (std::ostream* o = log_.verbose()) write_step_phases(*o, res_);
  if (out_) write_summary(*out_, res_, corpus_->num_val_problems(), peak_rss_bytes());
  if (log_.metrics()) log_.emit(summary_record(res_, cfg_.train.steps));
  log_.agree_metrics();
  return res_;
}

template class Trainer<float>;
template class Trainer<double>;

namespace {
/// Every rank's share of train.batch divides into train.micro_batches (computed for all ranks
/// on each: the same error everywhere, no collective).
void check_micro_batches(const TrainConfig& cfg, int P) {
  const int M = cfg.train.micro_batches;
  for (int r = 0; r < P && M > 1; ++r) {
    const int share = split(cfg.train.batch, P, r).second;
    if (share % M != 0)
      throw Error("examoe::train: train.micro_batches = " + std::to_string(M) + " must divide every rank's share of " +
                  "train.batch = " + std::to_string(cfg.train.batch) + " sequences over " + std::to_string(P) +
                  " ranks, but rank " + std::to_string(r) + " holds " + std::to_string(share) +
                  " (set train.batch to a multiple of " + std::to_string(M * P) +
                  " = micro_batches x ranks, or a train.micro_batches that divides each share)");
  }
}

/// Before any collective whose shape depends on the config: the config is the same on every
/// rank, valid, its ep divides the world; fault injection (EXAMOE_FAULT) is armed. Errors on
/// every rank.
void check_run(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out) {
  auto c = make_mpi_communicator(comm);
  check_same_config(cfg, *c);
  // The same config everywhere: validation errors are identical on every rank.
  agree(*c, [&] { cfg.validate(); });
  const int P = c->size(), ep = cfg.parallel.ep;
  if (ep > 0 && (ep > P || P % ep != 0))
    throw Error("examoe::train: parallel.ep = " + std::to_string(ep) + " must divide the world size " +
                std::to_string(P) + " (world = dp x ep; parallel.ep = 0 means the whole world)");
  check_micro_batches(cfg, P);
  // Fault injection (tests of the fault handling): EXAMOE_FAULT, read once per run.
  try {
    agree(*c, [&] {
      const std::string spec = fault::arm_from_env();
      fault::check_reachable(P, cfg.train.steps);
      if (!spec.empty() && c->rank() == 0 && out) *out << "examoe: fault injection armed: EXAMOE_FAULT=" << spec << "\n";
    });
  } catch (const Error&) {
    fault::disarm();
    throw;
  }
}
}  // namespace

}  // namespace impl

TrainResult train(const TrainConfig& cfg, MPI_Comm comm, std::ostream* out) {
  impl::check_run(cfg, comm, out);
  struct Disarm {
    ~Disarm() { impl::fault::disarm(); }
  } disarm;
  impl::ScopedWatchdogSeconds watchdog(cfg.parallel.watchdog_seconds);
  if (cfg.train.precision == "double") return impl::Trainer<double>(cfg, comm, out).run();
  return impl::Trainer<float>(cfg, comm, out).run();
}

}  // namespace examoe
