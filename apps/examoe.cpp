// The `examoe` command: one binary, one subcommand per job.
#include "bench.hpp"
#include "train_cmd.hpp"
#include "inspect_cmd.hpp"
#include "generate_cmd.hpp"

#include <examoe/examoe.hpp>
#include <examoe/impl/host_blas.hpp>
#include <examoe/impl/host_vector_kernels.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <string>

namespace {

/// On rank 0 of a host backend: a warning when OpenBLAS runs kernels narrower than the CPU's
/// vectors (impl/host_blas.hpp), before the run it would slow down.
void warn_about_blas_kernels(int rank) {
  if (rank != 0 || examoe::impl::kc::device_memory_v<Kokkos::DefaultExecutionSpace>) return;
  namespace host = examoe::impl::host;
  const std::string w = host::blas_core_warning(host::blas_core(), host::vector_isa(), host::blas_config());
  if (!w.empty()) std::fprintf(stderr, "examoe: warning: %s\n", w.c_str());
}

/// A CLI11 parse error as ExaMoE words every error: the command it concerns, what is wrong
/// (an unknown command is named), a bounded prefix of any value quoted, and where help is.
std::string usage_message(CLI::App& app, const CLI::ParseError& e, int argc, char** argv) {
  std::string commands;
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
    commands += (commands.empty() ? "" : ", ") + sub->get_name();
  const std::vector<CLI::App*> parsed = app.get_subcommands();
  if (parsed.empty()) {
    // No command recognised: name the word that stands where the command belongs.
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a.rfind("-", 0) == 0)
        return "examoe: unknown option '" + examoe::clip_for_message(a) + "' before the command (commands: " + commands +
               "; `examoe --help` says more)";
      return "examoe: unknown command '" + examoe::clip_for_message(a) + "' (commands: " + commands +
             "; `examoe --help` says more)";
    }
    return "examoe: no command given (commands: " + commands + "; `examoe COMMAND --help` lists the options of one)";
  }
  const std::string name = parsed.back()->get_name();
  std::string what = e.what();
  // "--top-k: 1 required INT:>= 1 missing" (an option at the end without its value).
  if (dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr && what.find(':') != std::string::npos &&
      what.size() > 8 && what.compare(what.size() - 8, 8, " missing") == 0)
    what = "option " + what.substr(0, what.find(':')) + " needs a value";
  // "--top-k: is out of range: ..." (cli_checks.hpp) reads "--top-k is out of range: ...".
  const std::size_t colon = what.find(": ");
  if (dynamic_cast<const CLI::ValidationError*>(&e) != nullptr && colon != std::string::npos &&
      (what.compare(colon + 2, 3, "is ") == 0 || what.compare(colon + 2, 5, "must ") == 0))
    what.erase(colon, 1);
  return "examoe " + name + ": " + examoe::clip_for_message(what, 2000) + " (`examoe " + name +
         " --help` lists the options)";
}

/// Parses the command line on every rank and agrees the outcome: a usage error on any rank
/// is the error of every rank (ranks given different arguments must not split into ranks that
/// run and ranks that stopped). Returns the agreed error ("" if none); `info` is true when
/// the command line asked only for --help or --version (printed by rank 0).
std::string parse_everywhere(CLI::App& app, int argc, char** argv, int rank, bool& info) {
  std::string err;
  info = false;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) {
      info = true;  // --help, --version
      if (rank == 0) app.exit(e);
    } else {
      err = usage_message(app, e, argc, argv);
    }
  }
  int flags[2] = {info ? 1 : 0, info ? 0 : 1};  // max: some asked for help; max: some did not
  MPI_Allreduce(MPI_IN_PLACE, flags, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (err.empty() && flags[0] && flags[1])
    err = "examoe: the ranks were given different command lines (some ask for --help or --version, some do not)";
  auto world = examoe::make_mpi_communicator(MPI_COMM_WORLD);
  return world->first_error(err);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int rc = 0;
  bool own_kokkos = false;
  {
    CLI::App app{"ExaMoE: expert-parallel Mixture-of-Experts training for MPI codes"};
    app.set_version_flag("--version", std::string("examoe ") + EXAMOE_VERSION_STRING);
    app.require_subcommand(1);
    examoe::app::BenchOptions bench;
    examoe::app::TrainCli train;
    examoe::app::add_train_command(app, train);
    examoe::app::add_bench_command(app, bench);
    examoe::app::InspectCli inspect;
    examoe::app::add_inspect_command(app, inspect);
    examoe::app::EvalCli eval;
    examoe::app::add_eval_command(app, eval);
    examoe::app::GenerateCli generate;
    examoe::app::add_generate_command(app, generate);
    try {
      // Usage errors are errors like any other: the same prefix on every rank, exit status 1
      // (docs/errors.md).
      bool info = false;
      const std::string usage = parse_everywhere(app, argc, argv, rank, info);
      if (!usage.empty()) throw examoe::Error(usage);
      if (!info) {
        // Kokkos starts only for real work: --help and --version run on nodes without a GPU.
        // On GPUs: one device per rank, by node-local rank (or EXAMOE_DEVICE_ID).
        own_kokkos = examoe::initialize_kokkos(MPI_COMM_WORLD);
        if (!app.got_subcommand("inspect")) warn_about_blas_kernels(rank);  // inspect runs no GEMMs
        if (app.got_subcommand("bench")) rc = examoe::app::run_bench(bench);
        if (app.got_subcommand("train")) rc = examoe::app::run_train(app, train);
        if (app.got_subcommand("inspect")) rc = examoe::app::run_inspect(inspect);
        if (app.got_subcommand("eval")) rc = examoe::app::run_eval(eval);
        if (app.got_subcommand("generate")) rc = examoe::app::run_generate(generate);
      }
    } catch (const std::exception& e) {
      // A bounded message whatever an error quotes.
      std::fprintf(stderr, "examoe: error on rank %d: %s\n", rank, examoe::clip_for_message(e.what(), 16384).c_str());
      rc = 1;
    }
  }
  if (own_kokkos) Kokkos::finalize();
  MPI_Finalize();
  return rc;
}
