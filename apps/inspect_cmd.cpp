// `examoe inspect CKPT`: what a checkpoint holds, for people or (--json) for machines.
#include "inspect_cmd.hpp"
#include "cli_checks.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/train.hpp>

#include <mpi.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <iostream>

namespace examoe::app {

void add_inspect_command(CLI::App& app, InspectCli& cli) {
  auto* c = app.add_subcommand("inspect",
                               "Show a checkpoint: config, step, expert placement, tokens per "
                               "expert and per rank, imbalance, parameter counts");
  c->add_option("checkpoint", cli.path, "Checkpoint file (step-<N>.h5)")->required();
  c->add_flag("--json", cli.json, "One JSON object instead of text");
}

int run_inspect(const InspectCli& cli) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const CheckpointInfo info = read_checkpoint_info(cli.path, MPI_COMM_WORLD);
  if (rank != 0) return 0;
  // Tokens per owning rank and imbalance, per layer.
  std::vector<std::vector<long long>> per_rank;
  std::vector<double> imbalance;
  for (std::size_t l = 0; l < info.placement.size(); ++l) {
    int ranks = 0;
    for (int o : info.placement[l]) ranks = std::max(ranks, o + 1);
    std::vector<long long> pr(static_cast<std::size_t>(ranks), 0);
    for (std::size_t e = 0; e < info.placement[l].size(); ++e)
      pr[info.placement[l][e]] += l < info.tokens_per_expert.size() ? info.tokens_per_expert[l][e] : 0;
    long long mx = 0, sum = 0;
    for (long long v : pr) {
      mx = std::max(mx, v);
      sum += v;
    }
    imbalance.push_back(sum > 0 ? static_cast<double>(mx) * ranks / static_cast<double>(sum) : 1.0);
    per_rank.push_back(pr);
  }
  if (cli.json) {
    nlohmann::json j;
    j["path"] = cli.path;
    j["format_version"] = info.format_version;
    j["step"] = info.step;
    j["run_id"] = info.run_id;  // "" for checkpoints written before run ids
    j["precision"] = info.precision;
    j["written_by"] = {{"world_size", info.world_size}, {"dp", info.dp}, {"ep", info.ep}};
    j["parameters"] = info.parameters;
    nlohmann::json c;
    for (const auto& [k, v] : info.config) c[k] = v;
    j["config"] = c;
    j["placement"] = info.placement;
    j["tokens_per_expert"] = info.tokens_per_expert;
    j["tokens_per_rank"] = per_rank;
    j["imbalance"] = imbalance;
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("%s: ExaMoE checkpoint, format %d, step %lld, %s, %lld parameters\n", cli.path.c_str(),
              info.format_version, info.step, info.precision.c_str(), info.parameters);
  std::printf("written by %d ranks (dp %d x ep %d), run %s\n", info.world_size, info.dp, info.ep,
              info.run_id.empty() ? "unknown (written before run ids)" : info.run_id.c_str());
  std::printf("config:\n");
  for (const auto& [k, v] : info.config) std::printf("  %-36s %s\n", k.c_str(), v.c_str());
  for (std::size_t l = 0; l < info.placement.size(); ++l) {
    std::printf("layer %zu: imbalance %.3f (max/mean tokens per rank)\n", l, imbalance[l]);
    for (std::size_t r = 0; r < per_rank[l].size(); ++r) {
      std::printf("  rank %zu: %lld tokens, experts", r, per_rank[l][r]);
      for (std::size_t e = 0; e < info.placement[l].size(); ++e)
        if (info.placement[l][e] == static_cast<int>(r))
          std::printf(" %zu (%lld)", e, info.tokens_per_expert[l][e]);
      std::printf("\n");
    }
  }
  return 0;
}

void add_eval_command(CLI::App& app, EvalCli& cli) {
  auto* c = app.add_subcommand(
      "eval",
      "Run a checkpoint's model over token sequences from an HDF5 file and write the logits to "
      "HDF5 (input: dataset 'tokens' int [N][seq_len], optional 'targets'; output: dataset "
      "'logits' float [N][seq_len][V], V = the model's model.vocab_size; see docs/checkpoint-format.md)");
  c->add_option("checkpoint", cli.checkpoint, "Checkpoint file (step-<N>.h5)")->required();
  c->add_option("--input", cli.input, "HDF5 file with dataset 'tokens'")->required();
  c->add_option("--output", cli.output, "HDF5 file to write dataset 'logits' to")->required();
  c->add_option("--parallel.ep", cli.ep, "Expert-parallel degree (0 = all ranks)")->capture_default_str()->check(integer_in(0));
}

int run_eval(const EvalCli& cli) {
  eval_file(cli.checkpoint, cli.input, cli.output, cli.ep, MPI_COMM_WORLD, &std::cout);
  return 0;
}

}  // namespace examoe::app
