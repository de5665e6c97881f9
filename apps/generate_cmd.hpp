#pragma once
#include <CLI/CLI.hpp>

#include <examoe/generate.hpp>

namespace examoe::app {
struct GenerateCli {
  GenerateRequest request;
};
void add_generate_command(CLI::App& app, GenerateCli& cli);
int run_generate(const GenerateCli& cli);
}  // namespace examoe::app
