// The watchdog fires on rank 0 while every other rank already sits in MPI_Finalize (rank 0
// enters one collective more than the others). MPICH's MPI_Abort may then never return; the
// job must still end within a bounded grace after the report, with the watchdog's exit code.
// Run by tests/faults/watchdog_after_finalize.sh, which checks the exit code and the time.
#include <examoe/impl/watchdog.hpp>

#include <mpi.h>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  examoe::impl::set_watchdog_seconds(2);
  // "split": the collective is on a sub-communicator of ranks {0, 1} (as the expert-parallel
  // group of a dp x ep mesh); the other ranks are not in it.
  const bool split = argc > 1 && std::string(argv[1]) == "split";
  MPI_Comm comm = MPI_COMM_WORLD;
  if (split) MPI_Comm_split(MPI_COMM_WORLD, rank < 2 ? 0 : 1, rank, &comm);
  {
    examoe::impl::WatchdogChannel channel(comm);
    if (rank == 0) {
      examoe::impl::CollectiveLabel label("test.one_more_collective");
      MPI_Request req = MPI_REQUEST_NULL;
      channel.begin("MPI_Ibarrier");
      MPI_Ibarrier(comm, &req);
      channel.wait(req);  // the others never come: the watchdog reports and ends the job
      std::fprintf(stderr, "rank 0: the barrier completed, which it cannot\n");
      return 2;
    }
  }
  MPI_Finalize();
  return 0;
}
