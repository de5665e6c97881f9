// The `examoe` command: one binary, one subcommand per job.
#include "bench.hpp"
#include "train_cmd.hpp"
#include "inspect_cmd.hpp"

#include <examoe/examoe.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <mpi.h>

#include <cstdio>

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
    try {
      app.parse(argc, argv);
      // Kokkos starts only for real work: --help and --version run on nodes without a GPU.
      // On GPUs: one device per rank, by node-local rank (or EXAMOE_DEVICE_ID).
      own_kokkos = examoe::initialize_kokkos(MPI_COMM_WORLD);
      if (app.got_subcommand("bench")) rc = examoe::app::run_bench(bench);
      if (app.got_subcommand("train")) rc = examoe::app::run_train(app, train);
      if (app.got_subcommand("inspect")) rc = examoe::app::run_inspect(inspect);
      if (app.got_subcommand("eval")) rc = examoe::app::run_eval(eval);
    } catch (const CLI::ParseError& e) {
      // Every rank parses the same arguments; only rank 0 prints.
      if (rank == 0) rc = app.exit(e);
      else rc = e.get_exit_code();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "examoe: error on rank %d: %s\n", rank, e.what());
      rc = 1;
    }
  }
  if (own_kokkos) Kokkos::finalize();
  MPI_Finalize();
  return rc;
}
