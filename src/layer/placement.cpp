#include <examoe/error.hpp>
#include <examoe/placement.hpp>

#include <algorithm>
#include <set>
#include <sstream>

namespace examoe {

Placement Placement::balanced(int num_experts, int num_ranks) {
  if (num_ranks <= 0)
    throw Error("examoe::Placement::balanced: the number of ranks must be positive (got " +
                std::to_string(num_ranks) + ")");
  if (num_experts < num_ranks)
    throw Error("examoe::Placement::balanced: num_experts = " + std::to_string(num_experts) +
                " experts cannot be spread over " + std::to_string(num_ranks) +
                " expert-parallel ranks (every rank must own at least one expert); "
                "use at most " + std::to_string(num_experts) + " ranks or more experts");
  std::vector<int> owner(num_experts);
  const int base = num_experts / num_ranks, extra = num_experts % num_ranks;
  int e = 0;
  for (int r = 0; r < num_ranks; ++r)
    for (int i = 0; i < base + (r < extra ? 1 : 0); ++i) owner[e++] = r;
  return from_owners(owner, num_ranks);
}

Placement Placement::from_owners(const std::vector<int>& owner, int num_ranks) {
  if (num_ranks <= 0)
    throw Error("examoe::Placement::from_owners: the number of ranks must be positive");
  if (owner.empty()) throw Error("examoe::Placement::from_owners: the owner table is empty");
  Placement p;
  const int E = static_cast<int>(owner.size());
  p.owner_ = owner;
  p.local_.assign(E, 0);
  std::vector<int> count(num_ranks, 0);
  for (int e = 0; e < E; ++e) {
    const int r = owner[e];
    if (r < 0 || r >= num_ranks)
      throw Error("examoe::Placement::from_owners: expert " + std::to_string(e) +
                  " is assigned to rank " + std::to_string(r) + ", outside [0, " +
                  std::to_string(num_ranks) + ")");
    p.local_[e] = count[r]++;
  }
  p.rank_offset_.assign(num_ranks + 1, 0);
  for (int r = 0; r < num_ranks; ++r) p.rank_offset_[r + 1] = p.rank_offset_[r] + count[r];
  p.by_key_.assign(E, 0);
  for (int e = 0; e < E; ++e) p.by_key_[p.rank_offset_[owner[e]] + p.local_[e]] = e;
  p.max_local_ = *std::max_element(count.begin(), count.end());
  return p;
}

Placement Placement::rebalance_lpt(const std::vector<double>& load, int num_ranks) {
  const int E = static_cast<int>(load.size());
  if (num_ranks <= 0 || E < num_ranks)
    throw Error("examoe::Placement::rebalance_lpt: need at least as many experts as ranks (" +
                std::to_string(E) + " experts, " + std::to_string(num_ranks) + " ranks)");
  std::vector<int> order(E);
  for (int e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load[a] > load[b]; });
  // The least-loaded rank, ties to the lowest: the first of (load, rank); O(E log ranks).
  std::vector<double> rl(num_ranks, 0.0);
  std::set<std::pair<double, int>> by_load;
  std::set<int> empty;  // ranks without an expert yet
  for (int r = 0; r < num_ranks; ++r) {
    by_load.insert({0.0, r});
    empty.insert(r);
  }
  std::vector<int> owner(E, 0);
  int left = E;
  for (int e : order) {
    // Keep one expert for every rank that still has none while experts remain (an empty
    // rank's load is 0, so the lowest empty rank is the least loaded of them).
    const int best = left == static_cast<int>(empty.size()) ? *empty.begin() : by_load.begin()->second;
    owner[e] = best;
    by_load.erase({rl[best], best});
    rl[best] += load[e];
    by_load.insert({rl[best], best});
    empty.erase(best);
    --left;
  }
  return from_owners(owner, num_ranks);
}

double Placement::imbalance(const std::vector<double>& load) const {
  std::vector<double> rl(num_ranks(), 0.0);
  double sum = 0;
  for (int e = 0; e < num_experts(); ++e) {
    rl[owner_[e]] += load[e];
    sum += load[e];
  }
  const double mx = *std::max_element(rl.begin(), rl.end());
  return sum > 0 ? mx * num_ranks() / sum : 1.0;
}

std::string Placement::to_string() const {
  std::ostringstream os;
  for (int r = 0; r < num_ranks(); ++r) {
    os << "rank " << r << ":";
    for (int l = 0; l < num_local(r); ++l) os << ' ' << global_expert(r, l);
    os << '\n';
  }
  return os.str();
}

}  // namespace examoe
