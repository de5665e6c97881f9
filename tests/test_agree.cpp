// The collective agreement idioms (impl/agree.hpp): run-and-agree, string broadcast and the
// same-settings-on-every-rank check, at every rank count: each rank must see the same outcome
// (the same value, or the same error), whichever rank failed.
#include "test_util.hpp"

#include <examoe/comm.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>

#include <string>
#include <vector>

namespace examoe::test {
namespace {

/// The message every rank caught from `fn` ("" when nothing was thrown).
template <class F>
std::string caught(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

TEST(Agree, ReturnsTheValueWhenNoRankFails) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int got = impl::agree(*comm, [] { return 42; });
  EXPECT_EQ(got, 42);
  int calls = 0;
  impl::agree(*comm, [&] { ++calls; });
  EXPECT_EQ(calls, 1);
}

TEST(Agree, TheLowestFailingRanksMessageIsThrownOnEveryRank) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = comm->size(), me = comm->rank();
  // Every rank but rank 0 fails with its own message (at one rank, rank 0 fails alone).
  const int lowest = P == 1 ? 0 : 1;
  const std::string msg = caught([&] {
    impl::agree(
        *comm, [&] {
          if (me >= lowest) throw Error("bad value on rank " + std::to_string(me));
          return 1;
        },
        "examoe::test::agree: ");
  });
  std::string want = "examoe::test::agree: bad value on rank " + std::to_string(lowest);
  if (P > 1) want += " [reported by rank " + std::to_string(lowest) + "]";
  EXPECT_EQ(msg, want);
  EXPECT_TRUE(all_ranks(msg == want)) << "some rank saw another outcome";
  // The communicator is still usable: every rank left the agreement together.
  EXPECT_EQ(impl::agree(*comm, [] { return 7; }), 7);
}

TEST(BroadcastString, RootsStringReachesEveryRank) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = comm->size(), me = comm->rank();
  const std::string with_nul("a\0b", 3);
  const std::string big(1 << 20, 'x');
  for (int root : {0, P - 1})
    for (const std::string& value : {std::string(), with_nul, big, std::string("step-00000042.h5")}) {
      std::string s = me == root ? value : std::string("something longer than the value, on rank ") +
                                                std::to_string(me);
      impl::broadcast_string(*comm, s, root);
      EXPECT_EQ(s.size(), value.size()) << "root " << root;
      EXPECT_TRUE(s == value) << "root " << root << ", " << value.size() << " bytes";
    }
}

TEST(SameOnEveryRank, IdenticalFieldsPassAndTheCommunicatorStaysUsable) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const std::vector<impl::NamedValue> f = {{"top_k", "2"}, {"router.temperature", "1"}};
  EXPECT_NO_THROW(impl::check_same_on_every_rank(*comm, f, "examoe::test", "config"));
  EXPECT_EQ(impl::agree(*comm, [] { return 3; }), 3);
}

TEST(SameOnEveryRank, EveryRankNamesEachDifferingFieldOfEachRank) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = comm->size(), me = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs two ranks to differ";
  // Rank r > 0 has top_k = 2 + r; the last rank also differs in the temperature.
  std::vector<impl::NamedValue> f = {{"d_model", "8"}, {"top_k", std::to_string(me == 0 ? 2 : 2 + me)},
                                     {"router.temperature", me == P - 1 && P > 2 ? "0.5" : "1"}};
  const std::string msg = caught([&] { impl::check_same_on_every_rank(*comm, f, "examoe::test", "MoE config"); });
  std::string want = "examoe::test: the MoE config differs between ranks (every rank must pass the same MoE config): ";
  for (int r = 1; r < P; ++r) {
    want += (r > 1 ? "; " : "") + std::string("rank ") + std::to_string(r) + " has top_k = " + std::to_string(2 + r) +
            " (rank 0: 2)";
    if (r == P - 1 && P > 2) want += ", router.temperature = 0.5 (rank 0: 1)";
  }
  EXPECT_EQ(msg, want);
  EXPECT_TRUE(all_ranks(msg == want));
}

TEST(SameOnEveryRank, ManyDifferencesAndMissingFieldsAreSummed) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const int P = comm->size(), me = comm->rank();
  if (P == 1) GTEST_SKIP() << "needs two ranks to differ";
  // Rank 1 differs in eight keys (six are listed) and lacks a ninth that rank 0 has.
  std::vector<impl::NamedValue> f;
  for (int i = 0; i < 8; ++i) f.push_back({"k" + std::to_string(i), me == 1 ? "x" : "y"});
  if (me != 1) f.push_back({"extra", "1"});
  const std::string msg = caught([&] { impl::check_same_on_every_rank(*comm, f, "examoe::test", "config"); });
  const std::string want = "examoe::test: the config differs between ranks (every rank must pass the same config): "
                           "rank 1 has k0 = x (rank 0: y), k1 = x (rank 0: y), k2 = x (rank 0: y), k3 = x (rank 0: y), "
                           "k4 = x (rank 0: y), k5 = x (rank 0: y) and 3 more keys";
  EXPECT_EQ(msg, want);
  EXPECT_TRUE(all_ranks(msg == want));
}

}  // namespace
}  // namespace examoe::test
