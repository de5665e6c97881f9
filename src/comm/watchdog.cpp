// Watchdog for hung collectives: deadline polling, the question/answer exchange that finds
// the ranks that did not arrive, and the report (include/examoe/impl/watchdog.hpp).
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>
#include <examoe/impl/watchdog.hpp>

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/sockios.h>
#include <sys/ioctl.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace examoe::impl {

// ------------------------------------------------------------------ labels and settings
namespace {
thread_local const char* g_label = nullptr;
double g_seconds = 0;
}  // namespace

CollectiveLabel::CollectiveLabel(const char* label) noexcept : prev_(g_label) { g_label = label; }
CollectiveLabel::~CollectiveLabel() { g_label = prev_; }
const char* CollectiveLabel::current() noexcept { return g_label; }

double watchdog_seconds() noexcept { return g_seconds; }
void set_watchdog_seconds(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds))
    throw Error("examoe::set_watchdog_seconds: the deadline must be a finite number >= 0, got " +
                std::to_string(seconds));
  g_seconds = seconds;
}
double watchdog_grace_seconds() noexcept { return std::min(10.0, std::max(1.0, 0.5 * g_seconds)); }

// ------------------------------------------------------------------ messages
constexpr int kTag = 0x3E57;
enum : std::int32_t { kQuestion = 1, kAnswer = 2 };

/// Fixed-size, sent as bytes (the ranks of one job run the same binary).
struct WatchdogMessage {
  std::int32_t kind = 0;
  std::int32_t in_collective = 0;  ///< sender is polling a collective of this communicator
  std::uint64_t calls = 0;         ///< collectives the sender entered on this communicator
  char label[64] = {};             ///< what the sender is blocked in (any communicator)
  char op[32] = {};
};

namespace {
void copy_text(char* dst, std::size_t n, const char* src) {
  std::snprintf(dst, n, "%s", src ? src : "");
}
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

/// Live channels (single-threaded use, as the rest of the library) and the one this rank
/// is polling a collective of, if any: a rank blocked in one communicator's collective still
/// answers questions about every other communicator.
struct WatchdogRegistry {
  static std::vector<WatchdogChannel*>& channels() {
    static std::vector<WatchdogChannel*> v;
    return v;
  }
  static WatchdogChannel*& blocked() {
    static WatchdogChannel* b = nullptr;
    return b;
  }
  /// Receives every pending watchdog message of every channel; answers questions.
  static void service() {
    for (WatchdogChannel* ch : channels()) {
      for (;;) {
        int flag = 0;
        MPI_Status st;
        if (MPI_Iprobe(MPI_ANY_SOURCE, kTag, ch->wd_, &flag, &st) != MPI_SUCCESS || !flag) break;
        WatchdogMessage m;
        MPI_Recv(&m, sizeof m, MPI_BYTE, st.MPI_SOURCE, kTag, ch->wd_, MPI_STATUS_IGNORE);
        ch->receive(m, st.MPI_SOURCE);
      }
    }
  }
  static WatchdogMessage state_of(const WatchdogChannel& ch, std::int32_t kind) {
    WatchdogMessage m;
    m.kind = kind;
    m.in_collective = ch.in_collective_ ? 1 : 0;
    m.calls = ch.calls_;
    if (const WatchdogChannel* b = blocked()) {
      copy_text(m.label, sizeof m.label, b->label_ ? b->label_ : "(no label)");
      copy_text(m.op, sizeof m.op, b->op_);
    }
    return m;
  }
};

void WatchdogChannel::receive(const WatchdogMessage& m, int source) {
  WatchdogPeerState& p = heard_[source];
  p.heard = true;
  p.asked = p.asked || m.kind == kQuestion;
  p.calls = m.calls;
  p.in_collective = m.in_collective != 0;
  p.label.assign(m.label, strnlen(m.label, sizeof m.label));
  p.op.assign(m.op, strnlen(m.op, sizeof m.op));
  if (m.kind == kQuestion) {
    // Small and eager: completes without the asker having to do anything but poll.
    WatchdogMessage a = WatchdogRegistry::state_of(*this, kAnswer);
    MPI_Send(&a, sizeof a, MPI_BYTE, source, kTag, wd_);
  }
}

// ------------------------------------------------------------------ channel
WatchdogChannel::WatchdogChannel(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_rank(comm, &rank_);
  MPI_Comm_size(comm, &size_);
  if (MPI_Comm_dup(comm, &wd_) != MPI_SUCCESS)
    throw Error("examoe::WatchdogChannel: MPI_Comm_dup failed");
  WatchdogRegistry::channels().push_back(this);
}

WatchdogChannel::~WatchdogChannel() {
  auto& v = WatchdogRegistry::channels();
  v.erase(std::remove(v.begin(), v.end(), this), v.end());
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && wd_ != MPI_COMM_NULL) MPI_Comm_free(&wd_);
}

