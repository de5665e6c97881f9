// libFuzzer target: the config parser. Any JSON text goes through apply_json_config and
// TrainConfig::validate. The only allowed failure is examoe::Error; any other exception, a
// crash or a sanitizer report is a finding. Configs that pass must also round-trip through
// the key table (every key's text reads back to the same config) and give a memory estimate
// without overflow.
#include <examoe/error.hpp>
#include <examoe/model.hpp>
#include <examoe/train.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  examoe::TrainConfig cfg;
  try {
    examoe::apply_json_config(cfg, text, "fuzz.json");
  } catch (const examoe::Error&) {
    return 0;
  }
  bool valid = true;
  try {
    cfg.validate();
  } catch (const examoe::Error&) {
    valid = false;
  }
  // Every key's text reads back to the same config (also for invalid configs: the table must
  // print what it parsed).
  examoe::TrainConfig again;
  try {
    for (const auto& k : examoe::config_keys()) k.set(again, k.get(cfg));
  } catch (const examoe::Error& e) {
    std::fprintf(stderr, "a parsed config does not read back: %s\n", e.what());
    std::abort();
  }
  if (examoe::canonical_config(again) != examoe::canonical_config(cfg) ||
      examoe::config_hash(again) != examoe::config_hash(cfg)) {
    std::fprintf(stderr, "config round trip differs:\n%s\n---\n%s\n", examoe::canonical_config(cfg).c_str(),
                 examoe::canonical_config(again).c_str());
    std::abort();
  }
  if (valid) {
    // The estimate saturates, never wraps: it is at least each of its parts.
    for (int world : {1, 3, 64}) {
      const int ep = cfg.parallel.ep == 0 ? world : cfg.parallel.ep;
      const examoe::MemoryReport m = examoe::estimate_memory(cfg.model, cfg.parallel, world, ep,
                                                             static_cast<long long>(cfg.train.batch) * cfg.model.seq_len, 8);
      if (m.total() < m.experts || m.total() < m.activations || m.total() < m.optimizer || m.total() < m.buffers) {
        std::fprintf(stderr, "memory estimate wrapped around\n");
        std::abort();
      }
    }
  }
  return 0;
}
