#pragma once
// Memory a training or eval run may use (train.memory_limit) and the check against the
// estimate, before the model allocates anything. Private to src/train.
#include <examoe/mesh.hpp>
#include <examoe/train.hpp>

#include <cstddef>
#include <string>

namespace examoe::impl {

/// "12.3 MiB": bytes in binary units, one decimal.
std::string human_bytes(double b);
/// This process's peak resident set size (getrusage), in bytes.
std::size_t peak_rss_bytes();

/// Data every rank holds besides the model (a data file read whole, an eval input), counted
/// in the memory check before it is read.
struct HeldData {
  std::size_t bytes = 0;
  std::string what;  ///< for the message: "the data file 'F'"
};

/// Refuses, on every rank and before the model allocates anything, a config whose estimated
/// memory per rank exceeds train.memory_limit. `rows`: the most tokens a rank processes at once.
/// Collective over the mesh's world.
void check_memory(const TrainConfig& cfg, Mesh& mesh, long long rows, std::size_t scalar_bytes,
                  const HeldData& data = {});

}  // namespace examoe::impl
