#pragma once
// Collective agreement idioms: every rank learns the same outcome, so no rank is left waiting
// in a collective that the others skipped because of an error only they saw.
#include <examoe/comm.hpp>
#include <examoe/error.hpp>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace examoe::impl {

/// Runs `fn` on every rank of `comm` and agrees on its outcome: an examoe::Error thrown on any
/// rank is thrown on every rank (the lowest failing rank's message, with `prefix` in front of
/// it). Returns what `fn` returns. Collective over `comm`: every rank must call it.
template <class F>
auto agree(Communicator& comm, F&& fn, const std::string& prefix = std::string()) -> decltype(fn()) {
  using R = decltype(fn());
  std::string err;
  if constexpr (std::is_void_v<R>) {
    try {
      std::forward<F>(fn)();
    } catch (const Error& e) {
      err = prefix + e.what();
    }
    throw_if_any(comm, err);
  } else {
    R result{};
    try {
      result = std::forward<F>(fn)();
    } catch (const Error& e) {
      err = prefix + e.what();
    }
    throw_if_any(comm, err);
    return result;
  }
}

/// Replaces `s` on every rank by rank `root`'s string (collective over `comm`).
void broadcast_string(Communicator& comm, std::string& s, int root = 0);

/// One named setting of a configuration compared between ranks.
struct NamedValue {
  std::string name, value;
};

/// Throws on every rank, naming each differing field of each rank against rank 0, when the
/// `fields` are not identical on every rank of `comm`. One allreduce of a hash when they
/// agree (the common case); the details are exchanged only when they do not. The message is
/// "`context`: the `what` differs between ranks (every rank must pass the same `what`):
/// rank R has NAME = V (rank 0: W), ...". Collective over `comm`.
void check_same_on_every_rank(Communicator& comm, const std::vector<NamedValue>& fields,
                              const std::string& context, const std::string& what);

}  // namespace examoe::impl
