#pragma once
#include <CLI/CLI.hpp>

#include <string>

namespace examoe::app {
struct InspectCli {
  std::string path;
  bool json = false;
};
void add_inspect_command(CLI::App& app, InspectCli& cli);
int run_inspect(const InspectCli& cli);

struct EvalCli {
  std::string checkpoint, input, output;
  int ep = 0;
};
void add_eval_command(CLI::App& app, EvalCli& cli);
int run_eval(const EvalCli& cli);
}  // namespace examoe::app
