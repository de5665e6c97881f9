// Writes the seed corpora and the JSON dictionary of the fuzz targets into <dir>:
//   <dir>/config/*.json       example configs (valid, and a few invalid ones)
//   <dir>/config.dict         every config key and section as a libFuzzer dictionary
//   <dir>/checkpoint/*.h5     a small valid checkpoint (the tiny model after one step)
//   <dir>/checkpoint/edit-*   edit programs for fuzz_checkpoint's edit mode
// Run from a fresh clone by `./cmake/dev.sh fuzz`; nothing binary is committed.
#include "common.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/impl/kokkos_compat.hpp>
#include <examoe/train.hpp>

#include <mpi.h>
#include <sys/stat.h>
#include <unistd.h>

#include <Kokkos_Core.hpp>

#include <cstdio>
#include <fstream>
#include <set>
#include <string>

namespace {
void write(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  MPI_Init(&argc, &argv);
  const bool own = examoe::impl::kc::initialize_if_needed();
  {
    const std::string dir = argv[1];
    ::mkdir(dir.c_str(), 0755);
    ::mkdir((dir + "/config").c_str(), 0755);
    ::mkdir((dir + "/checkpoint").c_str(), 0755);
    // Configs: the defaults as flat JSON, the tiny model nested, and a few bad ones.
    const examoe::TrainConfig defaults, tiny = examoe::fuzz::tiny();
    std::string flat = "{", nested = "{\"model\": {\"d_model\": 8, \"router\": {\"temperature\": 2.5}}, ";
    const auto& keys = examoe::config_keys();
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const auto& k = keys[i];
      const bool quoted = k.type == "TEXT" || k.type.find('|') != std::string::npos;
      const std::string v = quoted ? "\"" + k.get(defaults) + "\"" : k.get(defaults);
      flat += (i ? ", \"" : "\"") + k.name + "\": " + v;
    }
    flat += "}";
    nested += "\"train\": {\"steps\": 10, \"lr\": 1e-3, \"seed\": 18446744073709551615, \"memory_limit\": \"2GiB\"}, "
              "\"parallel\": {\"ep\": 2, \"reshard_after_forward\": false}}";
    write(dir + "/config/defaults.json", flat);
    write(dir + "/config/nested.json", nested);
    write(dir + "/config/unknown.json", "{\"model\": {\"d_modle\": 3}}");
    write(dir + "/config/types.json", "{\"train.steps\": \"many\", \"log.quiet\": [1], \"data.path\": null}");
    write(dir + "/config/ranges.json", "{\"model.top_k\": 9, \"train.lr\": -1, \"placement.ema\": 1.0}");
    // Dictionary: every key, its sections and its last component, and the JSON tokens.
    std::set<std::string> words = {"{", "}", "[", "]", ":", ",", "true", "false", "null", "\"auto\"", "\"off\"",
                                   "\"gelu\"", "\"swiglu\"", "\"float\"", "\"double\"", "1e308", "-0", "GiB"};
    for (const auto& k : keys) {
      words.insert("\"" + k.name + "\"");
      std::string rest = k.name;
      for (std::size_t p = rest.find('.'); p != std::string::npos; p = rest.find('.')) {
        words.insert("\"" + rest.substr(0, p) + "\"");
        rest = rest.substr(p + 1);
      }
      words.insert("\"" + rest + "\"");
    }
    std::string dict;
    for (const auto& w : words) {
      std::string esc;
      for (char c : w) esc += c == '"' ? std::string("\\\"") : std::string(1, c);
      dict += "\"" + esc + "\"\n";
    }
    write(dir + "/config.dict", dict);
    // The checkpoint: one step of the tiny model.
    examoe::TrainConfig c = tiny;
    c.checkpoint.dir = dir + "/checkpoint-work";
    c.checkpoint.interval = 1;
    examoe::train(c, MPI_COMM_SELF, nullptr);
    std::rename(examoe::checkpoint_path(c.checkpoint.dir, 1).c_str(), (dir + "/checkpoint/pristine.h5").c_str());
    ::rmdir(c.checkpoint.dir.c_str());
    // Edit programs (fuzz_checkpoint's edit mode): one per operation.
    for (int op = 0; op < 9; ++op) {
      std::string e = "EXAMOE-EDIT\n";
      e += static_cast<char>(op);
      e += std::string("\x03\x00\x05" "abcdefgh12345678", 19);
      write(dir + "/checkpoint/edit-" + std::to_string(op), e);
    }
    std::printf("seed corpora in %s: %zu config seeds, %zu dictionary words, checkpoint of %ld bytes, 9 edit programs\n",
                dir.c_str(), std::size_t(5), words.size(),
                static_cast<long>(std::ifstream(dir + "/checkpoint/pristine.h5", std::ios::ate | std::ios::binary).tellg()));
  }
  if (own) Kokkos::finalize();
  MPI_Finalize();
  return 0;
}
