// Collective agreement idioms shared by every unit (impl/agree.hpp).
#include <examoe/impl/agree.hpp>

#include <cstdint>

namespace examoe::impl {

void broadcast_string(Communicator& comm, std::string& s, int root) {
  std::uint64_t len = s.size();
  comm.broadcast(&len, sizeof len, root);
  s.resize(static_cast<std::size_t>(len));
  if (len > 0) comm.broadcast(s.data(), s.size(), root);
}

namespace {

std::uint64_t fields_hash(const std::vector<NamedValue>& fields) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a 64 over "name=value\n" lines
  auto add = [&h](const std::string& s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  };
  for (const auto& f : fields) {
    add(f.name);
    add("=");
    add(f.value);
    add("\n");
  }
  return h;
}

/// The fields as "name\0value\0" pairs, and back.
std::string pack(const std::vector<NamedValue>& fields) {
  std::string s;
  for (const auto& f : fields) s += f.name + '\0' + f.value + '\0';
  return s;
}
std::vector<NamedValue> unpack(const std::string& s) {
  std::vector<NamedValue> out;
  std::size_t at = 0;
  while (at < s.size()) {
    const std::size_t a = s.find('\0', at), b = a == std::string::npos ? a : s.find('\0', a + 1);
    if (b == std::string::npos) break;
    out.push_back({s.substr(at, a - at), s.substr(a + 1, b - a - 1)});
    at = b + 1;
  }
  return out;
}

/// This rank's differences from rank 0's `ref`: "name = mine (rank 0: theirs), ...".
std::string differences(const std::vector<NamedValue>& mine, const std::vector<NamedValue>& ref) {
  constexpr int kListed = 6;
  std::string diff;
  int ndiff = 0;
  for (std::size_t i = 0; i < mine.size() || i < ref.size(); ++i) {
    const std::string name = i < mine.size() ? mine[i].name : ref[i].name;
    const std::string a = i < ref.size() && ref[i].name == name ? ref[i].value : std::string("(none)");
    const std::string b = i < mine.size() ? mine[i].value : std::string("(none)");
    if (a == b) continue;
    if (++ndiff <= kListed)
      diff += std::string(diff.empty() ? "" : ", ") + name + " = " + clip_for_message(b, 40) + " (rank 0: " +
              clip_for_message(a, 40) + ")";
  }
  if (ndiff > kListed) diff += " and " + std::to_string(ndiff - kListed) + " more keys";
  return diff;
}

}  // namespace

void check_same_on_every_rank(Communicator& comm, const std::vector<NamedValue>& fields,
                              const std::string& context, const std::string& what) {
  // One allreduce: the minimum over ranks of (h, ~h) gives the smallest and (complemented)
  // largest hash; they are equal exactly when every rank has the same hash.
  const std::uint64_t h = fields_hash(fields);
  std::uint64_t mm[2] = {h, ~h};
  MPI_Allreduce(MPI_IN_PLACE, mm, 2, MPI_UINT64_T, MPI_MIN, comm.mpi_comm());
  if (mm[0] == ~mm[1]) return;
  // They differ: rank 0's values go to every rank, each rank lists its differences, and every
  // rank learns every rank's list.
  std::string root = pack(fields);
  broadcast_string(comm, root, 0);
  const std::string diff = differences(fields, unpack(root));
  const int P = comm.size();
  std::vector<int> lens(P), displs(P);
  int n = static_cast<int>(diff.size());
  MPI_Allgather(&n, 1, MPI_INT, lens.data(), 1, MPI_INT, comm.mpi_comm());
  int total = 0;
  for (int r = 0; r < P; ++r) {
    displs[r] = total;
    total += lens[r];
  }
  std::string all(static_cast<std::size_t>(total), '\0');
  MPI_Allgatherv(diff.data(), n, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, comm.mpi_comm());
  constexpr int kRanksListed = 8;
  std::string msg = context + ": the " + what + " differs between ranks (every rank must pass the same " + what + "): ";
  int listed = 0, ranks = 0;
  for (int r = 0; r < P; ++r) {
    if (lens[r] == 0) continue;
    ++ranks;
    if (++listed <= kRanksListed)
      msg += std::string(listed > 1 ? "; " : "") + "rank " + std::to_string(r) + " has " +
             all.substr(static_cast<std::size_t>(displs[r]), static_cast<std::size_t>(lens[r]));
  }
  if (ranks > kRanksListed) msg += "; and " + std::to_string(ranks - kRanksListed) + " more ranks";
  throw Error(msg);
}

}  // namespace examoe::impl
