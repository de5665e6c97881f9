// The checkpoint directory of a run: names, pruning of the run's own checkpoints, the
// directory lock, and the check that no output overwrites a checkpoint or an input
// (include/examoe/checkpoint_dir.hpp, docs/checkpoint-format.md "The checkpoint directory").
#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/random.hpp>

#include "io/checkpoint_dir_scan.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <ostream>
#include <random>
#include <sstream>

namespace examoe {

namespace {

using io::DirEntryKind;
constexpr const char* kLockName = io::kCheckpointLockName;

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_dirs(const std::string& dir) {
  std::string cur;
  for (std::size_t i = 0; i <= dir.size(); ++i) {
    if ((i == dir.size() || dir[i] == '/') && !cur.empty()) ::mkdir(cur.c_str(), 0755);
    if (i < dir.size()) cur += dir[i];
  }
}

std::string host_name() {
  char h[256] = {0};
  if (::gethostname(h, sizeof h - 1) != 0) return "unknown";
  return h;
}

/// Start time of process `pid` (field 22 of /proc/<pid>/stat, clock ticks since boot), 0 if
/// unknown. Together with the pid it names one process: a pid reused later has another.
unsigned long long process_start(long pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::size_t close = s.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(s.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return 0;
}

/// The owner a lock file names.
struct LockOwner {
  std::string host, token, since;
  long pid = 0;
  unsigned long long start = 0;
  std::string text;  ///< the whole file
};
LockOwner read_lock(const std::string& path) {
  LockOwner o;
  std::ifstream in(path, std::ios::binary);
  std::string buf(4096, '\0');  // a lock file is a few lines; never read more
  in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  buf.resize(static_cast<std::size_t>(in.gcount()));
  o.text = buf;
  std::istringstream lines(o.text);
  std::string line;
  while (std::getline(lines, line)) {
    const std::size_t sp = line.find(' ');
    if (sp == std::string::npos) continue;
    const std::string k = line.substr(0, sp), v = line.substr(sp + 1);
    if (k == "host") o.host = v.substr(0, 255);
    else if (k == "pid") o.pid = std::strtol(v.c_str(), nullptr, 10);
    else if (k == "start") o.start = std::strtoull(v.c_str(), nullptr, 10);
    else if (k == "token") o.token = v;
    else if (k == "since") o.since = v.substr(0, 64);
  }
  return o;
}

/// True unless `o` certainly ran on this host and is gone (no such pid, or the pid now
/// belongs to a process started at another time).
bool owner_may_live(const LockOwner& o) {
  if (o.host != host_name() || o.pid <= 0) return true;
  if (::kill(static_cast<pid_t>(o.pid), 0) != 0 && errno == ESRCH) return false;
  const unsigned long long now = process_start(o.pid);
  return !(o.start != 0 && now != 0 && now != o.start);
}

std::string describe(const LockOwner& o) {
  if (o.host.empty() || o.pid <= 0) return "an unknown owner (the lock file is empty or damaged)";
  return "pid " + std::to_string(o.pid) + " on host " + o.host + (o.since.empty() ? "" : " (since " + o.since + ")");
}

std::string now_text() {
  const std::time_t t = std::time(nullptr);
  char buf[64] = {0};
  std::tm tm{};
  ::localtime_r(&t, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace

// ------------------------------------------------------------------ the scanner

io::DirEntry io::classify_dir_entry(const std::string& name) {
  DirEntry e;
  e.name = name;
  if (name == kCheckpointLockName) {
    e.kind = DirEntryKind::lock;
    return e;
  }
  const std::string head = "step-", h5 = ".h5", tmp = ".h5.tmp";
  const bool temporary = name.size() >= tmp.size() && name.compare(name.size() - tmp.size(), tmp.size(), tmp) == 0;
  const std::string& tail = temporary ? tmp : h5;
  if (name.size() < head.size() + 8 + tail.size() || name.compare(0, head.size(), head) != 0 ||
      name.compare(name.size() - tail.size(), tail.size(), tail) != 0)
    return e;
  const std::string digits = name.substr(head.size(), name.size() - head.size() - tail.size());
  if (digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) return e;
  e.kind = temporary ? DirEntryKind::temporary : DirEntryKind::checkpoint;
  e.step = std::stoll(digits);
  return e;
}

std::vector<io::DirEntry> io::scan_checkpoint_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  std::vector<DirEntry> out;
  for (const auto& n : names) out.push_back(classify_dir_entry(n));
  return out;
}

// ------------------------------------------------------------------ names, pruning

std::string checkpoint_path(const std::string& dir, long long step) {
  char name[64];
  std::snprintf(name, sizeof name, "step-%08lld.h5", step);
  return dir.empty() ? std::string(name) : dir + "/" + name;
}

std::vector<std::pair<long long, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<long long, std::string>> all;
  for (const auto& e : io::scan_checkpoint_dir(dir))
    if (e.kind == DirEntryKind::checkpoint) all.emplace_back(e.step, dir + "/" + e.name);
  std::sort(all.rbegin(), all.rend());
  return all;
}

std::string latest_checkpoint(const std::string& dir) {
  const auto all = list_checkpoints(dir);
  return all.empty() ? std::string() : all.front().second;
}

std::string new_run_id() {
  std::uint64_t x = 0;
  try {
    std::random_device rd;
    x = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {  // no entropy source: time, pid and host still differ
  }
  x ^= static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  x = impl::splitmix64(x ^ (static_cast<std::uint64_t>(::getpid()) << 17));
  for (char c : host_name()) x = impl::splitmix64(x ^ static_cast<unsigned char>(c));
  return std::to_string(x == 0 ? 1 : x);
}

IncompleteCheckpoints remove_incomplete_checkpoints(const std::string& dir, bool remove, const std::string& why_kept) {
  IncompleteCheckpoints r;
  for (const auto& e : io::scan_checkpoint_dir(dir)) {
    if (e.kind != DirEntryKind::temporary) continue;
    const std::string p = dir + "/" + e.name;
    struct stat st;
    if (::lstat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;  // not a file a write left
    if (!remove) r.kept.emplace_back(p, why_kept);
    else if (::unlink(p.c_str()) == 0) r.removed.push_back(p);
    else r.kept.emplace_back(p, std::strerror(errno));
  }
  return r;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, int keep, const std::string& run_id) {
  std::vector<std::string> removed;
  if (run_id.empty()) return removed;
  int kept = 0;
  for (const auto& [step, path] : list_checkpoints(dir)) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (peek_checkpoint_header(path).run_id != run_id) continue;  // another run's, or unknown
    if (kept < std::max(keep, 1)) {
      ++kept;
      continue;
    }
    if (::unlink(path.c_str()) == 0) removed.push_back(path);
  }
  return removed;
}

// ------------------------------------------------------------------ outputs

std::string output_conflict(const std::string& path, const std::vector<std::pair<std::string, std::string>>& inputs,
                            bool temp_too, const std::string& checkpoint_dir) {
  std::vector<std::string> cands{path};
  if (temp_too) cands.push_back(path + ".tmp");
  for (const auto& c : cands) {
    struct stat so;
    if (::stat(c.c_str(), &so) != 0) continue;  // nothing there that could be destroyed
    const std::string who = "'" + path + "'" + (c == path ? "" : " (through its temporary file '" + c + "')");
    for (const auto& [what, p] : inputs) {
      struct stat si;
      if (!p.empty() && ::stat(p.c_str(), &si) == 0 && si.st_dev == so.st_dev && si.st_ino == so.st_ino)
        return who + " is " + what + " ('" + p + "')";
    }
    if (S_ISREG(so.st_mode) && peek_checkpoint_header(c).is_checkpoint) return who + " is an ExaMoE checkpoint";
  }
  if (!checkpoint_dir.empty()) {
    const std::size_t slash = path.rfind('/');
    const std::string parent = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    struct stat sp, sd;
    if (::stat(parent.c_str(), &sp) == 0 && ::stat(checkpoint_dir.c_str(), &sd) == 0 && sp.st_dev == sd.st_dev &&
        sp.st_ino == sd.st_ino &&
        io::classify_dir_entry(base).kind != DirEntryKind::other)
      return "'" + path + "' is a name the run's checkpoints use in checkpoint.dir '" + checkpoint_dir +
             "' (step-<N>.h5, step-<N>.h5.tmp, " + kLockName + ")";
  }
  return {};
}

std::string metrics_output_conflict(const TrainConfig& cfg) {
  std::vector<std::pair<std::string, std::string>> inputs = {{"the training data (data.path)", cfg.data.path}};
  if (cfg.checkpoint.resume != "latest")
    inputs.emplace_back("the checkpoint to resume from (checkpoint.resume)", cfg.checkpoint.resume);
  const std::string why = output_conflict(cfg.log.metrics, inputs, false, cfg.checkpoint.dir);
  if (why.empty()) return why;
  return "examoe::train: log.metrics " + why +
         ": refused, appending metrics to it would destroy it (no output may overwrite a checkpoint or an input; "
         "choose another log.metrics)";
}

std::string invalid_state_note(const std::string& bad, const std::string& newest) {
  return "; the weights or optimizer state are not finite themselves (" + bad +
         ": an earlier update overflowed, e.g. train.lr too large), so no checkpoint was written as the last "
         "good state" +
         (newest.empty() ? std::string("; this run has no earlier checkpoint")
                         : "; the newest earlier checkpoint is " + newest + " (resume with --resume " + newest + ")");
}

// ------------------------------------------------------------------ the lock

std::string checkpoint_lock_path(const std::string& dir) { return dir + "/" + kLockName; }

std::string CheckpointLock::acquire(const std::string& dir, std::string* note, int* errno_out) {
  release();
  if (errno_out) *errno_out = 0;
  const std::string path = checkpoint_lock_path(dir);
  const std::string token = new_run_id();
  const long me = static_cast<long>(::getpid());
  const std::string text = "examoe checkpoint directory lock\nhost " + host_name() + "\npid " + std::to_string(me) +
                           "\nstart " + std::to_string(process_start(me)) + "\ntoken " + token + "\nsince " +
                           now_text() + "\n";
  for (int attempt = 0; attempt < 3; ++attempt) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
      const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
      const int werr = errno;
      ::close(fd);
      if (!ok) {
        ::unlink(path.c_str());
        if (errno_out) *errno_out = werr;
        return "cannot write the lock file '" + path + "': " + std::strerror(werr);
      }
      path_ = path;
      token_ = token;
      return {};
    }
    if (errno != EEXIST) {
      if (errno_out) *errno_out = errno;
      return "cannot create the lock file '" + path + "': " + std::strerror(errno);
    }
    const LockOwner owner = read_lock(path);
    if (owner_may_live(owner))
      return "checkpoint.dir '" + dir + "' is locked by " + describe(owner) + " (lock file '" + path +
             "'): another job writes checkpoints there, and two jobs must not share a checkpoint directory "
             "(use another checkpoint.dir; if that job no longer runs, remove the lock file)";
    // Stale: its owner ran on this host and is gone. Move it aside and check that what was
    // moved is what was judged (another job may have taken it over in between).
    const std::string aside = path + ".stale-" + std::to_string(me);
    if (::rename(path.c_str(), aside.c_str()) != 0) {
      if (errno == ENOENT) continue;  // gone already: try again
      if (errno_out) *errno_out = errno;
      return "cannot take over the stale lock '" + path + "' of " + describe(owner) + ": " + std::strerror(errno);
    }
    if (read_lock(aside).text != owner.text) {
      if (::link(aside.c_str(), path.c_str()) == 0 || errno == EEXIST) ::unlink(aside.c_str());
      continue;
    }
    ::unlink(aside.c_str());
    if (note)
      *note = "took over the stale lock '" + path + "' of " + describe(owner) +
              ": that process no longer runs (a job that ended without removing it, e.g. killed)";
  }
  return "cannot take the lock '" + path + "': other jobs keep taking it";
}

void CheckpointLock::release() noexcept {
  if (path_.empty()) return;
  try {
    if (read_lock(path_).token == token_) ::unlink(path_.c_str());
  } catch (...) {
  }
  path_.clear();
  token_.clear();
}

// ------------------------------------------------------------------ one run's directory

RunCheckpoints::RunCheckpoints(const CheckpointOptions& opt, Communicator& comm, std::ostream* log)
    : opt_(opt), comm_(comm), log_(comm.rank() == 0 ? log : nullptr) {
  std::string err;
  std::uint64_t id = 0;
  if (comm_.rank() == 0) {
    id = std::stoull(new_run_id());
    const auto existing = opt_.resume.empty() && !opt_.allow_existing ? list_checkpoints(opt_.dir)
                                                                      : std::vector<std::pair<long long, std::string>>();
    if (!existing.empty()) {
      err = "examoe::train: checkpoint.dir '" + opt_.dir + "' already holds checkpoints (" +
            existing.front().second.substr(opt_.dir.size() + 1) +
            (existing.size() > 1 ? " and " + std::to_string(existing.size() - 1) + " more" : std::string()) +
            "); a new run there is refused, so that no checkpoint is lost: continue that run with "
            "--resume latest, choose another --checkpoint.dir, or start a new run beside them with "
            "--checkpoint.allow_existing true (a run never prunes or replaces checkpoints of another run)";
    } else if (opt_.interval > 0) {
      err = take_lock(true);
    } else if (opt_.resume == "latest" && is_dir(opt_.dir)) {
      int e = 0;
      const std::string why = take_lock(false, &e);
      if (!why.empty() && (e == EROFS || e == EACCES || e == EPERM)) {
        unlocked_why_ = std::string("the directory is not writable: ") + std::strerror(e);
        if (log_)
          *log_ << "  note: checkpoint.dir '" << opt_.dir << "' is not writable (" << std::strerror(e)
                << "): a checkpoint (on a signal or a non-finite stop) cannot be written there\n";
      } else {
        err = why;
      }
    }
  }
  if (!err.empty()) lock_.release();
  throw_if_any(comm_, err);
  comm_.broadcast(&id, sizeof id, 0);
  run_id_ = std::to_string(id);
}

RunCheckpoints::~RunCheckpoints() {
  lock_.release();
  if (created_dir_) ::rmdir(opt_.dir.c_str());  // only if still empty: nothing was written
}

std::string RunCheckpoints::take_lock(bool create_dir, int* errno_out) {
  if (create_dir && !is_dir(opt_.dir)) {
    make_dirs(opt_.dir);
    const int e = errno;
    struct stat st;
    if (::stat(opt_.dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
      return "examoe::train: cannot create checkpoint directory '" + opt_.dir + "': a file of that name exists";
    if (!is_dir(opt_.dir))
      return "examoe::train: cannot create checkpoint directory '" + opt_.dir + "': " + std::strerror(e);
    created_dir_ = true;
  }
  std::string note;
  const std::string why = lock_.acquire(opt_.dir, &note, errno_out);
  if (!note.empty() && log_) *log_ << "  note: " << note << "\n";
  return why.empty() ? why : "examoe::train: " + why;
}

std::string RunCheckpoints::resolve_resume(const std::string& resume) {
  if (resume != "latest") return resume;
  std::string path;
  if (comm_.rank() == 0) {
    const IncompleteCheckpoints inc = remove_incomplete_checkpoints(opt_.dir, lock_.held(), unlocked_why_);
    if (log_) {
      for (const auto& p : inc.removed)
        *log_ << "  note: ignored and removed " << p << ", left by an interrupted checkpoint write\n";
      for (const auto& [p, why] : inc.kept)
        *log_ << "  note: ignored " << p << ", left by an interrupted checkpoint write; it could not be removed ("
              << why << ")\n";
    }
    path = latest_checkpoint(opt_.dir);
  }
  impl::broadcast_string(comm_, path, 0);
  if (path.empty())
    throw Error("examoe::train: --resume latest: no checkpoint step-<N>.h5 in '" + opt_.dir + "'");
  return path;
}

void RunCheckpoints::adopt_run_id(const std::string& checkpoint_run_id) {
  if (!checkpoint_run_id.empty()) run_id_ = checkpoint_run_id;
}

std::string RunCheckpoints::prepare_write(long long step) {
  const std::string path = checkpoint_path(opt_.dir, step);
  std::string err;
  if (comm_.rank() == 0) {
    if (!lock_.held()) err = take_lock(true);
    struct stat st;
    if (err.empty() && ::lstat(path.c_str(), &st) == 0) {
      const CheckpointHeaderPeek h = S_ISREG(st.st_mode) ? peek_checkpoint_header(path) : CheckpointHeaderPeek{};
      if (!h.is_checkpoint)
        err = "examoe::train: '" + path + "' exists and is not a checkpoint: not replaced by the checkpoint of step " +
              std::to_string(step) + " (move it away or choose another checkpoint.dir)";
      else if (h.run_id != run_id_)
        err = "examoe::train: '" + path + "' is a checkpoint of another run (" +
              (h.run_id.empty() ? std::string("of unknown run id") : "run " + h.run_id) + "; this run is " + run_id_ +
              "): not replaced by this run's checkpoint of step " + std::to_string(step) +
              " (choose another checkpoint.dir)";
    }
  }
  throw_if_any(comm_, err);
  return path;
}

void RunCheckpoints::after_write() {
  if (comm_.rank() != 0) return;
  prune_checkpoints(opt_.dir, opt_.keep, run_id_);
  const IncompleteCheckpoints inc = remove_incomplete_checkpoints(opt_.dir);
  if (!log_) return;
  for (const auto& p : inc.removed) *log_ << "  note: removed " << p << ", left by an interrupted checkpoint write\n";
  for (const auto& [p, why] : inc.kept)
    *log_ << "  note: " << p << ", left by an interrupted checkpoint write, could not be removed (" << why << ")\n";
}

}  // namespace examoe
