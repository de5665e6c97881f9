// The training unit's parts on their own: the run log's lines and records against hand-written
// text, the metrics write-failure policy, the option enums' spellings, and a Trainer driven
// step by step against train().
#include "test_util.hpp"

#include "train/run_log.hpp"
#include "train/trainer.hpp"

#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/train.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

using examoe::test::world_rank;
using examoe::test::world_size;

/// Every rank throws examoe::Error containing `needle` (and none returns normally).
template <class F>
void expect_error_everywhere(F&& f, const std::string& needle) {
  std::string msg;
  try {
    f();
  } catch (const examoe::Error& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find(needle), std::string::npos) << "message: '" << msg << "'";
  int ok = msg.find(needle) != std::string::npos ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  EXPECT_EQ(ok, 1) << "some rank did not get the error";
}

examoe::impl::ProgressPoint sample_point() {
  examoe::impl::ProgressPoint p;
  p.step = 5;
  p.steps = 100;
  p.loss = 1.25;
  p.ce = 1.1875;
  p.aux = 0.0625;
  p.z = 0.001;
  p.lr = 0.003;
  p.grad_norm = 0.5;
  p.tokens_per_s = 1234.25;
  p.imbalance = 1.5;
  p.eta_s = 65;
  return p;
}

}  // namespace

TEST(Trainer, HumanTime) {
  EXPECT_EQ(examoe::impl::human_time(42), "42s");
  EXPECT_EQ(examoe::impl::human_time(185), "3m05s");
  EXPECT_EQ(examoe::impl::human_time(7620), "2h07m");
}

TEST(Trainer, ProgressLine) {
  examoe::impl::ProgressPoint p = sample_point();
  {
    std::ostringstream os;
    examoe::impl::write_progress(os, p);
    EXPECT_EQ(os.str(), "step   5/100 | loss 1.2500 | aux 0.0625 | lr 3.00e-03 | 1234 tok/s | imbalance 1.50 | ETA 1m05s\n");
  }
  p.skipped = 2;
  p.evaluated = true;
  p.val.loss = 0.75;
  p.val.accuracy = 0.125;
  {
    std::ostringstream os;
    examoe::impl::write_progress(os, p);
    EXPECT_EQ(os.str(),
              "step   5/100 | loss 1.2500 | aux 0.0625 | lr 3.00e-03 | 1234 tok/s | imbalance 1.50 | ETA 1m05s"
              " | skipped 2 | val 0.7500 acc 12.5%\n");
  }
  p.val.accuracy = -1;  // a file corpus: no accuracy
  {
    std::ostringstream os;
    examoe::impl::write_progress(os, p);
    EXPECT_EQ(os.str(),
              "step   5/100 | loss 1.2500 | aux 0.0625 | lr 3.00e-03 | 1234 tok/s | imbalance 1.50 | ETA 1m05s"
              " | skipped 2 | val 0.7500\n");
  }
}

TEST(Trainer, ProgressRecord) {
  examoe::impl::ProgressPoint p = sample_point();
  p.skipped = 2;
  p.bytes_moved = 4096;
  p.peak_rss = 1048576;
  p.tokens_per_expert = {{3, 5}, {4, 4}};
  p.phase_s[static_cast<int>(examoe::Phase::alltoall)] = 0.25;
  p.evaluated = true;
  p.val.loss = 0.75;
  p.val.accuracy = 0.125;
  EXPECT_EQ(examoe::impl::progress_record(p).dump(),
            "{\"aux\":0.0625,\"bytes_moved\":4096,\"ce\":1.1875,\"grad_norm\":0.5,\"imbalance\":1.5,\"loss\":1.25,"
            "\"lr\":0.003,\"moe_phase_s\":{\"alltoall\":0.25,\"bwd_alltoall\":0.0,\"bwd_combine\":0.0,"
            "\"bwd_experts\":0.0,\"bwd_router\":0.0,\"combine\":0.0,\"experts\":0.0,\"pack\":0.0,\"plan\":0.0,"
            "\"router\":0.0},\"peak_rss_bytes\":1048576,\"skipped\":2,\"step\":5,\"tokens_per_expert\":[[3,5],[4,4]],"
            "\"tokens_per_s\":1234.25,\"val_accuracy\":0.125,\"val_loss\":0.75,\"z\":0.001}");
  p.evaluated = false;  // no validation at this step: no val_ fields
  const std::string dump = examoe::impl::progress_record(p).dump();
  EXPECT_EQ(dump.find("val_"), std::string::npos) << dump;
}

