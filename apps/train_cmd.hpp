#pragma once
#include <CLI/CLI.hpp>

#include <map>
#include <string>

namespace examoe::app {
/// Exit code of `examoe train` when training stopped on non-finite values (train.nonfinite =
/// stop, or train.max_skipped skipped steps in a row); errors exit with 1.
constexpr int kExitNonfinite = 3;
struct TrainCli {
  std::string config_file, data, resume;
  bool print_config = false;
  std::map<std::string, std::string> values;  // key -> value given on the command line
};
void add_train_command(CLI::App& app, TrainCli& cli);
int run_train(CLI::App& app, const TrainCli& cli);
}  // namespace examoe::app
