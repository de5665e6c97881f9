#include <examoe/error.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/impl/watchdog.hpp>
#include <examoe/mesh.hpp>

#include <vector>

namespace examoe {

Mesh::Mesh(MPI_Comm comm, int ep, const CommOptions& opts) {
  impl::CollectiveLabel label("mesh.setup");
  using Space = Kokkos::DefaultExecutionSpace;
  constexpr bool device = impl::kc::device_memory_v<Space>;
  void* stream = impl::kc::native_stream(Space());
  world_ = make_communicator(comm, opts, device, stream);
  world_size_ = world_->size();
  world_rank_ = world_->rank();
  const int want = ep == 0 ? world_size_ : ep;
  std::string err;
  if (want < 0 || want > world_size_ || world_size_ % want != 0)
    err = "examoe::Mesh: ep = " + std::to_string(ep) + " must divide the world size " +
          std::to_string(world_size_) + " (world = dp x ep; ep = 0 means the whole world)";
  throw_if_any(*world_, err);
  // Every rank must use the same ep.
  std::vector<std::int32_t> all(static_cast<std::size_t>(world_size_));
  const std::int32_t mine = want;
  world_->allgather(&mine, all.data(), 1, DataType::i32);
  for (int r = 0; r < world_size_; ++r)
    if (all[r] != all[0])
      err = "examoe::Mesh: ep differs between ranks (" + std::to_string(all[0]) + " on rank 0, " +
            std::to_string(all[r]) + " on rank " + std::to_string(r) + ")";
  throw_if_any(*world_, err);
  ep_size_ = want;
  dp_size_ = world_size_ / ep_size_;
  MPI_Comm ep_comm = MPI_COMM_NULL, edp_comm = MPI_COMM_NULL;
  MPI_Comm_split(world_->mpi_comm(), world_rank_ / ep_size_, world_rank_, &ep_comm);
  MPI_Comm_split(world_->mpi_comm(), world_rank_ % ep_size_, world_rank_, &edp_comm);
  ep_ = make_communicator(ep_comm, opts, device, stream);    // duplicates
  edp_ = make_communicator(edp_comm, opts, device, stream);
  MPI_Comm_free(&ep_comm);
  MPI_Comm_free(&edp_comm);
}

}  // namespace examoe
