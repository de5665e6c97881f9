#pragma once
#include <mpi.h>

namespace examoe {

/// This rank's place among the ranks of `comm` that share its node (MPI_Comm_split_type with
/// MPI_COMM_TYPE_SHARED): what `srun --ntasks-per-node=4 --gpus-per-node=4` needs to give
/// each task its own GPU. Collective over `comm`.
struct NodeLocal {
  int rank = 0;  ///< 0 .. size-1, in the order of the ranks in `comm`
  int size = 1;  ///< ranks of `comm` on this node
};
NodeLocal node_local(MPI_Comm comm);

/// The GPU this rank should use, out of `num_devices` visible ones: the EXAMOE_DEVICE_ID
/// environment variable when set, else node-local rank modulo num_devices. -1 when
/// num_devices <= 0 (no GPU backend). Collective over `comm`.
int device_for_rank(MPI_Comm comm, int num_devices);

/// Initializes Kokkos unless the host code already did, on the GPU device_for_rank() picks (Kokkos'
/// own KOKKOS_DEVICE_ID / KOKKOS_MAP_DEVICE_ID_BY, when set, are left to Kokkos). Returns
/// true when this call initialized Kokkos; the caller then calls Kokkos::finalize(). Collective
/// over `comm`.
bool initialize_kokkos(MPI_Comm comm);

}  // namespace examoe
