// Fault injection (include/examoe/impl/fault.hpp, docs/faults.md).
#include <examoe/error.hpp>
#include <examoe/impl/fault.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace examoe::impl::fault {

bool g_armed = false;

namespace {

enum class Kind { nan, inf, hang, kill, fill };

struct Fault {
  Kind kind = Kind::nan;
  int rank = -1;                     ///< -1: every rank
  long long first = -1, last = -1;   ///< steps (1-based, inclusive); -1: any
  std::string phase;                 ///< hang: collective label ("" = any)
  double seconds = 0;                ///< hang: 0 = forever
  std::string where = "grad";        ///< nan/inf
  bool checkpoint_write = false;     ///< kill, fill
  long long fired_step = -1;         ///< hang/kill: fire once per step
};

std::vector<Fault> g_faults;
std::string g_spec;              ///< the spec armed, for messages
std::set<std::string> g_seen;    ///< labels at_collective() saw
int g_rank = -1;
long long g_step = 0;

[[noreturn]] void bad(const std::string& spec, const std::string& why) {
  throw Error("examoe: EXAMOE_FAULT='" + clip_for_message(spec) + "': " + clip_for_message(why, 2000) +
              " (syntax: docs/faults.md, e.g. kill:rank=1:step=30 or nan:step=5:rank=0)");
}

long long to_ll(const std::string& spec, const std::string& key, const std::string& v) {
  try {
    std::size_t pos = 0;
    const long long x = std::stoll(v, &pos);
    if (pos == v.size() && x >= 0) return x;
  } catch (const std::exception&) {
  }
  bad(spec, key + " must be a non-negative integer, got '" + v + "'");
}

bool step_matches(const Fault& f) {
  return g_step > 0 && (f.first < 0 || (g_step >= f.first && g_step <= f.last));
}
bool rank_matches(const Fault& f) { return f.rank < 0 || f.rank == g_rank; }

void say(const std::string& what) {
  std::fprintf(stderr, "examoe: fault injection: rank %d, step %lld: %s\n", g_rank, g_step, what.c_str());
  std::fflush(stderr);
}

}  // namespace

std::string arm(const std::string& spec) {
  std::vector<Fault> faults;
  std::string norm;
  std::stringstream all(spec);
  std::string one;
  while (std::getline(all, one, ',')) {
    if (one.empty()) continue;
    std::stringstream parts(one);
    std::string kind;
    std::getline(parts, kind, ':');
    Fault f;
    if (kind == "nan") f.kind = Kind::nan;
    else if (kind == "inf") f.kind = Kind::inf;
    else if (kind == "hang") f.kind = Kind::hang;
    else if (kind == "kill") f.kind = Kind::kill;
    else if (kind == "fill") f.kind = Kind::fill;
    else bad(spec, "unknown fault '" + kind + "' (nan, inf, hang, kill or fill)");
    std::string kv;
    while (std::getline(parts, kv, ':')) {
      const auto eq = kv.find('=');
      const std::string key = kv.substr(0, eq), val = eq == std::string::npos ? "" : kv.substr(eq + 1);
      if (key == "checkpoint_write" && eq == std::string::npos) {
        if (f.kind != Kind::kill && f.kind != Kind::fill) bad(spec, "checkpoint_write applies to kill and fill only");
        f.checkpoint_write = true;
      } else if (eq == std::string::npos) {
        bad(spec, "'" + kv + "' is not KEY=VALUE");
      } else if (key == "rank") {
        f.rank = static_cast<int>(to_ll(spec, key, val));
      } else if (key == "step") {
        const auto dash = val.find('-');
        f.first = to_ll(spec, key, val.substr(0, dash));
        f.last = dash == std::string::npos ? f.first : to_ll(spec, key, val.substr(dash + 1));
        if (f.first < 1 || f.last < f.first) bad(spec, "step must be N or A-B with 1 <= A <= B");
      } else if (key == "phase" && f.kind == Kind::hang) {
        const auto& labels = collective_labels();
        if (std::find(labels.begin(), labels.end(), val) == labels.end()) {
          std::string all;
          for (const auto& l : labels) all += (all.empty() ? "" : ", ") + l;
          bad(spec, "phase '" + val + "' is no collective's label, so the fault would never fire (labels: " + all + ")");
        }
        f.phase = val;
      } else if (key == "seconds" && f.kind == Kind::hang) {
        f.seconds = static_cast<double>(to_ll(spec, key, val));
      } else if (key == "where" && (f.kind == Kind::nan || f.kind == Kind::inf)) {
        if (val != "grad" && val != "loss") bad(spec, "where must be grad or loss");
        f.where = val;
      } else {
        bad(spec, "unknown key '" + key + "' for " + kind);
      }
    }
    if ((f.kind == Kind::hang || f.kind == Kind::kill || f.kind == Kind::fill) && f.rank < 0)
      bad(spec, kind + " needs rank=R");
    if (f.kind == Kind::fill && !f.checkpoint_write) bad(spec, "fill needs checkpoint_write");
    if (f.first < 0 && !((f.kind == Kind::kill || f.kind == Kind::fill) && f.checkpoint_write))
      bad(spec, kind + " needs step=N");
    faults.push_back(f);
    norm += (norm.empty() ? "" : ",") + one;
  }
  g_faults = faults;
  g_spec = spec;
  g_seen.clear();
  g_armed = !g_faults.empty();
  g_rank = -1;
  g_step = 0;
  return norm;
}

