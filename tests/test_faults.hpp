#pragma once
// Helpers of the fault tests (test_faults.cpp, test_faults_nonfinite.cpp).
#include "test_util.hpp"

#include <examoe/train.hpp>

#include <cstdlib>
#include <string>

namespace examoe::test {

/// Sets EXAMOE_FAULT on every rank for one scope.
struct FaultEnv {
  explicit FaultEnv(const std::string& spec) { setenv("EXAMOE_FAULT", spec.c_str(), 1); }
  ~FaultEnv() { unsetenv("EXAMOE_FAULT"); }
};

inline std::string shared_dir(const std::string& tag) { return make_shared_dir("faults", tag); }
inline void remove_dir(const std::string& d) { remove_shared_dir(d); }

inline examoe::TrainConfig tiny(const std::string& dir) {
  examoe::TrainConfig c = tiny_train_config();
  c.train.steps = 8;
  c.train.warmup = 2;
  c.train.seed = 5;
  c.checkpoint.dir = dir;
  c.checkpoint.keep = 10;
  return c;
}

}  // namespace examoe::test
