#pragma once
// The one scanner of a checkpoint directory (checkpoint_dir.cpp): what each name in it is to a
// training run, by name alone. Every caller that lists, prunes, cleans or protects the
// directory's files goes through it. Private to the checkpoint unit.
#include <string>
#include <vector>

namespace examoe::io {

/// What a name in a checkpoint directory is.
enum class DirEntryKind {
  checkpoint,  ///< step-<N>.h5 (N: 8 to 18 digits), a complete checkpoint of any run
  temporary,   ///< step-<N>.h5.tmp, a write in progress or one an interruption left
  lock,        ///< examoe.lock, the directory's lock
  other        ///< anything else (never touched)
};

struct DirEntry {
  std::string name;  ///< the name in the directory (no path)
  DirEntryKind kind = DirEntryKind::other;
  long long step = -1;  ///< checkpoint and temporary: N; else -1
};

/// The name of the directory's lock file.
constexpr char kCheckpointLockName[] = "examoe.lock";

/// What `name` (a name in a directory, no '/') is.
DirEntry classify_dir_entry(const std::string& name);
/// Every entry of `dir` but "." and "..", classified, sorted by name; empty if `dir` cannot be
/// read. By name only: callers that act on a file check what it is (lstat, its header).
std::vector<DirEntry> scan_checkpoint_dir(const std::string& dir);

}  // namespace examoe::io
