#pragma once
#include <cstddef>
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

/// `text` as a message may quote it: whole when it has at most `max` bytes, else its first
/// `max` bytes and "... (N bytes)", so that a huge value (a 50 MB string in a config file)
/// never makes a huge message. Every message that echoes user input goes through it.
inline std::string clip_for_message(const std::string& text, std::size_t max = 200) {
  if (text.size() <= max) return text;
  return text.substr(0, max) + "... (" + std::to_string(text.size()) + " bytes)";
}

}  // namespace examoe
