#pragma once
#include <CLI/CLI.hpp>

#include <map>
#include <string>

namespace examoe::app {
struct TrainCli {
  std::string config_file, data, resume;
  bool print_config = false;
  std::map<std::string, std::string> values;  // key -> value given on the command line
};
void add_train_command(CLI::App& app, TrainCli& cli);
int run_train(CLI::App& app, const TrainCli& cli);
}  // namespace examoe::app
