// Placement: expert -> (owner rank, local index). Pure host logic, no communication.
#include <examoe/error.hpp>
#include <examoe/placement.hpp>

#include <gtest/gtest.h>

#include <vector>

using examoe::Placement;

namespace {

/// Every invariant the header documents, checked against an owner table.
void check_consistent(const Placement& p, const std::vector<int>& owner, int P) {
  const int E = static_cast<int>(owner.size());
  ASSERT_EQ(p.num_experts(), E);
  ASSERT_EQ(p.num_ranks(), P);
  EXPECT_EQ(p.owners(), owner);

  // Local indices follow increasing global expert id on each rank.
  std::vector<int> count(P, 0);
  for (int e = 0; e < E; ++e) {
    EXPECT_EQ(p.owner(e), owner[e]) << "expert " << e;
    EXPECT_EQ(p.local_index(e), count[owner[e]]) << "expert " << e;
    ++count[owner[e]];
  }
  int offset = 0, max_local = 0;
  for (int r = 0; r < P; ++r) {
    EXPECT_EQ(p.num_local(r), count[r]) << "rank " << r;
    EXPECT_EQ(p.rank_offset(r), offset) << "rank " << r;
    offset += count[r];
    max_local = std::max(max_local, count[r]);
  }
  EXPECT_EQ(p.max_local(), max_local);

  // Keys: position in (owner, local index) order; global_expert inverts (owner, local).
  ASSERT_EQ(static_cast<int>(p.experts_by_key().size()), E);
  std::vector<int> seen(E, 0);
  for (int e = 0; e < E; ++e) {
    const int key = p.key(e);
    ASSERT_GE(key, 0);
    ASSERT_LT(key, E);
    ++seen[key];
    EXPECT_EQ(key, p.rank_offset(p.owner(e)) + p.local_index(e));
    EXPECT_EQ(p.experts_by_key()[key], e);
    EXPECT_EQ(p.global_expert(p.owner(e), p.local_index(e)), e);
  }
  for (int key = 0; key < E; ++key) EXPECT_EQ(seen[key], 1) << "key " << key;
  for (int r = 0; r < P; ++r)
    for (int l = 0; l < p.num_local(r); ++l) {
      const int e = p.global_expert(r, l);
      EXPECT_EQ(p.owner(e), r);
      EXPECT_EQ(p.local_index(e), l);
      if (l > 0) {
        EXPECT_LT(p.global_expert(r, l - 1), e) << "local order on rank " << r;
      }
    }
  // Keys sorted = grouped by rank, ascending.
  for (int key = 1; key < E; ++key)
    EXPECT_LE(p.owner(p.experts_by_key()[key - 1]), p.owner(p.experts_by_key()[key]));
}

}  // namespace

TEST(Placement, BalancedSixOverFour) {
  const Placement p = Placement::balanced(6, 4);
  const std::vector<int> owner{0, 0, 1, 1, 2, 3};
  check_consistent(p, owner, 4);
  EXPECT_EQ(p.num_local(0), 2);
  EXPECT_EQ(p.num_local(1), 2);
  EXPECT_EQ(p.num_local(2), 1);
  EXPECT_EQ(p.num_local(3), 1);
  EXPECT_EQ(p.max_local(), 2);
  EXPECT_EQ(p.rank_offset(3), 5);
  EXPECT_EQ(p.global_expert(1, 1), 3);
}

TEST(Placement, BalancedEightOverThree) {
  const Placement p = Placement::balanced(8, 3);
  check_consistent(p, {0, 0, 0, 1, 1, 1, 2, 2}, 3);
  EXPECT_EQ(p.max_local(), 3);
  EXPECT_EQ(p.global_expert(2, 0), 6);
}

TEST(Placement, BalancedOnePerRank) {
  const Placement p = Placement::balanced(4, 4);
  check_consistent(p, {0, 1, 2, 3}, 4);
  for (int e = 0; e < 4; ++e) {
    EXPECT_EQ(p.key(e), e);
    EXPECT_EQ(p.local_index(e), 0);
  }
  EXPECT_EQ(p.max_local(), 1);
}

TEST(Placement, BalancedSingleRankAndEvenSplit) {
  check_consistent(Placement::balanced(5, 1), {0, 0, 0, 0, 0}, 1);
  check_consistent(Placement::balanced(16, 4),
                   {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}, 4);
}

TEST(Placement, BalancedFewerExpertsThanRanksThrows) {
  EXPECT_THROW(Placement::balanced(3, 4), examoe::Error);
  EXPECT_THROW(Placement::balanced(0, 1), examoe::Error);
  try {
    Placement::balanced(2, 3);
    ADD_FAILURE() << "no exception";
  } catch (const examoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("examoe::Placement"), std::string::npos) << e.what();
  }
}

TEST(Placement, FromOwnersWithEmptyRank) {
  // rank 3 owns nothing; owners are not sorted.
  const std::vector<int> owner{2, 0, 2, 0, 1};
  const Placement p = Placement::from_owners(owner, 4);
  check_consistent(p, owner, 4);
  EXPECT_EQ(p.num_local(3), 0);
  EXPECT_EQ(p.num_local(0), 2);
  EXPECT_EQ(p.rank_offset(1), 2);
  EXPECT_EQ(p.rank_offset(2), 3);
  EXPECT_EQ(p.rank_offset(3), 5);
  EXPECT_EQ(p.experts_by_key(), (std::vector<int>{1, 3, 4, 0, 2}));
  EXPECT_EQ(p.key(0), 3);
  EXPECT_EQ(p.key(2), 4);
  EXPECT_EQ(p.local_index(3), 1);
  EXPECT_EQ(p.max_local(), 2);
}

TEST(Placement, FromOwnersAllOnOneRank) {
  const std::vector<int> owner{1, 1, 1, 1};
  const Placement p = Placement::from_owners(owner, 3);
  check_consistent(p, owner, 3);
  EXPECT_EQ(p.num_local(0), 0);
  EXPECT_EQ(p.num_local(1), 4);
  EXPECT_EQ(p.num_local(2), 0);
  EXPECT_EQ(p.rank_offset(1), 0);
  EXPECT_EQ(p.rank_offset(2), 4);
}

TEST(Placement, FromOwnersInvalidOwnerThrows) {
  EXPECT_THROW(Placement::from_owners({0, 4, 1}, 4), examoe::Error);
  EXPECT_THROW(Placement::from_owners({0, -1}, 2), examoe::Error);
  EXPECT_THROW(Placement::from_owners({0, 0}, 0), examoe::Error);
}

TEST(Placement, EqualityAndBalancedMatchesExplicit) {
  EXPECT_EQ(Placement::balanced(6, 4), Placement::from_owners({0, 0, 1, 1, 2, 3}, 4));
  EXPECT_NE(Placement::balanced(6, 4), Placement::from_owners({0, 0, 1, 1, 3, 2}, 4));
  // Same owners but a different rank count (rank 4 owns nothing) is a different placement.
  EXPECT_NE(Placement::from_owners({0, 1, 2, 3}, 4), Placement::from_owners({0, 1, 2, 3}, 5));
  EXPECT_FALSE(Placement::balanced(4, 2).to_string().empty());
}