// With a capacity (model.capacity_factor > 0) the line and the record carry the drops:
// 1 + 3 of 16 routed assignments = 25 %.
TEST(Trainer, ProgressWithCapacity) {
  examoe::impl::ProgressPoint p = sample_point();
  p.tokens_per_expert = {{3, 5}, {4, 4}};
  p.dropped_per_expert = {{1, 0}, {0, 3}};
  std::ostringstream os;
  examoe::impl::write_progress(os, p);
  EXPECT_EQ(os.str(),
            "step   5/100 | loss 1.2500 | aux 0.0625 | lr 3.00e-03 | 1234 tok/s | imbalance 1.50 | ETA 1m05s"
            " | dropped 25.0%\n");
  const auto j = examoe::impl::progress_record(p);
  EXPECT_EQ(j.at("dropped_per_expert").dump(), "[[1,0],[0,3]]");
  EXPECT_EQ(j.at("dropped_fraction").get<double>(), 0.25);
}

TEST(Trainer, SummaryLineAndRecord) {
  examoe::TrainResult r;
  r.first_step = 100;
  r.last_step = 400;
  r.seconds = 10.5;
  r.tokens_per_second = 30000;
  r.initial.loss = 5.5;
  r.final.loss = 0.25;
  r.initial.accuracy = 0;
  r.final.accuracy = 0.75;
  r.unigram_entropy = 2.125;
  r.skipped_steps = 1;
  r.stopped_by_signal = true;
  std::ostringstream os;
  examoe::impl::write_summary(os, r, 256, 1572864);
  EXPECT_EQ(os.str(),
            "summary: 300 steps in 10.5 s (30000 tokens/s); val loss 5.5000 -> 0.2500 nats (unigram entropy 2.1250); "
            "exact match on 256 held-out problems 0.0 % -> 75.0 %; 1 step skipped (non-finite loss or gradient); "
            "peak RSS 1.5 MiB\n");
  EXPECT_EQ(examoe::impl::summary_record(r, 400).dump(),
            "{\"seconds\":10.5,\"skipped_steps\":1,\"steps\":400,\"stopped\":\"signal\",\"summary\":true,"
            "\"tokens_per_s\":30000.0,\"unigram_entropy\":2.125,\"val_accuracy\":0.75,\"val_loss_final\":0.25,"
            "\"val_loss_initial\":5.5}");
  // A file corpus (no accuracy), nothing skipped.
  r.final.accuracy = -1;
  r.skipped_steps = 0;
  std::ostringstream os2;
  examoe::impl::write_summary(os2, r, 0, 2048);
  EXPECT_EQ(os2.str(),
            "summary: 300 steps in 10.5 s (30000 tokens/s); val loss 5.5000 -> 0.2500 nats (unigram entropy 2.1250); "
            "peak RSS 2.0 KiB\n");
}

/// A metrics line that cannot be written (a full disk) is an error on every rank at the next
/// agreement, naming the file, the step and the cause; nothing is written after it.
TEST(Trainer, MetricsWriteFailureIsAgreed) {
  examoe::TrainConfig cfg = examoe::test::tiny_train_config();
  cfg.log.metrics = "/dev/full";
  auto world = examoe::make_mpi_communicator(MPI_COMM_WORLD);
  examoe::impl::RunLog log(cfg, *world, nullptr);
  EXPECT_EQ(log.metrics(), world_rank() == 0);
  EXPECT_EQ(log.out(), nullptr);
  log.set_step(7);
  log.emit(nlohmann::json{{"step", 7}});
  log.set_step(8);
  log.emit(nlohmann::json{{"step", 8}});  // ignored: the first failure is the one reported
  expect_error_everywhere([&] { log.agree_metrics(); },
                          "examoe::train: cannot write metrics file '/dev/full' at step 7: " +
                              std::string(std::strerror(ENOSPC)) +
                              " (log.metrics; training stops rather than lose its records)");
}