bool WatchdogChannel::begin(const char* op) {
  ++calls_;
  op_ = op;
  label_ = CollectiveLabel::current();
  if (fault::armed()) fault::at_collective(label_);
  return g_seconds > 0 && size_ > 1;
}

int WatchdogChannel::wait(MPI_Request& req) {
  const double seconds = g_seconds;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  auto next_service = start;
  in_collective_ = true;
  WatchdogChannel* const outer = WatchdogRegistry::blocked();
  WatchdogRegistry::blocked() = this;
  int rc = MPI_SUCCESS;
  for (unsigned spins = 0;; ++spins) {
    int done = 0;
    rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS || done) break;
    const auto now = Clock::now();
    if (now >= next_service) {  // questions from ranks that timed out, about any communicator
      WatchdogRegistry::service();
      next_service = now + std::chrono::milliseconds(1);
    }
    if (now >= deadline) timed_out(req, seconds);
    if (spins > 64) sched_yield();  // share oversubscribed cores with the ranks we wait for
  }
  in_collective_ = false;
  WatchdogRegistry::blocked() = outer;
  return rc;
}

void WatchdogChannel::timed_out(MPI_Request& req, double seconds) {
  // Ask every other member which call it is in; ranks polling a collective answer at once.
  const WatchdogMessage q = WatchdogRegistry::state_of(*this, kQuestion);
  std::vector<MPI_Request> sends;
  sends.reserve(static_cast<std::size_t>(size_));
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    sends.emplace_back();
    MPI_Isend(&q, sizeof q, MPI_BYTE, p, kTag, wd_, &sends.back());
  }
  const auto t_deadline = Clock::now();
  double finished_after = -1;  // the collective completed while we were asking around
  auto listen = [&](double s, bool until_all) {
    const auto t0 = Clock::now();
    while (since(t0) < s) {
      int done = 0;
      if (req != MPI_REQUEST_NULL) {  // keeps MPI progressing
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (done) finished_after = since(t_deadline);
      }
      WatchdogRegistry::service();
      if (until_all) {
        int n = 0;
        for (const auto& [r, st] : heard_) n += st.heard && r != rank_ ? 1 : 0;
        if (n == size_ - 1) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  listen(watchdog_grace_seconds(), true);

  // Ranks of this communicator in MPI_COMM_WORLD, when they differ (only on this path).
  std::vector<int> world;
  {
    MPI_Group g, wg;
    MPI_Comm_group(comm_, &g);
    MPI_Comm_group(MPI_COMM_WORLD, &wg);
    std::vector<int> mine(static_cast<std::size_t>(size_));
    for (int r = 0; r < size_; ++r) mine[r] = r;
    world.resize(mine.size());
    MPI_Group_translate_ranks(g, size_, mine.data(), wg, world.data());
    int wsize = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &wsize);
    if (wsize == size_ && world == mine) world.clear();
    MPI_Group_free(&g);
    MPI_Group_free(&wg);
  }
  WatchdogReport rep = watchdog_report(label_, op_, calls_, size_, rank_, seconds, heard_, world);
  if (finished_after >= 0) {
    char late[96];
    std::snprintf(late, sizeof late, "; the collective completed %.1f s after the deadline, too late", finished_after);
    rep.message.insert(rep.message.rfind("; aborting"), late);
  }
  // One report: the lowest rank that timed out in this same call prints it. The others give
  // it time to print and abort, and report themselves only if that does not happen.
  int reporter = rank_;
  for (const auto& [r, st] : heard_)
    if (st.asked && st.calls == calls_ && r < reporter) reporter = r;
  if (reporter != rank_) {
    listen(watchdog_grace_seconds() + 3.0, false);
    rep.message += " (rank " + std::to_string(reporter) + " timed out too but did not report)";
  }
  std::fprintf(stderr, "%s\n", rep.message.c_str());
  std::fflush(stderr);
  std::fflush(stdout);  // the last progress lines, too
  wait_until_output_read(STDERR_FILENO, kWatchdogReportReadSeconds);
  wait_until_output_read(STDOUT_FILENO, kWatchdogReportReadSeconds);
  std::this_thread::sleep_for(std::chrono::duration<double>(kWatchdogReportDrainSeconds));
  end_job();
}

bool wait_until_output_read(int fd, double max_seconds) noexcept {
#if defined(__linux__)
  struct stat st;
  if (fstat(fd, &st) != 0) return true;
  const bool pipe = S_ISFIFO(st.st_mode), socket = S_ISSOCK(st.st_mode);
  if (!pipe && !socket) return true;
  const auto start = Clock::now();
  for (;;) {
    int queued = 0;
    if (ioctl(fd, pipe ? FIONREAD : SIOCOUTQ, &queued) != 0) return true;  // cannot tell
    if (queued <= 0) return true;
    if (since(start) >= max_seconds) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
#else
  (void)fd;
  (void)max_seconds;
  return true;
#endif
}

void WatchdogChannel::end_job() {
  // MPI_Abort need not return: with MPICH it blocks for good when the other ranks already sit
  // in MPI_Finalize and the communicator is not the whole world. A thread that touches no MPI
  // ends this process after a bounded grace; the process manager then ends the others.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::duration<double>(kWatchdogExitGraceSeconds));
    std::fprintf(stderr, "examoe: watchdog: MPI_Abort did not end the job within %g s; exiting with code %d\n",
                 kWatchdogExitGraceSeconds, kWatchdogAbortCode);
    std::fflush(stderr);
    std::_Exit(kWatchdogAbortCode);
  }).detach();
  MPI_Abort(MPI_COMM_WORLD, kWatchdogAbortCode);
  std::_Exit(kWatchdogAbortCode);  // in case MPI_Abort returns
}