const std::vector<std::string>& collective_labels() {
  // Every impl::CollectiveLabel in src/ (InputErrors.FaultPhasesAreCollectiveLabels runs
  // training steps, checkpoints, a resume and rebalancing, and checks what it sees is here).
  static const std::vector<std::string> labels = {
      "checkpoint.read", "checkpoint.resume", "checkpoint.write", "experts.grad_allreduce",
      "fsdp.allgather", "fsdp.reduce_scatter", "mesh.setup", "model.check_batch",
      "moe.backward", "moe.combine", "moe.combine_bwd", "moe.config_check",
      "moe.dispatch", "moe.dispatch_bwd", "moe.migrate", "moe.plan",
      "moe.router", "moe.router_grad", "optimizer.clip", "train.count_targets",
      "train.eval", "train.metrics"};
  return labels;
}

std::vector<std::string> labels_seen() { return {g_seen.begin(), g_seen.end()}; }

void check_reachable(int world_size, long long steps) {
  for (const Fault& f : g_faults) {
    if (f.rank >= world_size)
      bad(g_spec, "rank=" + std::to_string(f.rank) + " is outside this run's ranks [0, " + std::to_string(world_size) +
                      "), so the fault would never fire");
    if (f.first > steps)
      bad(g_spec, "step=" + std::to_string(f.first) + " is beyond train.steps = " + std::to_string(steps) +
                      ", so the fault would never fire");
  }
}

std::string arm_from_env() {
  const char* v = std::getenv("EXAMOE_FAULT");
  if (!v || !*v) {
    disarm();
    return {};
  }
  return arm(v);
}

void disarm() noexcept {
  g_armed = false;
  g_faults.clear();
  g_rank = -1;
  g_step = 0;
}

void set_context(int rank, long long step) noexcept {
  g_rank = rank;
  g_step = step;
}

void at_collective(const char* label) {
  if (label) g_seen.insert(label);
  for (Fault& f : g_faults) {
    if (f.kind != Kind::hang || !rank_matches(f) || !step_matches(f) || f.fired_step == g_step) continue;
    if (!f.phase.empty() && (!label || f.phase != label)) continue;
    f.fired_step = g_step;
    say(std::string("hangs before collective '") + (label ? label : "(no label)") + "'" +
        (f.seconds > 0 ? " for " + std::to_string(static_cast<long long>(f.seconds)) + " s" : std::string(" forever")));
    if (f.seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(f.seconds));
    else
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(3600));
  }
}

void at_step() {
  for (Fault& f : g_faults)
    if (f.kind == Kind::kill && !f.checkpoint_write && rank_matches(f) && step_matches(f)) {
      say("SIGKILL in the middle of the step");
      std::raise(SIGKILL);
    }
}

void at_checkpoint_write(const std::string& path) {
  for (Fault& f : g_faults) {
    if (!f.checkpoint_write || !rank_matches(f) || !(f.first < 0 || step_matches(f))) continue;
    if (f.kind == Kind::kill) {
      say("SIGKILL while writing a checkpoint");
      std::raise(SIGKILL);
    }
    if (f.kind == Kind::fill && f.fired_step != g_step) {
      f.fired_step = g_step;
      // Another job fills the disk: a file beside the checkpoint, written until the file
      // system refuses (at most 1 GiB), left in place.
      const std::size_t slash = path.rfind('/');
      const std::string filler = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) +
                                 "/examoe-fault-fill." + std::to_string(static_cast<long>(::getpid()));
      const int fd = ::open(filler.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      long long written = 0;
      if (fd >= 0) {
        std::vector<char> block(1 << 16, 'x');
        for (std::size_t n = block.size(); n >= 512 && written < (1LL << 30);) {
          const ssize_t w = ::write(fd, block.data(), n);
          if (w > 0) written += w;
          else n /= 2;
        }
        ::close(fd);
      }
      say("filled the file system of the checkpoint with " + filler + " (" + std::to_string(written) + " bytes)");
    }
  }
}

bool poison(const char* where, double& value) {
  for (const Fault& f : g_faults)
    if ((f.kind == Kind::nan || f.kind == Kind::inf) && f.where == where && rank_matches(f) && step_matches(f)) {
      value = f.kind == Kind::nan ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
      say(std::string(f.kind == Kind::nan ? "NaN" : "+Inf") + " injected into the " +
          (std::strcmp(where, "loss") == 0 ? "loss" : "gradient"));
      return true;
    }
  return false;
}

}  // namespace examoe::impl::fault