TEST(Trainer, RunLogQuietAndRank0) {
  examoe::TrainConfig cfg = examoe::test::tiny_train_config();
  std::ostringstream os;
  auto world = examoe::make_mpi_communicator(MPI_COMM_WORLD);
  cfg.log.quiet = false;
  examoe::impl::RunLog loud(cfg, *world, &os);
  EXPECT_EQ(loud.out(), world_rank() == 0 ? &os : nullptr);
  EXPECT_EQ(loud.verbose(), loud.out());
  EXPECT_FALSE(loud.metrics());
  loud.agree_metrics();  // no metrics file: nothing to agree, no collective
  cfg.log.quiet = true;
  examoe::impl::RunLog quiet(cfg, *world, &os);
  EXPECT_EQ(quiet.out(), world_rank() == 0 ? &os : nullptr);
  EXPECT_EQ(quiet.verbose(), nullptr);
}

TEST(Trainer, OptionSpellingsRoundTrip) {
  using examoe::CommBackend;
  using examoe::GpuAwareMpi;
  using examoe::NonfinitePolicy;
  const std::vector<std::pair<CommBackend, std::string>> backends = {
      {CommBackend::automatic, "auto"}, {CommBackend::mpi, "mpi"}, {CommBackend::nccl, "nccl"}};
  for (const auto& [b, s] : backends) {
    EXPECT_EQ(examoe::to_string(b), s);
    EXPECT_EQ(examoe::comm_backend_from_string(s), b);
  }
  const std::vector<std::pair<GpuAwareMpi, std::string>> aware = {
      {GpuAwareMpi::automatic, "auto"}, {GpuAwareMpi::yes, "true"}, {GpuAwareMpi::no, "false"}};
  for (const auto& [g, s] : aware) {
    EXPECT_EQ(examoe::to_string(g), s);
    EXPECT_EQ(examoe::gpu_aware_mpi_from_string(s), g);
  }
  EXPECT_EQ(examoe::to_string(NonfinitePolicy::skip), "skip");
  EXPECT_EQ(examoe::to_string(NonfinitePolicy::stop), "stop");
  EXPECT_EQ(examoe::nonfinite_policy_from_string("skip"), NonfinitePolicy::skip);
  EXPECT_EQ(examoe::nonfinite_policy_from_string("stop"), NonfinitePolicy::stop);

  // Unknown spellings (case matters) are refused, naming the option.
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const examoe::Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(message([] { examoe::comm_backend_from_string("MPI"); }),
            "examoe::comm_backend_from_string: unknown communication backend 'MPI' (expected auto, mpi or nccl)");
  EXPECT_EQ(message([] { examoe::gpu_aware_mpi_from_string("yes"); }),
            "examoe::gpu_aware_mpi_from_string: gpu_aware_mpi must be auto, true or false, not 'yes'");
  EXPECT_EQ(message([] { examoe::nonfinite_policy_from_string("halt"); }),
            "examoe::nonfinite_policy_from_string: unknown train.nonfinite 'halt' (expected skip or stop)");

  // The key table reads and writes the same spellings (so config hashes and checkpoint config
  // attributes stay as they were) and keeps its messages.
  examoe::TrainConfig cfg;
  const std::string canon = examoe::canonical_config(cfg);
  for (const char* line : {"parallel.comm=auto\n", "parallel.gpu_aware_mpi=auto\n", "train.nonfinite=skip\n"})
    EXPECT_NE(canon.find(line), std::string::npos) << line;
  auto key = [](const std::string& name) -> const examoe::ConfigKey& {
    for (const auto& k : examoe::config_keys())
      if (k.name == name) return k;
    throw std::runtime_error("no key " + name);
  };
  key("parallel.comm").set(cfg, "nccl");
  key("parallel.gpu_aware_mpi").set(cfg, "false");
  key("train.nonfinite").set(cfg, "stop");
  EXPECT_EQ(cfg.parallel.comm, CommBackend::nccl);
  EXPECT_EQ(cfg.parallel.gpu_aware_mpi, GpuAwareMpi::no);
  EXPECT_EQ(cfg.train.nonfinite, NonfinitePolicy::stop);
  EXPECT_EQ(key("parallel.comm").get(cfg), "nccl");
  EXPECT_EQ(key("parallel.gpu_aware_mpi").get(cfg), "false");
  EXPECT_EQ(key("train.nonfinite").get(cfg), "stop");
  const examoe::CommOptions o = cfg.parallel.comm_options();
  EXPECT_EQ(o.backend, CommBackend::nccl);
  EXPECT_EQ(o.gpu_aware_mpi, GpuAwareMpi::no);
  EXPECT_EQ(message([&] { key("parallel.comm").set(cfg, "ncl"); }),
            "examoe::config: parallel.comm must be auto, mpi or nccl, got 'ncl'");
  EXPECT_EQ(message([&] { key("parallel.gpu_aware_mpi").set(cfg, "maybe"); }),
            "examoe::config: parallel.gpu_aware_mpi must be auto, true or false, got 'maybe'");
  EXPECT_EQ(message([&] { key("train.nonfinite").set(cfg, "halt"); }),
            "examoe::config: train.nonfinite must be skip or stop, got 'halt'");
  EXPECT_EQ(cfg.parallel.comm, CommBackend::nccl);  // a refused value changes nothing
  EXPECT_EQ(cfg.train.nonfinite, NonfinitePolicy::stop);
}

