#pragma once
// The checkpoint directory (docs/checkpoint-format.md, "The checkpoint directory"): file
// names, the newest checkpoint, pruning that only ever removes the run's own checkpoints,
// the lock a training run holds on the directory, and the check that no output overwrites a
// checkpoint or an input.
#include <examoe/comm.hpp>
#include <examoe/train.hpp>

#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

namespace examoe {

/// `dir`/step-<N>.h5, N with 8 digits.
std::string checkpoint_path(const std::string& dir, long long step);
/// Path of the newest complete checkpoint in `dir` ("" if none). Names: step-<N>.h5 (of any run).
std::string latest_checkpoint(const std::string& dir);
/// Every complete checkpoint in `dir` (names step-<N>.h5), as (step, path), newest first.
std::vector<std::pair<long long, std::string>> list_checkpoints(const std::string& dir);

/// A fresh run id: 64 random bits as decimal text, never "" or "0".
std::string new_run_id();

/// The temporary files (step-<N>.h5.tmp, regular files only) that interrupted writes left in
/// `dir`: those removed, and those that could not be, with the reason.
struct IncompleteCheckpoints {
  std::vector<std::string> removed;
  std::vector<std::pair<std::string, std::string>> kept;  ///< (path, why it was not removed)
};
/// Removes them (call on one rank, holding the directory's lock: nobody else writes there).
/// With `remove` false, only lists them (in `kept`, with `why_kept`), e.g. for a directory
/// this process cannot write.
IncompleteCheckpoints remove_incomplete_checkpoints(const std::string& dir, bool remove = true,
                                                    const std::string& why_kept = "");
/// Deletes all but the newest `keep` checkpoints of run `run_id` in `dir` (call on one rank).
/// Checkpoints of other runs, of unknown runs (no run id) and any other file are never
/// touched; an empty `run_id` removes nothing. Returns the paths removed.
std::vector<std::string> prune_checkpoints(const std::string& dir, int keep, const std::string& run_id);

/// Why writing `path` would destroy a file that must stay ("" if it may be written):
/// `path` (or `path + ".tmp"` when `temp_too`) is the same file (device and inode, so also
/// through links) as one of `inputs` (pairs of what it is, path), or is an existing ExaMoE
/// checkpoint, or would be one of the names the training run puts in `checkpoint_dir`
/// (step-<N>.h5, its .tmp, the lock). The text starts with the path, e.g.
/// "'ck.h5' is the checkpoint being read ('./ck.h5')".
std::string output_conflict(const std::string& path, const std::vector<std::pair<std::string, std::string>>& inputs,
                            bool temp_too = false, const std::string& checkpoint_dir = "");

/// Why `cfg.log.metrics` may not be appended to ("" if it may): it is the data file, the
/// checkpoint to resume from, an ExaMoE checkpoint, or a name the run uses in checkpoint.dir.
std::string metrics_output_conflict(const TrainConfig& cfg);
/// The end of the message of a run stopped on a non-finite step whose weights or moments are
/// themselves not finite (`bad`, from find_bad_checkpoint_state): no checkpoint is written,
/// and where the newest good one is (`newest`, "" if none).
std::string invalid_state_note(const std::string& bad, const std::string& newest);

/// The lock of a checkpoint directory: the file `dir`/examoe.lock, created with
/// O_CREAT | O_EXCL and holding the owner's host, pid and process start time. One process
/// takes it (rank 0 of a training run) and removes it when done (release() or the
/// destructor, so also when an error unwinds the run). A lock whose owner runs on this host
/// and no longer exists is stale and is taken over (acquire() says so in `note`).
class CheckpointLock {
 public:
  CheckpointLock() = default;
  CheckpointLock(const CheckpointLock&) = delete;
  CheckpointLock& operator=(const CheckpointLock&) = delete;
  ~CheckpointLock() { release(); }
  /// Takes the lock of the existing directory `dir`: "" when taken, else why not (held by
  /// another process, naming its host and pid, or the error creating the file). `errno_out`
  /// gets the errno of a failed creation (0 otherwise), so callers can tell a read-only
  /// directory from one that is locked.
  std::string acquire(const std::string& dir, std::string* note = nullptr, int* errno_out = nullptr);
  /// Removes the lock file if it is still this lock's (never another owner's).
  void release() noexcept;
  bool held() const { return !path_.empty(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_, token_;
};
/// `dir`/examoe.lock
std::string checkpoint_lock_path(const std::string& dir);

/// The checkpoint directory as one training run uses it (collective over `comm`; rank 0
/// touches the file system and the others follow its verdicts, so errors are the same on
/// every rank). Constructed before the run allocates its model:
/// - a new run (no `resume`) in a directory that already holds checkpoints is refused unless
///   `allow_existing`;
/// - the lock is taken at once when the run writes checkpoints at an interval or resumes
///   "latest" (the directory is created for the former), else before its first write (a
///   signal or a non-finite stop); a second job on the directory is refused;
/// - a fresh run id; a resumed run takes the id of its checkpoint (adopt_run_id).
class RunCheckpoints {
 public:
  RunCheckpoints(const CheckpointOptions& opt, Communicator& comm, std::ostream* log);
  ~RunCheckpoints();
  RunCheckpoints(const RunCheckpoints&) = delete;
  RunCheckpoints& operator=(const RunCheckpoints&) = delete;
  /// The checkpoint to resume from: `resume` itself, or for "latest" the newest checkpoint
  /// in the directory once the temporary files of interrupted writes are removed (with a
  /// note each, saying when one could not be removed). Throws on every rank if there is none.
  std::string resolve_resume(const std::string& resume);
  /// A resumed run keeps the id of its checkpoint; one without (written before run ids)
  /// keeps the fresh id. Same value on every rank.
  void adopt_run_id(const std::string& checkpoint_run_id);
  const std::string& run_id() const { return run_id_; }
  /// Before writing the checkpoint of `step`: takes the lock if not yet held, creates the
  /// directory, refuses to replace another run's checkpoint. Returns the path to write.
  std::string prepare_write(long long step);
  /// After a complete write: prunes this run's old checkpoints and removes the temporary
  /// files of interrupted writes (rank 0, notes to the log).
  void after_write();

 private:
  std::string take_lock(bool create_dir, int* errno_out = nullptr);
  const CheckpointOptions& opt_;
  Communicator& comm_;
  std::ostream* log_;
  CheckpointLock lock_;
  std::string run_id_;
  std::string unlocked_why_;  ///< why a run that resumes "latest" holds no lock (read-only)
  bool created_dir_ = false;
};

}  // namespace examoe
