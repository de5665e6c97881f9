// `examoe train`: every config key is a command-line option (--model.d_model 64) and a JSON
// config file key ({"model": {"d_model": 64}}); precedence: defaults < --config < options.
#include "train_cmd.hpp"

#include <examoe/error.hpp>
#include <examoe/train.hpp>

#include <mpi.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

namespace examoe::app {

void add_train_command(CLI::App& app, TrainCli& cli) {
  auto* c = app.add_subcommand(
      "train",
      "Train a small MoE transformer (FSDP + expert parallelism). With no data it learns "
      "multi-digit addition from a built-in corpus and reports exact-match accuracy on "
      "held-out problems.");
  c->add_option("--config", cli.config_file, "JSON config file (nested or dotted keys)");
  c->add_option("--data", cli.data, "Train a byte-level model on this file (same as --data.path)");
  c->add_option("--resume", cli.resume,
                 "Continue from a checkpoint: a path, or 'latest' in checkpoint.dir "
                 "(same as --checkpoint.resume)");
  c->add_flag("--print-config", cli.print_config, "Print the resolved config as JSON and exit");
  // Unknown options are reported by run_train with the nearest valid key (CLI11 would only
  // say that they were not expected).
  c->allow_extras();
  const TrainConfig defaults;
  for (const auto& k : config_keys()) {
    c->add_option("--" + k.name, cli.values[k.name], k.help)
        ->default_str(k.get(defaults))
        ->type_name(k.type)
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a later option overrides
  }
}

int run_train(CLI::App& app, const TrainCli& cli) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  auto* sub = app.get_subcommand("train");
  TrainConfig cfg;
  std::string err;
  try {
    const std::vector<std::string> extra = sub->remaining();
    if (!extra.empty()) {
      const std::string& a = extra.front();
      if (a.rfind("--", 0) == 0) {
        const std::string name = a.substr(2, a.find('=') == std::string::npos ? std::string::npos : a.find('=') - 2);
        throw Error("examoe train: unknown option '--" + name + "' (did you mean '--" + closest_key(name) +
                    "'? `examoe train --help` lists every key)");
      }
      throw Error("examoe train: unexpected argument '" + a + "' (options are --key value; see `examoe train --help`)");
    }
    if (!cli.config_file.empty()) {
      struct stat st;
      if (::stat(cli.config_file.c_str(), &st) != 0)
        throw Error("examoe train: cannot read config file '" + cli.config_file + "': " + std::strerror(errno));
      if (!S_ISREG(st.st_mode))
        throw Error("examoe train: config file '" + cli.config_file + "' is not a regular file");
      std::ifstream in(cli.config_file);
      if (!in) throw Error("examoe train: cannot read config file '" + cli.config_file + "'");
      std::stringstream ss;
      ss << in.rdbuf();
      apply_json_config(cfg, ss.str(), cli.config_file);
    }
    for (const auto& k : config_keys())
      if (sub->count("--" + k.name) > 0) k.set(cfg, cli.values.at(k.name));
    if (!cli.data.empty()) cfg.data.path = cli.data;
    if (!cli.resume.empty()) cfg.checkpoint.resume = cli.resume;
  } catch (const Error& e) {
    err = e.what();
  }
  // Same arguments on every rank, so the same error; agree anyway (no rank may hang).
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  throw_if_any(*comm, err);
  if (cli.print_config) {
    if (rank == 0) {
      std::cout << "{\n";
      const auto& keys = config_keys();
      for (std::size_t i = 0; i < keys.size(); ++i)
        std::cout << "  \"" << keys[i].name << "\": \"" << keys[i].get(cfg) << "\""
                  << (i + 1 < keys.size() ? "," : "") << "\n";
      std::cout << "}\n";
    }
    return 0;
  }
  const TrainResult res = train(cfg, MPI_COMM_WORLD, &std::cout);
  if (res.stopped_nonfinite) {
    // A clear message where errors go, and an exit code scripts can tell apart (docs/faults.md).
    if (rank == 0) std::cerr << "examoe: " << res.stop_message << std::endl;
    return kExitNonfinite;
  }
  return 0;
}

}  // namespace examoe::app
