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
}  // namespace examoe::app
