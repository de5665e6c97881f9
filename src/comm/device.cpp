#include <examoe/comm.hpp>
#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/kokkos_compat.hpp>

#include <cstdlib>
#include <string>

namespace examoe {

NodeLocal node_local(MPI_Comm comm) {
  MPI_Comm node = MPI_COMM_NULL;
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    throw Error("examoe::node_local: MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) failed");
  NodeLocal n;
  MPI_Comm_rank(node, &n.rank);
  MPI_Comm_size(node, &n.size);
  MPI_Comm_free(&node);
  return n;
}

int device_for_rank(MPI_Comm comm, int num_devices) {
  const NodeLocal n = node_local(comm);  // collective: every rank calls it, GPU or not
  std::string err;
  int id = num_devices > 0 ? n.rank % num_devices : -1;
  const char* env = std::getenv("EXAMOE_DEVICE_ID");
  if (env != nullptr) {
    // Checked on every build, the CPU build included (where a well-formed id is unused): a
    // script that sets it wrong fails the same everywhere.
    const std::string v = env;
    const bool digits = !v.empty() && v.size() <= 9 && v.find_first_not_of("0123456789") == std::string::npos;
    if (!digits)
      err = "examoe: EXAMOE_DEVICE_ID='" + clip_for_message(v) + "' is not a device id: it must be a non-negative " +
            "integer such as 0 or 3, at most 9 digits (unset it to pick devices by node-local rank)";
    else if (num_devices > 0 && std::stoi(v) >= num_devices)
      err = "examoe: EXAMOE_DEVICE_ID='" + v + "' is not a device id in [0, " + std::to_string(num_devices) + ")";
    else if (num_devices > 0)
      id = std::stoi(v);
  }
  // The variable may be set differently per rank: agree, so every rank reports it.
  auto c = make_mpi_communicator(comm);
  throw_if_any(*c, err);
  return id;
}

bool initialize_kokkos(MPI_Comm comm) {
  if (Kokkos::is_initialized()) return false;
  const bool kokkos_env = std::getenv("KOKKOS_DEVICE_ID") != nullptr ||
                          std::getenv("KOKKOS_MAP_DEVICE_ID_BY") != nullptr;
  const int id = device_for_rank(comm, kokkos_env ? 0 : impl::kc::num_devices());
  return impl::kc::initialize_if_needed(-1, id);
}

}  // namespace examoe
