// `examoe train`: every config key is a command-line option (--model.d_model 64) and a JSON
// config file key ({"model": {"d_model": 64}}); precedence: defaults < --config < options.
#include "train_cmd.hpp"

#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/files.hpp>
#include <examoe/train.hpp>

#include <mpi.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>

namespace examoe::app {

void add_train_command(CLI::App& app, TrainCli& cli) {
  auto* c = app.add_subcommand(
      "train",
      "Train a small MoE transformer (FSDP + expert parallelism). With no data it learns "
      "multi-digit addition from a built-in corpus and reports exact-match accuracy on "
      "held-out problems.");
  c->add_option("--config", cli.config_file, "JSON config file (nested or dotted keys)");
  c->add_option("--data", cli.data, "Train on this file: bytes, llm.c or nanoGPT token file, HDF5 dataset (see --data.format; same as --data.path)");
  c->add_option("--resume", cli.resume,
                 "Continue from a checkpoint: a path, or 'latest' in checkpoint.dir "
                 "(same as --checkpoint.resume)");
  c->add_flag("--print-config", cli.print_config, "Print the resolved config as JSON and exit");
  // Unknown options are reported by run_train with the nearest valid key (CLI11 would only
  // say that they were not expected).
  c->allow_extras();
  const TrainConfig defaults;
  for (const auto& k : config_keys()) {
    c->add_option("--" + k.name, cli.values[k.name], k.help)
        ->default_str(k.get(defaults))
        ->type_name(k.type)
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a later option overrides
  }
}

namespace {
/// The text of a --config file. stat() first: a FIFO, a device or a directory is refused
/// without being opened, and a file larger than any config (a sparse 50 GB file) without
/// being read; the open is non-blocking (the path may change after stat).
std::string read_config_file(const std::string& path) {
  constexpr off_t kMaxBytes = 64 << 20;
  const std::string F = "'" + clip_for_message(path) + "'";
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    throw Error("examoe train: cannot read config file " + F + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error("examoe train: config file " + F + " is not a regular file (it is " + impl::file_kind(st.st_mode) + ")");
  if (st.st_size > kMaxBytes)
    throw Error("examoe train: config file " + F + " has " + std::to_string(st.st_size) +
                " bytes; a config file is at most 64 MiB");
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw Error("examoe train: cannot read config file " + F + ": " + std::strerror(errno));
  std::string text;
  char buf[1 << 16];
  ssize_t r = 0;
  while (static_cast<off_t>(text.size()) <= kMaxBytes && (r = ::read(fd, buf, sizeof buf)) > 0)
    text.append(buf, static_cast<std::size_t>(r));
  const int e = errno;
  ::close(fd);
  if (r < 0) throw Error("examoe train: cannot read config file " + F + ": " + std::strerror(e));
  if (static_cast<off_t>(text.size()) > kMaxBytes)
    throw Error("examoe train: config file " + F + " grew beyond 64 MiB while being read");
  return text;
}
}  // namespace

int run_train(CLI::App& app, const TrainCli& cli) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  auto* sub = app.get_subcommand("train");
  TrainConfig cfg;
  // Same arguments on every rank, so the same error; agreed anyway (no rank may hang).
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  impl::agree(*comm, [&] {
    const std::vector<std::string> extra = sub->remaining();
    if (!extra.empty()) {
      const std::string& a = extra.front();
      if (a.rfind("--", 0) == 0) {
        const std::string name = a.substr(2, a.find('=') == std::string::npos ? std::string::npos : a.find('=') - 2);
        throw Error("examoe train: unknown option '--" + clip_for_message(name) + "' (did you mean '--" +
                    closest_key(name.substr(0, 200)) + "'? `examoe train --help` lists every key)");
      }
      throw Error("examoe train: unexpected argument '" + clip_for_message(a) +
                  "' (options are --key value; see `examoe train --help`)");
    }
    if (!cli.config_file.empty()) apply_json_config(cfg, read_config_file(cli.config_file), cli.config_file);
    for (const auto& k : config_keys())
      if (sub->count("--" + k.name) > 0) k.set(cfg, cli.values.at(k.name));
    if (!cli.data.empty()) cfg.data.path = cli.data;
    if (!cli.resume.empty()) cfg.checkpoint.resume = cli.resume;
  });
  if (cli.print_config) {
    if (rank == 0) {
      std::cout << "{\n";
      const auto& keys = config_keys();
      for (std::size_t i = 0; i < keys.size(); ++i)
        std::cout << "  \"" << keys[i].name << "\": \"" << keys[i].get(cfg) << "\""
                  << (i + 1 < keys.size() ? "," : "") << "\n";
      std::cout << "}\n";
    }
    return 0;
  }
  const TrainResult res = train(cfg, MPI_COMM_WORLD, &std::cout);
  if (res.stopped_nonfinite) {
    // A clear message where errors go, and an exit code scripts can tell apart (docs/faults.md).
    if (rank == 0) std::cerr << "examoe: " << res.stop_message << std::endl;
    return kExitNonfinite;
  }
  return 0;
}

}  // namespace examoe::app
