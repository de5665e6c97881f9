// Memory limits (train.memory_limit: auto from the physical or cgroup memory shared by the
// node's ranks, off, or a size) and the check of a config's estimated need against them.
#include "train/resources.hpp"

#include <examoe/device.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

namespace examoe {
namespace impl {

std::string human_bytes(double b) {
  const char* u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    ++i;
  }
  char s[32];
  std::snprintf(s, sizeof s, "%.1f %s", b, u[i]);
  return s;
}

std::size_t peak_rss_bytes() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<std::size_t>(ru.ru_maxrss) * 1024;
}

}  // namespace impl

namespace {
/// The cgroup memory limit of this process (v2 or v1), 0 if none or unreadable.
double cgroup_memory_limit() {
  for (const char* path : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    std::string v;
    if (in >> v && !v.empty() && v != "max") {
      try {
        const double b = std::stod(v);
        if (b > 0 && b < 1e18) return b;  // v1 reports "unlimited" as ~2^63
      } catch (const std::exception&) {
      }
    }
  }
  return 0;
}

}  // namespace

bool parse_memory_size(const std::string& text, std::size_t& bytes) {
  std::size_t pos = 0;
  double x = 0;
  try {
    x = std::stod(text, &pos);
  } catch (const std::exception&) {
    return false;
  }
  std::string unit = text.substr(pos);
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  static const std::pair<const char*, double> units[] = {
      {"", 1},           {"B", 1},
      {"KB", 1e3},       {"MB", 1e6},           {"GB", 1e9},           {"TB", 1e12},
      {"K", 1024.0},     {"M", 1048576.0},      {"G", 1073741824.0},   {"T", 1099511627776.0},
      {"KiB", 1024.0},   {"MiB", 1048576.0},    {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  for (const auto& [name, scale] : units)
    if (unit == name) {
      const double b = x * scale;
      if (!std::isfinite(b) || b < 0 || b >= 1.8e19) return false;
      bytes = static_cast<std::size_t>(b);
      return true;
    }
  return false;
}

std::size_t memory_limit_bytes(const std::string& setting, MPI_Comm comm, std::string* how) {
  std::size_t bytes = 0;
  if (setting == "off") {
    if (how) *how = "train.memory_limit = off";
    return 0;
  }
  if (setting != "auto") {
    if (!parse_memory_size(setting, bytes))
      throw Error("examoe::TrainConfig: train.memory_limit must be auto, off or a size such as 8GiB, 512MiB or 2e9 (got " +
                  setting + ")");
    if (how) *how = "train.memory_limit = " + setting;
    return bytes;
  }
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  const double phys = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
  const double cg = cgroup_memory_limit();
  const double node = cg > 0 && (phys <= 0 || cg < phys) ? cg : phys;
  const int local = node_local(comm).size;
  if (node <= 0) {
    if (how) *how = "train.memory_limit = auto, but the physical memory is unknown: not checked";
    return 0;
  }
  bytes = static_cast<std::size_t>(node / local);
  if (how)
    *how = "train.memory_limit = auto: " + impl::human_bytes(node) + (node == cg ? " cgroup limit" : " physical memory") +
           " shared by " + std::to_string(local) + (local == 1 ? " rank" : " ranks") + " on this node";
  return bytes;
}

namespace impl {

namespace {
/// The estimate against the limit, on this rank; throws the refusal naming the estimate's parts.
void check_memory_here(const TrainConfig& cfg, Mesh& mesh, long long rows, std::size_t scalar_bytes,
                       const HeldData& data) {
  std::string how;
  const std::size_t limit = memory_limit_bytes(cfg.train.memory_limit, mesh.world().mpi_comm(), &how);
  const MemoryReport m = estimate_memory(cfg.model, cfg.parallel, mesh.world_size(), mesh.ep_size(), rows, scalar_bytes,
                                         cfg.train.micro_batches);
  const std::size_t need = m.total() > SIZE_MAX - data.bytes ? SIZE_MAX : m.total() + data.bytes;
  if (limit > 0 && need > limit) {
    auto hb = [](std::size_t b) {
      return human_bytes(static_cast<double>(b)) + " (" + std::to_string(b) + " bytes)";
    };
    const auto per_rank = (cfg.model.num_experts + mesh.ep_size() - 1) / mesh.ep_size();
    std::ostringstream os;
    os << "examoe::train: this config needs about " << hb(need) << " of memory per rank, but "
       << hb(limit) << " are available per rank (" << how << "). Estimate: local experts "
       << human_bytes(static_cast<double>(m.experts)) << " (model.num_experts = " << cfg.model.num_experts
       << " over ep = " << mesh.ep_size() << ": up to " << per_rank << " per rank) + their gradients "
       << human_bytes(static_cast<double>(m.expert_grads)) << " + AdamW moments "
       << human_bytes(static_cast<double>(m.optimizer)) << "; dense shards "
       << human_bytes(static_cast<double>(3 * m.dense_shard)) << " with gradients and decay mask; gathered units "
       << human_bytes(static_cast<double>(m.gathered_peak + m.grad_buffer)) << "; activations and buffers for "
       << rows << " tokens "
       << (cfg.train.micro_batches > 1 ? "(the larger of a micro-batch, train.micro_batches = " +
                                             std::to_string(cfg.train.micro_batches) + ", and the validation share) "
                                       : std::string())
       << human_bytes(static_cast<double>(m.activations) + static_cast<double>(m.buffers));
    if (data.bytes > 0) os << "; " << data.what << " " << hb(data.bytes) << ", held whole by every rank";
    os << ". Reduce model.num_experts, model.d_hidden, model.d_model or train.batch, raise parallel.ep to "
          "spread the experts or train.micro_batches to split each rank's batch"
       << (data.bytes > 0 ? ", use less data" : "") << ", or set train.memory_limit.";
    throw Error(os.str());
  }
}
}  // namespace

void check_memory(const TrainConfig& cfg, Mesh& mesh, long long rows, std::size_t scalar_bytes,
                  const HeldData& data) {
  agree(mesh.world(), [&] { check_memory_here(cfg, mesh, rows, scalar_bytes, data); });
}

}  // namespace impl
}  // namespace examoe
