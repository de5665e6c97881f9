#pragma once
#include <examoe/comm.hpp>

#include <memory>
#include <string>

namespace examoe {

/// The data x expert process mesh over the caller's communicator (world = dp x ep).
/// World rank r sits at dp index r / ep and ep index r % ep: the ranks of one expert-parallel
/// group are consecutive (on one node when ranks are packed by node). The expert-data-parallel
/// group joins the ranks that hold the same experts in different replicas.
class Mesh {
 public:
  /// `ep` = expert-parallel degree; 0 means the whole world. Collective; throws
  /// examoe::Error on every rank when ep does not divide the world size or differs between ranks.
  /// `opts` picks the backend of the three communicators (auto: NCCL when this build has it
  /// and Kokkos' default execution space keeps its data on a GPU; its device collectives are
  /// ordered on the default execution-space instance's stream).
  Mesh(MPI_Comm comm, int ep = 0, const CommOptions& opts = CommOptions());

  Communicator& world() { return *world_; }
  Communicator& ep() { return *ep_; }
  Communicator& edp() { return *edp_; }
  /// The same communicators, for objects that share them (every MoE layer of a model).
  std::shared_ptr<Communicator> world_shared() const { return world_; }
  std::shared_ptr<Communicator> ep_shared() const { return ep_; }
  /// "mpi" or "nccl".
  std::string backend() const { return world_->backend(); }
  int world_size() const { return world_size_; }
  int world_rank() const { return world_rank_; }
  int dp_size() const { return dp_size_; }
  int ep_size() const { return ep_size_; }
  int dp_rank() const { return world_rank_ / ep_size_; }
  int ep_rank() const { return world_rank_ % ep_size_; }

 private:
  std::shared_ptr<Communicator> world_, ep_, edp_;
  int world_size_ = 1, world_rank_ = 0, dp_size_ = 1, ep_size_ = 1;
};

}  // namespace examoe
