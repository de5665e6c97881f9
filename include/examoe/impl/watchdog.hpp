#pragma once
// Watchdog for hung collectives (docs/faults.md).
//
// Off (timeout 0), MpiCommunicator makes the usual blocking MPI calls. On, every collective is
// started as its non-blocking MPI-3 form and polled with MPI_Test against a deadline, on the
// calling thread (ExaMoE never owns MPI_Init, so it assumes no more than MPI_THREAD_SINGLE and
// starts no helper thread). A rank whose collective misses the deadline asks every other member
// of that communicator, on a private duplicate of it, which collective call it is in; ranks
// that are polling a collective themselves (of any communicator) answer at once. Members that
// never entered the call, answered or not, are the ranks that did not arrive. One rank prints
// one message naming the collective's label and those ranks, then MPI_Abort(MPI_COMM_WORLD)
// ends the job.
#include <mpi.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace examoe::impl {

/// Names the collectives issued in the current scope ("moe.dispatch", "fsdp.allgather",
/// "optimizer.clip", ...), so that a watchdog report says what was stuck. RAII and nesting:
/// the previous label comes back at the end of the scope. `label` must outlive the scope
/// (a string literal). Costs two pointer stores.
class CollectiveLabel {
 public:
  explicit CollectiveLabel(const char* label) noexcept;
  ~CollectiveLabel();
  CollectiveLabel(const CollectiveLabel&) = delete;
  CollectiveLabel& operator=(const CollectiveLabel&) = delete;
  /// The innermost label in scope, nullptr when none.
  static const char* current() noexcept;

 private:
  const char* prev_;
};

/// Deadline in seconds of every collective of every MpiCommunicator of this process; 0 (the
/// library's default) = off: blocking MPI calls. examoe::train() sets it from
/// parallel.watchdog_seconds for its duration.
double watchdog_seconds() noexcept;
void set_watchdog_seconds(double seconds);
/// How long a rank that timed out waits for the other ranks' answers: half the deadline,
/// at least 1 s and at most 10 s.
double watchdog_grace_seconds() noexcept;

/// Sets the deadline for a scope and restores the previous one after.
class ScopedWatchdogSeconds {
 public:
  explicit ScopedWatchdogSeconds(double seconds) : prev_(watchdog_seconds()) {
    set_watchdog_seconds(seconds);
  }
  ~ScopedWatchdogSeconds() { set_watchdog_seconds(prev_); }
  ScopedWatchdogSeconds(const ScopedWatchdogSeconds&) = delete;
  ScopedWatchdogSeconds& operator=(const ScopedWatchdogSeconds&) = delete;

 private:
  double prev_;
};

/// Exit code the watchdog passes to MPI_Abort.
constexpr int kWatchdogAbortCode = 4;
/// After the report, how long MPI_Abort may take to end the job before the reporting process
/// exits by itself with kWatchdogAbortCode (MPI_Abort need not return).
constexpr double kWatchdogExitGraceSeconds = 5.0;
/// The process manager forwards a rank's output asynchronously, and an abort that follows the
/// write at once can end the job before the report is forwarded (seen with MPICH's mpiexec under
/// load). So the reporting process first waits until the process manager has read its stdout and
/// stderr (wait_until_output_read), at most kWatchdogReportReadSeconds, and then another
/// kWatchdogReportDrainSeconds for the report to travel on before it calls MPI_Abort.
constexpr double kWatchdogReportReadSeconds = 10.0;
constexpr double kWatchdogReportDrainSeconds = 1.0;

/// Waits until whoever reads the pipe or socket behind `fd` (the process manager, for stdout and
/// stderr under mpiexec) has read everything written to it: polls the bytes still queued (Linux's
/// FIONREAD for pipes, SIOCOUTQ for sockets) every millisecond for at most `max_seconds`.
/// Returns true when none are left. Files, terminals and other systems return true at once: a
/// write to them is done when write() returns.
bool wait_until_output_read(int fd, double max_seconds) noexcept;

/// What one rank said about itself when asked (or when it asked).
struct WatchdogPeerState {
  bool heard = false;           ///< answered or asked during the grace period
  bool asked = false;           ///< timed out itself (sent a question)
  std::uint64_t calls = 0;      ///< collectives it has entered on this communicator
  bool in_collective = false;   ///< polling one of this communicator's collectives now
  std::string label, op;        ///< what it is blocked in (any communicator), "" if nothing
};

/// The verdict of a timed-out rank over the answers it got: the ranks (of the communicator)
/// that did not enter call `call`, and the report's text. Pure (tested without MPI).
struct WatchdogReport {
  std::vector<int> missing;
  std::string message;
};
WatchdogReport watchdog_report(const char* label, const char* op, std::uint64_t call, int size,
                               int me, double seconds, const std::map<int, WatchdogPeerState>& peers,
                               const std::vector<int>& world_ranks);

struct WatchdogMessage;

/// One communicator's watchdog state: the call counter and a private duplicate of the
/// communicator that carries the watchdog's questions and answers. Owned by MpiCommunicator.
class WatchdogChannel {
 public:
  /// Duplicates `comm` (collective over it).
  explicit WatchdogChannel(MPI_Comm comm);
  ~WatchdogChannel();
  WatchdogChannel(const WatchdogChannel&) = delete;
  WatchdogChannel& operator=(const WatchdogChannel&) = delete;

  /// Counts collective `op` (an MPI function name) as the next call on this communicator and
  /// runs the fault-injection hook. Returns true when the watchdog is on: then start the
  /// non-blocking form and pass its request to wait(); otherwise make the blocking call.
  bool begin(const char* op);
  /// Polls `req` until it completes, answering other ranks' questions meanwhile. When the
  /// deadline passes, finds the ranks that did not arrive, prints one report and calls
  /// MPI_Abort: it never returns then. Returns MPI_Test's error code (MPI_SUCCESS).
  int wait(MPI_Request& req);
  /// wait() for a collective started earlier by begin(op) under `label`: the report names it
  /// (another collective may have begun since). Its verdict counts the calls entered so far, so
  /// callers start nothing else on this communicator before they wait.
  int wait_started(MPI_Request& req, const char* op, const char* label) {
    op_ = op;
    label_ = label;
    return wait(req);
  }
  std::uint64_t calls() const { return calls_; }

 private:
  friend struct WatchdogRegistry;
  [[noreturn]] void timed_out(MPI_Request& req, double seconds);
  /// MPI_Abort with kWatchdogAbortCode, and an exit of this process if that does not end it.
  [[noreturn]] void end_job();
  void receive(const WatchdogMessage& m, int source);
  MPI_Comm comm_ = MPI_COMM_NULL;  ///< the communicator the collectives run on (not owned)
  MPI_Comm wd_ = MPI_COMM_NULL;    ///< private duplicate for watchdog messages (owned)
  int rank_ = 0, size_ = 1;
  std::uint64_t calls_ = 0;
  bool in_collective_ = false;
  const char* op_ = "";
  const char* label_ = nullptr;
  std::map<int, WatchdogPeerState> heard_;  ///< filled while this channel's rank times out
};

}  // namespace examoe::impl
