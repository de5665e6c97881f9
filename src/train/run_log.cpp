// The run's output: progress lines, the summary and the banner for people (rank 0), JSON lines
// for machines (log.metrics), and the policy on a failed metrics write (kept, then agreed at
// the next progress point, where every rank stops).
#include "train/run_log.hpp"

#include "train/resources.hpp"

#include <examoe/checkpoint_dir.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/watchdog.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iomanip>

namespace examoe::impl {

std::string human_time(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) / 60) % 60);
  return buf;
}

double dropped_fraction(const ProgressPoint& p) {
  double dropped = 0, all = 0;
  for (const auto& layer : p.dropped_per_expert)
    for (auto n : layer) dropped += static_cast<double>(n);
  for (const auto& layer : p.tokens_per_expert)
    for (auto n : layer) all += static_cast<double>(n);
  return all > 0 ? dropped / all : 0.0;
}

void write_progress(std::ostream& os, const ProgressPoint& p) {
  char line[256];
  std::snprintf(line, sizeof line,
                "step %*d/%d | loss %.4f | aux %.4f | lr %.2e | %.0f tok/s | imbalance %.2f | ETA %s",
                static_cast<int>(std::to_string(p.steps).size()), static_cast<int>(p.step), p.steps, p.loss, p.aux,
                p.lr, p.tokens_per_s, p.imbalance, human_time(p.eta_s).c_str());
  os << line;
  if (!p.dropped_per_expert.empty()) {
    std::snprintf(line, sizeof line, " | dropped %.1f%%", 100 * dropped_fraction(p));
    os << line;
  }
  if (p.skipped > 0) os << " | skipped " << p.skipped;
  if (p.evaluated) {
    std::snprintf(line, sizeof line, " | val %.4f", p.val.loss);
    os << line;
    if (p.val.accuracy >= 0) {
      std::snprintf(line, sizeof line, " acc %.1f%%", 100 * p.val.accuracy);
      os << line;
    }
  }
  os << std::endl;
}

nlohmann::json progress_record(const ProgressPoint& p) {
  nlohmann::json j;
  j["step"] = p.step;
  j["loss"] = p.loss;
  j["ce"] = p.ce;
  j["aux"] = p.aux;
  j["z"] = p.z;
  j["lr"] = p.lr;
  j["grad_norm"] = p.grad_norm;
  j["skipped"] = p.skipped;
  j["tokens_per_s"] = p.tokens_per_s;
  j["imbalance"] = p.imbalance;
  j["bytes_moved"] = p.bytes_moved;
  j["peak_rss_bytes"] = p.peak_rss;
  j["tokens_per_expert"] = p.tokens_per_expert;
  if (!p.router_bias.empty()) j["router_bias"] = p.router_bias;
  if (p.max_ranks_per_token >= 0) j["max_ranks_per_token"] = p.max_ranks_per_token;
  if (!p.dropped_per_expert.empty()) {
    j["dropped_per_expert"] = p.dropped_per_expert;
    j["dropped_fraction"] = dropped_fraction(p);
  }
  nlohmann::json phs;
  for (int i = 0; i < kNumPhases; ++i) phs[phase_name(static_cast<Phase>(i))] = p.phase_s[i];
  j["moe_phase_s"] = phs;
  if (p.has_step_phases) {
    nlohmann::json sp;
    double in_phases = 0;
    for (int i = 0; i < kNumStepPhases; ++i) {
      sp[step_phase_name(static_cast<StepPhase>(i))] = p.step_phase_s[i];
      in_phases += p.step_phase_s[i];
    }
    sp["other"] = std::max(0.0, p.step_s - in_phases);
    j["step_phase_s"] = sp;
    j["step_s"] = p.step_s;
  }
  if (p.evaluated) {
    j["val_loss"] = p.val.loss;
    if (p.val.accuracy >= 0) j["val_accuracy"] = p.val.accuracy;
  }
  return j;
}

void write_summary(std::ostream& os, const TrainResult& r, int val_problems, std::size_t peak_rss) {
  os << std::fixed << std::setprecision(4) << "summary: " << r.last_step - r.first_step << " steps in "
     << std::setprecision(1) << r.seconds << " s (" << std::setprecision(0) << r.tokens_per_second
     << " tokens/s); val loss " << std::setprecision(4) << r.initial.loss << " -> " << r.final.loss
     << " nats (unigram entropy " << r.unigram_entropy << ")";
  if (r.final.accuracy >= 0)
    os << "; exact match on " << val_problems << " held-out problems " << std::setprecision(1)
       << 100 * r.initial.accuracy << " % -> " << 100 * r.final.accuracy << " %";
  if (r.skipped_steps > 0)
    os << "; " << r.skipped_steps << (r.skipped_steps == 1 ? " step" : " steps")
       << " skipped (non-finite loss or gradient)";
  os << std::defaultfloat << "; peak RSS " << human_bytes(static_cast<double>(peak_rss)) << "\n";
}

