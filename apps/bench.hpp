#pragma once
#include <CLI/CLI.hpp>

namespace examoe::app {
struct BenchOptions {
  int d_model = 512, d_hidden = 2048, num_experts = 8, top_k = 2, tokens = 4096;
  std::string activation = "gelu", precision = "float";
  std::string dispatch_dtype = "scalar";  // rows on the wire: scalar or bf16
  std::string overlap = "on";             // exchanges behind the kept rows' work: on or off
  std::string expert_schedule = "auto";   // the experts' GEMMs: auto, by-projection or by-expert
  std::string tf32 = "off";               // float expert GEMMs on TF32 tensor cores (CUDA): on or off
  int steps = 5, warmup = 2;
  double temperature = 1.0;
  std::string score = "softmax";  // router scores: softmax or sigmoid
  double bias_rate = 0;           // selection bias, updated after every step (0 = off)
  int groups = 0, topk_groups = 0;  // group-limited routing (topk_groups 0 = off)
  double capacity_factor = 0.0;  // expert capacity (MoEConfig::capacity_factor): 0 = dropless
  std::uint64_t seed = 1234;
  std::string json;  // optional JSON-lines output file
  std::string comm = "auto";  // collectives backend: auto, mpi, nccl
  std::string memory_limit = "auto";  // as train.memory_limit: auto, off or a size per rank
};
void add_bench_command(CLI::App& app, BenchOptions& opt);
int run_bench(const BenchOptions& opt);
}  // namespace examoe::app
