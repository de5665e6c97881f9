#pragma once
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <string>
#include <vector>

namespace examoe {

/// Version of the checkpoint layout (docs/checkpoint-format.md). A reader refuses others.
constexpr int kCheckpointFormatVersion = 1;

/// What a checkpoint says about itself (read by any rank count, or without MPI peers).
struct CheckpointInfo {
  int format_version = 0;
  long long step = 0;            ///< optimizer steps done (training resumes at this step)
  std::string precision;         ///< float or double
  std::vector<std::pair<std::string, std::string>> config;  ///< every config key, as text
  int world_size = 0, dp = 0, ep = 0;                        ///< of the run that wrote it
  std::vector<std::vector<int>> placement;                   ///< [layer][expert] -> ep rank
  std::vector<std::vector<long long>> tokens_per_expert;     ///< [layer][expert], cumulative
  long long parameters = 0;
  std::string placement_history;  ///< JSON array of the migrations so far
  std::vector<std::vector<double>> expert_load_ema;  ///< [layer][expert], the rebalancer's input
};

/// Writes `path` collectively (parallel HDF5, MPI-IO): every tensor in global order, dense
/// parameters from their FSDP shards, experts as [E][...] from their owners, AdamW moments in
/// the same layout, config, step, placement and cumulative tokens per expert. Written to
/// `path + ".tmp"` and renamed only when complete: an existing file is never damaged.
/// `opt` must hold the dense unit shards first, then per layer the expert tensors w1, w2(, w3),
/// as the trainer registers them.
template <class S>
void save_checkpoint(const std::string& path, Model<S>& model, const AdamW<S>& opt,
                     const TrainConfig& cfg, long long step,
                     const std::vector<std::vector<long long>>& tokens_per_expert,
                     const std::string& placement_history_json = "[]",
                     const std::vector<std::vector<double>>& expert_load_ema = {});

/// Restores parameters, AdamW moments and step count from `path` into a model of the same
/// shape on any mesh. Errors (missing, truncated, corrupt, other format version, other model
/// shape or precision) are examoe::Error on every rank, naming the problem. Returns the info.
template <class S>
CheckpointInfo load_checkpoint(const std::string& path, Model<S>& model, AdamW<S>& opt,
                               const TrainConfig& cfg);

/// Reads the metadata only (collective over `comm`).
CheckpointInfo read_checkpoint_info(const std::string& path, MPI_Comm comm);

/// Path of the newest complete checkpoint in `dir` ("" if none). Names: step-<N>.h5.
std::string latest_checkpoint(const std::string& dir);
/// Deletes the temporary files (step-<N>.h5.tmp) that writes interrupted by a crash left in
/// `dir`; never taken for checkpoints, they only take space. Returns their paths (call on one
/// rank, when no checkpoint is being written).
std::vector<std::string> remove_incomplete_checkpoints(const std::string& dir);
/// Deletes all but the newest `keep` checkpoints in `dir` (call on one rank).
void prune_checkpoints(const std::string& dir, int keep);
std::string checkpoint_path(const std::string& dir, long long step);

}  // namespace examoe