void write_step_phases(std::ostream& os, const TrainResult& r) {
  const long long steps = r.last_step - r.first_step;
  if (!r.has_step_phases || steps <= 0 || !(r.step_seconds > 0)) return;
  std::vector<std::pair<double, std::string>> shares;
  for (int i = 0; i < kNumStepPhases; ++i)
    shares.emplace_back(r.step_phase_s[i], step_phase_name(static_cast<StepPhase>(i)));
  std::stable_sort(shares.begin(), shares.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  shares.emplace_back(r.step_phase_other_s, "other");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4g", r.step_seconds / static_cast<double>(steps));
  os << "  step phases (rank 0, " << steps << (steps == 1 ? " step, " : " steps, ") << buf << " s per step):";
  const char* sep = " ";
  for (const auto& [s, name] : shares) {
    std::snprintf(buf, sizeof buf, "%.1f", 100 * s / r.step_seconds);
    os << sep << name << " " << buf << " %";
    sep = ", ";
  }
  os << "\n";
}

nlohmann::json summary_record(const TrainResult& r, int steps) {
  nlohmann::json j;
  j["summary"] = true;
  j["steps"] = steps;
  j["seconds"] = r.seconds;
  j["tokens_per_s"] = r.tokens_per_second;
  j["val_loss_initial"] = r.initial.loss;
  j["val_loss_final"] = r.final.loss;
  j["unigram_entropy"] = r.unigram_entropy;
  j["skipped_steps"] = r.skipped_steps;
  if (r.stopped_nonfinite) j["stopped"] = "nonfinite";
  if (r.stopped_by_signal) j["stopped"] = "signal";
  if (r.final.accuracy >= 0) j["val_accuracy"] = r.final.accuracy;
  if (r.has_step_phases) {
    nlohmann::json sp;
    for (int i = 0; i < kNumStepPhases; ++i) sp[step_phase_name(static_cast<StepPhase>(i))] = r.step_phase_s[i];
    sp["other"] = r.step_phase_other_s;
    j["step_phase_s"] = sp;
    j["step_s"] = r.step_seconds;
  }
  return j;
}

void write_banner(std::ostream& os, const TrainConfig& cfg, const Mesh& mesh, const std::string& data) {
  const ModelConfig& m = cfg.model;
  os << "examoe train: " << mesh.world_size() << " ranks (dp " << mesh.dp_size() << " x ep " << mesh.ep_size()
     << "), " << Kokkos::DefaultExecutionSpace::name() << " with " << mesh.backend() << " collectives, "
     << cfg.train.precision << ", " << data << "\n";
  os << "  model: d=" << m.d_model << " L=" << m.n_layers << " heads=" << m.n_heads << " seq=" << m.seq_len
     << " E=" << m.num_experts << " k=" << m.top_k << " h=" << m.d_hidden << " " << to_string(m.activation);
  if (m.num_shared_experts > 0) os << " + " << m.num_shared_experts << " shared (h=" << m.shared_width() << ")";
  os << "; batch " << cfg.train.batch << " x " << m.seq_len << " tokens"
     << (cfg.train.micro_batches > 1 ? " in " + std::to_string(cfg.train.micro_batches) + " micro-batches per rank"
                                     : std::string())
     << ", " << cfg.train.steps << " steps\n";
}

void write_memory(std::ostream& os, const MemoryReport& mr, std::size_t scalar_bytes, bool checkpointing) {
  auto hb = [](std::size_t b) { return human_bytes(static_cast<double>(b)); };
  os << "  memory per rank: dense shards " << hb(mr.dense_shard) << " (of " << hb(mr.dense_total_params * scalar_bytes)
     << " dense in all), largest gathered unit " << hb(mr.gathered_unit_max) << ", local experts " << hb(mr.experts)
     << " (of " << hb(mr.expert_total_params * scalar_bytes) << "), optimizer state " << hb(mr.optimizer)
     << ", activations " << hb(mr.activations)
     << (checkpointing ? " (checkpointing; " + hb(mr.activations_without_checkpointing) + " without)" : std::string())
     << "\n";
}

void write_initial(std::ostream& os, const EvalResult& ev, double unigram_entropy) {
  os << "  before training: val loss " << std::fixed << std::setprecision(4) << ev.loss << " nats (unigram entropy "
     << unigram_entropy << ")";
  if (ev.accuracy >= 0) os << ", exact match " << std::setprecision(1) << 100 * ev.accuracy << " %";
  os << std::defaultfloat << "\n";
}

RunLog::RunLog(const TrainConfig& cfg, Communicator& world, std::ostream* out)
    : cfg_(cfg), world_(world), out_(world.rank() == 0 ? out : nullptr), quiet_(cfg.log.quiet) {
  agree(world_, [&] {
    if (world_.rank() != 0 || cfg_.log.metrics.empty()) return;
    // Appending to a checkpoint or an input would destroy it.
    const std::string why = metrics_output_conflict(cfg_);
    if (!why.empty()) throw Error(why);
    metrics_.open(cfg_.log.metrics, std::ios::app);
    if (!metrics_) throw Error("examoe::train: cannot open metrics file '" + clip_for_message(cfg_.log.metrics) + "'");
  });
}

void RunLog::emit(const nlohmann::json& j) {
  if (!metrics_.is_open() || !metrics_err_.empty()) return;
  errno = 0;
  metrics_ << j.dump() << "\n";
  metrics_.flush();
  if (!metrics_) {
    const int e = errno;
    metrics_err_ = "examoe::train: cannot write metrics file '" + clip_for_message(cfg_.log.metrics) + "' at step " +
                   std::to_string(step_) + (e != 0 ? std::string(": ") + std::strerror(e) : std::string()) +
                   " (log.metrics; training stops rather than lose its records)";
  }
}

void RunLog::agree_metrics() {
  if (cfg_.log.metrics.empty()) return;  // the same on every rank: all call it or none
  CollectiveLabel label("train.metrics");
  throw_if_any(world_, metrics_err_);
}

}  // namespace examoe::impl