WatchdogReport watchdog_report(const char* label, const char* op, std::uint64_t call, int size,
                               int me, double seconds, const std::map<int, WatchdogPeerState>& peers,
                               const std::vector<int>& world_ranks) {
  WatchdogReport r;
  std::string details;
  for (int p = 0; p < size; ++p) {
    if (p == me) continue;
    auto it = peers.find(p);
    const bool heard = it != peers.end() && it->second.heard;
    if (heard && it->second.calls >= call) continue;  // entered this call (maybe left it)
    r.missing.push_back(p);
    if (heard) {
      const WatchdogPeerState& s = it->second;
      details += "; rank " + std::to_string(p) + " has entered only " + std::to_string(s.calls) +
                 " calls here and is blocked in '" + (s.label.empty() ? "?" : s.label) + "'" +
                 (s.op.empty() ? "" : " (" + s.op + ")");
    }
  }
  char secs[32];
  std::snprintf(secs, sizeof secs, "%g", seconds);
  std::string m = "examoe: watchdog: collective '" + std::string(label ? label : "(no label)") + "' (" +
                  op + ", call #" + std::to_string(call) + " on a communicator of " +
                  std::to_string(size) + " ranks) did not finish within " + secs + " s; ";
  auto list = [](const std::vector<int>& v) {
    std::string s;
    for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s;
  };
  if (r.missing.empty()) {
    m += "every rank entered it (stuck inside MPI: a network or MPI problem?)";
  } else {
    m += "ranks that did not arrive: " + list(r.missing);
    if (!world_ranks.empty()) {
      std::vector<int> w;
      for (int p : r.missing) w.push_back(world_ranks[p]);
      m += " (MPI_COMM_WORLD ranks " + list(w) + ")";
    }
  }
  m += details + "; reported by rank " + std::to_string(me);
  if (!world_ranks.empty()) m += " (MPI_COMM_WORLD rank " + std::to_string(world_ranks[me]) + ")";
  m += "; aborting";
  r.message = m;
  return r;
}

}  // namespace examoe::impl
