// The NCCL backend of examoe::Communicator (built with ExaMoE_ENABLE_NCCL). Reached through
// examoe::make_communicator(comm, {CommBackend::nccl}, ...); declared here so comm.cpp can build
// it without including NCCL or CUDA headers.
#pragma once
#include <examoe/comm.hpp>

#include <memory>

namespace examoe::impl {

/// NCCL communicator over a duplicate of `comm`: the unique id comes from rank 0 over MPI,
/// then ncclCommInitRank on the current CUDA device (Kokkos' device). Device-memory collectives
/// run on `stream` (a cudaStream_t, the caller's Kokkos::Cuda instance's stream; nullptr means
/// the legacy default stream, which Kokkos >= 4 does not use). Control collectives and
/// host-memory data go over MPI. Throws examoe::Error on every rank when it cannot be built
/// (no NCCL in this build, no GPU, NCCL init failure).
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, void* stream);

}  // namespace examoe::impl