/// A Trainer driven one step at a time gives bitwise the losses, validation and placement
/// changes of train() with the same config (here with rebalancing every 3 steps, so experts
/// move between ranks where there are several).
TEST(Trainer, StepByStepMatchesTrain) {
  const std::string dir = examoe::test::make_shared_dir("trainer", "steps");
  examoe::TrainConfig cfg = examoe::test::tiny_train_config();
  cfg.train.steps = 8;
  cfg.log.eval_interval = 4;
  cfg.placement.rebalance_interval = 3;
  cfg.checkpoint.dir = dir;
  const examoe::TrainResult ref = examoe::train(cfg, MPI_COMM_WORLD, nullptr);
  ASSERT_EQ(ref.losses.size(), 8u);
  if (world_size() > 1) EXPECT_GT(ref.migrations, 0) << "the comparison should cover experts that move";

  examoe::impl::Trainer<double> t(cfg, MPI_COMM_WORLD, nullptr);
  t.start();
  EXPECT_EQ(t.steps_done(), 0);
  EXPECT_FALSE(t.finished());
  EXPECT_EQ(t.result().initial.loss, ref.initial.loss);
  EXPECT_EQ(t.result().initial.accuracy, ref.initial.accuracy);
  for (int s = 1; s <= 8; ++s) {
    t.step();
    ASSERT_EQ(t.steps_done(), s);
    ASSERT_EQ(t.result().losses.size(), static_cast<std::size_t>(s));
    EXPECT_EQ(t.result().losses.back(), ref.losses[s - 1]) << "step " << s;  // bitwise
    EXPECT_EQ(t.result().ce.back(), ref.ce[s - 1]) << "step " << s;
    EXPECT_EQ(t.result().last_step, s);
  }
  EXPECT_TRUE(t.finished());
  t.step();  // nothing left: no step, no collective
  EXPECT_EQ(t.steps_done(), 8);
  const examoe::TrainResult r = t.finish();
  EXPECT_EQ(r.losses, ref.losses);
  EXPECT_EQ(r.final.loss, ref.final.loss);
  EXPECT_EQ(r.final.accuracy, ref.final.accuracy);
  EXPECT_EQ(r.migrations, ref.migrations);
  EXPECT_EQ(r.imbalance_before, ref.imbalance_before);
  EXPECT_EQ(r.imbalance_after, ref.imbalance_after);
  EXPECT_EQ(r.first_step, 0);
  EXPECT_EQ(r.last_step, 8);
  EXPECT_FALSE(r.stopped_by_signal);
  EXPECT_FALSE(r.stopped_nonfinite);
  examoe::test::remove_shared_dir(dir);
}

