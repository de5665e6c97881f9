// `examoe generate CKPT --prompt TEXT | --prompt-tokens 1,2,3 | --held-out`: what a trained
// model writes. stdout holds the output alone (bytes for byte models, ids for token models,
// or the held-out accuracy); how generation stopped goes to stderr. README, "Generate".
#include "generate_cmd.hpp"
#include "cli_checks.hpp"

#include <mpi.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace examoe::app {
namespace {

/// "a+b=" followed by digits and '\n' (the addition corpus' answer, least significant digit
/// first) -> "a+b = <the sum, most significant digit first>", else "".
std::string addition_answer(const std::vector<int>& prompt, const std::vector<int>& out) {
  std::string p(prompt.begin(), prompt.end()), a;
  for (int t : out) a.push_back(static_cast<char>(t));
  const std::size_t plus = p.find('+');
  if (p.size() < 4 || p.back() != '=' || plus == std::string::npos || plus == 0 || plus + 2 >= p.size()) return "";
  for (std::size_t i = 0; i + 1 < p.size(); ++i)
    if (i != plus && !std::isdigit(static_cast<unsigned char>(p[i]))) return "";
  if (a.size() < 2 || a.back() != '\n') return "";
  a.pop_back();
  for (char c : a)
    if (!std::isdigit(static_cast<unsigned char>(c))) return "";
  return p.substr(0, plus) + " + " + p.substr(plus + 1, p.size() - plus - 2) + " = " + std::string(a.rbegin(), a.rend());
}

}  // namespace

void add_generate_command(CLI::App& app, GenerateCli& cli) {
  GenerateRequest& q = cli.request;
  auto* c = app.add_subcommand(
      "generate",
      "Generate from a checkpoint's model with a KV cache, on any number of ranks (experts stay on their owners): "
      "prints the prompt and what follows as bytes (byte models) or the generated token ids, comma-separated "
      "(token models). For the built-in addition corpus generation stops at '\\n' and the answer is written as "
      "the corpus writes it, digits reversed (12+34=64 means 46; stderr says so). --held-out prints the "
      "exact-match accuracy of the held-out problems instead");
  c->add_option("checkpoint", q.checkpoint, "Checkpoint file (step-<N>.h5)")->required();
  auto* text = c->add_option_function<std::string>(
      "--prompt", [&q](const std::string& v) { q.has_text = true; q.prompt_text = v; },
      "Prompt text, as bytes (byte models)");
  auto* toks = c->add_option_function<std::string>(
      "--prompt-tokens", [&q](const std::string& v) { q.has_tokens = true; q.prompt_tokens = v; },
      "Prompt as token ids, comma-separated (e.g. 12,7,300)");
  auto* held = c->add_flag("--held-out", q.held_out,
                           "Decode the held-out problems of the addition corpus greedily, each in its validation "
                           "context, and print their exact-match accuracy (the figure `train` reports)");
  text->excludes(toks);
  held->excludes(text)->excludes(toks);
  c->add_option("--max-new", q.max_new,
                "Most tokens to generate (generation also stops when the context reaches the model's seq_len)")
      ->capture_default_str()->check(integer_in(1));
  c->add_option("--temperature", q.sampling.temperature, "Sampling temperature; 0 = greedy (argmax, ties to the lowest id)")
      ->capture_default_str()->check(nonnegative_number());
  c->add_option("--top-k", q.sampling.top_k, "Sample among the k most likely tokens only (0 = all)")
      ->capture_default_str()->check(integer_in(0));
  c->add_option("--seed", q.sampling.seed, "Seed of the sampling (a hash of seed and position: the same on every rank count)")
      ->capture_default_str()->check(unsigned_integer());
}

int run_generate(const GenerateCli& cli) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const GenerateOutcome o = generate_from_checkpoint(cli.request, MPI_COMM_WORLD);
  if (rank != 0) return 0;
  if (cli.request.held_out) {
    std::printf("held-out problems %d exact %d accuracy %.6f (%.1f %%)\n", o.held_out.problems, o.held_out.exact,
                o.held_out.accuracy(), 100.0 * o.held_out.accuracy());
    return 0;
  }
  const GenerateResult& r = o.result;
  if (o.vocab == 256) {
    std::string bytes;
    for (int t : o.prompt) bytes.push_back(static_cast<char>(t));
    for (int t : r.tokens) bytes.push_back(static_cast<char>(t));
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
  } else {
    for (std::size_t i = 0; i < r.tokens.size(); ++i) std::printf("%s%d", i ? "," : "", r.tokens[i]);
    std::printf("\n");
  }
  std::fflush(stdout);
  const char* why = r.stop == GenerateStop::stop_token ? "stopped at '\\n'"
                    : r.stop == GenerateStop::max_new  ? "stopped at --max-new"
                                                       : nullptr;
  std::string note = why ? why
                         : "stopped at the model's seq_len " + std::to_string(o.seq_len) +
                               " (the longest context it was trained with)";
  std::fprintf(stderr, "examoe generate: %zu token%s generated after a prompt of %zu; %s\n", r.tokens.size(),
               r.tokens.size() == 1 ? "" : "s", o.prompt.size(), note.c_str());
  if (o.addition) {
    const std::string sum = addition_answer(o.prompt, r.tokens);
    if (!sum.empty())
      std::fprintf(stderr, "examoe generate: %s (the corpus writes a sum least significant digit first)\n", sum.c_str());
  }
  return 0;
}

}  // namespace examoe::app
