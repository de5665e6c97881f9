#pragma once
#include <stdexcept>
#include <string>

namespace examoe {

/// Every error ExaMoE raises. Messages start with the function that detected the problem,
/// e.g. "examoe::MoELayer::MoELayer: top_k (5) exceeds num_experts (4)". Errors that depend
/// on data one rank saw are agreed over the communicator first, so every rank throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace examoe
