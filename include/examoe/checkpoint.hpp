#pragma once
#include <examoe/checkpoint_dir.hpp>
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>
#include <examoe/train.hpp>

#include <mpi.h>

#include <cstddef>
#include <string>
#include <vector>

namespace examoe {

/// Version of the checkpoint layout (docs/checkpoint-format.md). A reader refuses others.
/// 2: the file starts with a 512-byte header (the HDF5 user block) holding a checksum of the
/// whole file, verified before HDF5 reads a byte of it.
constexpr int kCheckpointFormatVersion = 2;
/// Size of the header in front of the HDF5 data (the HDF5 user block).
constexpr std::size_t kCheckpointHeaderBytes = 512;

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
  std::vector<std::vector<double>> router_bias;      ///< [layer][expert] (router.bias_rate > 0)
  std::string run_id;  ///< the run that wrote it (header line `run`); "" = unknown (older file)
};

/// Writes `path` collectively (parallel HDF5, MPI-IO): every tensor in global order, dense
/// parameters from their FSDP shards, experts as [E][...] from their owners, AdamW moments in
/// the same layout, config, step, placement and cumulative tokens per expert. Written to
/// `path + ".tmp"` and renamed only when complete: an existing file is never damaged.
/// `opt` holds one tensor per row of `model.param_table()` (AdamW tensor i is row i: the
/// dense units, then per layer the expert tensors w1, w2(, w3)), as the trainer registers
/// them; each row is one dataset per group. `run_id` goes into the header ("" = none).
/// Refused before anything is written (examoe::Error on every rank) when a parameter or
/// moment is not finite or a second moment is negative (find_bad_checkpoint_state). A failed
/// write (disk full, I/O error) is agreed by every rank and names the cause the file system
/// gave ("No space left on device"); the partial temporary file is removed, the HDF5 file
/// closed on every rank, and existing checkpoints are untouched.
template <class S>
void save_checkpoint(const std::string& path, Model<S>& model, const AdamW<S>& opt,
                     const TrainConfig& cfg, long long step,
                     const std::vector<std::vector<long long>>& tokens_per_expert,
                     const std::string& placement_history_json = "[]",
                     const std::vector<std::vector<double>>& expert_load_ema = {},
                     const std::string& run_id = "");

/// Collective over the model's world: the first parameter or AdamW moment (in the order of
/// the checkpoint: /params, /adam_m, /adam_v; lowest rank first) that is NaN or infinite, or
/// second moment that is negative, as "params/lm_head[3][7] = inf"; "" if all are fine.
template <class S>
std::string find_bad_checkpoint_state(Model<S>& model, const AdamW<S>& opt);

/// Restores parameters, AdamW moments and step count from `path` into a model of the same
/// shape on any mesh. Errors (missing, truncated, corrupt, other format version, other model
/// shape or precision, a NaN or infinite parameter or moment, a negative second moment) are
/// examoe::Error on every rank, naming the problem (and the tensor and element). Returns the info.
template <class S>
CheckpointInfo load_checkpoint(const std::string& path, Model<S>& model, AdamW<S>& opt,
                               const TrainConfig& cfg);

/// Reads the metadata only (collective over `comm`).
CheckpointInfo read_checkpoint_info(const std::string& path, MPI_Comm comm);

/// Whole-file integrity (docs/checkpoint-format.md, "Header"). seal_checkpoint_file writes
/// the header of a closed checkpoint file: format version, file size and the checksum of
/// every byte after the header, computed in parallel by the ranks of `comm` (chunks of
/// kCheckpointChecksumChunk bytes, so the result does not depend on the rank count). Tools
/// that edit a checkpoint with HDF5 call it again afterwards. verify_checkpoint_file checks
/// all of that and throws examoe::Error on every rank, naming the file and the problem
/// (missing, not a regular file, no ExaMoE header, other format version, truncated or
/// extended, checksum mismatch); the readers call it before handing the file to HDF5, so a
/// damaged file never reaches HDF5's parser. Both collective over `comm`. The header's
/// `run` line is `run_id`, or with "" the one the file's header already has (so a tool that
/// edits and seals a checkpoint keeps its run id).
constexpr std::size_t kCheckpointChecksumChunk = std::size_t(1) << 26;
void seal_checkpoint_file(const std::string& path, MPI_Comm comm, const std::string& run_id = "");
void verify_checkpoint_file(const std::string& path, MPI_Comm comm);

/// What the header of a file says, read with plain POSIX calls (no HDF5, no MPI, only the
/// first 512 bytes): whether it starts like an ExaMoE checkpoint, and the id of the run that
/// wrote it ("" when the header has none: a checkpoint written before run ids, or not a
/// checkpoint). Nothing is verified (verify_checkpoint_file does that).
struct CheckpointHeaderPeek {
  bool is_checkpoint = false;
  std::string run_id;
};
CheckpointHeaderPeek peek_checkpoint_header(const std::string& path);

}  // namespace examoe