/// The step's phases in the progress record (with `other`, the rest of step_s) and the line of
/// shares before the summary, against hand-written text.
TEST(Trainer, StepPhasesRecordAndLine) {
  examoe::impl::ProgressPoint p = sample_point();
  p.has_step_phases = true;
  p.step_phase_s[static_cast<int>(examoe::StepPhase::moe)] = 0.5;
  p.step_phase_s[static_cast<int>(examoe::StepPhase::attention)] = 0.125;
  p.step_s = 1.0;
  const auto j = examoe::impl::progress_record(p);
  EXPECT_EQ(j["step_s"].dump(), "1.0");
  EXPECT_EQ(j["step_phase_s"].dump(),
            "{\"attention\":0.125,\"data\":0.0,\"embedding\":0.0,\"expert_allreduce\":0.0,\"fsdp_gather\":0.0,"
            "\"fsdp_reduce_scatter\":0.0,\"loss\":0.0,\"moe\":0.5,\"norms\":0.0,\"optimizer\":0.0,\"other\":0.375,"
            "\"projections\":0.0}");
  examoe::TrainResult r;
  r.first_step = 0;
  r.last_step = 4;
  r.has_step_phases = true;
  r.step_phase_s[static_cast<int>(examoe::StepPhase::moe)] = 2.0;
  r.step_phase_s[static_cast<int>(examoe::StepPhase::projections)] = 1.0;
  r.step_phase_s[static_cast<int>(examoe::StepPhase::optimizer)] = 0.5;
  r.step_phase_other_s = 0.5;
  r.step_seconds = 4.0;
  std::ostringstream os;
  examoe::impl::write_step_phases(os, r);
  EXPECT_EQ(os.str(),
            "  step phases (rank 0, 4 steps, 1 s per step): moe 50.0 %, projections 25.0 %, optimizer 12.5 %, "
            "data 0.0 %, embedding 0.0 %, norms 0.0 %, attention 0.0 %, loss 0.0 %, fsdp_gather 0.0 %, "
            "fsdp_reduce_scatter 0.0 %, expert_allreduce 0.0 %, other 12.5 %\n");
  EXPECT_EQ(examoe::impl::summary_record(r, 4)["step_phase_s"]["other"].dump(), "0.5");
  r.has_step_phases = false;  // log.step_phases false: no line, no field
  std::ostringstream none;
  examoe::impl::write_step_phases(none, r);
  EXPECT_EQ(none.str(), "");
  EXPECT_FALSE(examoe::impl::summary_record(r, 4).contains("step_phase_s"));
}

/// A run times every part of its steps (the phases and `other` add up to the steps' time, the
/// model's parts all took time) and the timing changes no result; log.step_phases false times
/// nothing.
TEST(Trainer, StepPhasesOfARun) {
  const std::string dir = examoe::test::make_shared_dir("trainer", "phases");
  examoe::TrainConfig cfg = examoe::test::tiny_train_config();
  cfg.train.steps = 4;
  cfg.checkpoint.dir = dir;
  const examoe::TrainResult on = examoe::train(cfg, MPI_COMM_WORLD, nullptr);
  ASSERT_TRUE(on.has_step_phases);
  double sum = on.step_phase_other_s;
  for (double s : on.step_phase_s) {
    EXPECT_GE(s, 0.0);
    sum += s;
  }
  EXPECT_GT(on.step_seconds, 0.0);
  EXPECT_NEAR(sum, on.step_seconds, 1e-9 * on.step_seconds + 1e-12);
  EXPECT_LE(on.step_seconds, on.seconds);
  for (auto ph : {examoe::StepPhase::data, examoe::StepPhase::embedding, examoe::StepPhase::norms,
                  examoe::StepPhase::attention, examoe::StepPhase::projections, examoe::StepPhase::loss,
                  examoe::StepPhase::moe, examoe::StepPhase::fsdp_gather, examoe::StepPhase::fsdp_reduce_scatter,
                  examoe::StepPhase::optimizer})
    EXPECT_GT(on.step_phase_s[static_cast<int>(ph)], 0.0) << examoe::step_phase_name(ph);
  cfg.log.step_phases = false;
  const examoe::TrainResult off = examoe::train(cfg, MPI_COMM_WORLD, nullptr);
  EXPECT_FALSE(off.has_step_phases);
  EXPECT_EQ(off.step_seconds, 0.0);
  for (double s : off.step_phase_s) EXPECT_EQ(s, 0.0);
  EXPECT_EQ(off.losses, on.losses);  // bitwise: timing changes nothing
  EXPECT_EQ(off.final.loss, on.final.loss);
  examoe::test::remove_shared_dir(dir);
}
