#pragma once
// Fault injection for tests of the fault handling (docs/faults.md). Off unless the
// environment variable EXAMOE_FAULT names faults when examoe::train() starts; off, every hook
// is one test of a global flag at its call site:
//
//   if (impl::fault::armed()) impl::fault::at_step();
//
// EXAMOE_FAULT = FAULT[,FAULT...], FAULT = KIND[:KEY=VALUE|:FLAG]...
//   nan / inf   step=A[-B] [rank=R] [where=grad|loss]   a NaN / +Inf in a gradient element
//               (or the loss) of rank R (default every rank) at steps A..B
//   hang        rank=R step=S [phase=LABEL] [seconds=T]  rank R sleeps (T s, default forever)
//               before the first collective of step S labelled LABEL (default: any label;
//               LABEL must be one of collective_labels())
//   kill        rank=R step=S                            raise(SIGKILL) on rank R in the middle
//               of step S (after forward and backward, before the gradient-norm allreduce)
//   kill        rank=R checkpoint_write [step=S]         raise(SIGKILL) on rank R while it
//               writes a checkpoint (of step S; default the first), after the parameters
//   fill        rank=R checkpoint_write [step=S]         rank R fills the file system of the
//               checkpoint (a file examoe-fault-fill.<pid> beside it, up to 1 GiB, left there)
//               at the same point: a disk that runs full during the write
// Steps are numbered from 1, as in the progress lines ("step 30" = the 30th step).
#include <string>
#include <vector>

namespace examoe::impl::fault {

extern bool g_armed;
/// True while faults are armed (between arm() and disarm()).
inline bool armed() noexcept { return g_armed; }

/// Arms the faults of `spec` (the EXAMOE_FAULT syntax above; "" disarms). Throws
/// examoe::Error naming the problem for a malformed spec. Returns the spec, normalised.
std::string arm(const std::string& spec);
/// arm(getenv("EXAMOE_FAULT")), or disarm() when it is unset or empty.
std::string arm_from_env();
/// Throws examoe::Error naming a fault armed now that can never fire in a run of
/// `world_size` ranks and `steps` steps: a rank outside [0, world_size), a step beyond
/// `steps`. (An unknown phase is refused by arm() itself: phase must be a collective label.)
void check_reachable(int world_size, long long steps);
/// Every label a collective carries (impl::CollectiveLabel), the values phase= accepts.
const std::vector<std::string>& collective_labels();
/// The labels at_collective() saw since arm() (how a test keeps collective_labels() true).
std::vector<std::string> labels_seen();
void disarm() noexcept;

/// Where the caller is: its rank in the training communicator and the step in progress
/// (1-based; 0 = not in a step). Set by train() at the start of every step.
void set_context(int rank, long long step) noexcept;

/// Hooks, called only when armed().
void at_collective(const char* label);  ///< hang
void at_step();                         ///< kill at a step
/// kill, or fill the file system, while writing the checkpoint file `path`
void at_checkpoint_write(const std::string& path);
/// nan/inf: true (and `value` set to NaN or +Inf) when a fault poisons `where` ("grad" or
/// "loss") on this rank at this step.
bool poison(const char* where, double& value);

}  // namespace examoe::impl::fault
