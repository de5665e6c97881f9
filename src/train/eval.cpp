// `examoe eval`: the model of a checkpoint run forward over the token sequences of an HDF5
// file, the logits written to another. The input is inspected (rank 0) before anything is
// built, its ids checked as read, and every error agreed between the ranks.
#include "train/resources.hpp"
#include "train/setup.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/checkpoint_dir.hpp>
#include <examoe/config.hpp>
#include <examoe/error.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/files.hpp>
#include <examoe/train.hpp>

#if EXAMOE_ENABLE_HDF5
#include "io/hdf5.hpp"
#endif

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ostream>
#include <sstream>
#include <type_traits>

namespace examoe {
namespace {

/// What an eval input holds, found before any of its values is read.
struct EvalInputShape {
  long long n = 0;       ///< sequences
  bool targets = false;  ///< it has a 'targets' dataset
};

#if EXAMOE_ENABLE_HDF5
/// Checks dataset `name` ('tokens' or 'targets') of the open input `f` (`F`: its quoted name):
/// 2-D integer [N][seq_len], 'targets' of the shape of 'tokens'. Returns false when the file
/// has no such dataset; throws examoe::Error when it is not as it must be.
bool inspect_eval_dataset(hid_t f, const char* name, const std::string& F, int seq, EvalInputShape& shape) {
  if (H5Lexists(f, name, H5P_DEFAULT) <= 0) return false;
  const std::string N = "dataset '" + std::string(name) + "'";
  const io::Hid ds(H5Dopen2(f, name, H5P_DEFAULT), H5Dclose);
  const io::Hid sp(H5Dget_space(ds), H5Sclose), type(H5Dget_type(ds), H5Tclose);
  const H5T_class_t cls = H5Tget_class(type);
  if (!ds.ok() || !sp.ok()) throw Error("examoe eval: cannot read " + N + " of " + F);
  if (H5Sget_simple_extent_ndims(sp) != 2) throw Error("examoe eval: " + N + " must be 2-D [sequences][seq_len]");
  if (cls != H5T_INTEGER)
    throw Error("examoe eval: " + N + " of " + F + " holds " +
                (cls == H5T_FLOAT ? std::string("floating-point numbers") : cls == H5T_STRING ? "strings" : "values that are not integers") +
                "; token ids and targets must be an HDF5 integer type (they are not converted)");
  hsize_t dims[2] = {0, 0};
  H5Sget_simple_extent_dims(sp, dims, nullptr);
  const bool targets = std::strcmp(name, "targets") == 0;
  if (dims[1] != static_cast<hsize_t>(seq))
    throw Error("examoe eval: " + N + " has sequences of " + std::to_string(dims[1]) + " tokens; the model's seq_len is " +
                std::to_string(seq));
  if (targets && static_cast<long long>(dims[0]) != shape.n)
    throw Error("examoe eval: 'targets' and 'tokens' have different shapes");
  if (targets) shape.targets = true;
  else shape.n = static_cast<long long>(std::min<hsize_t>(dims[0], static_cast<hsize_t>(LLONG_MAX)));
  return true;
}

/// Rank 0: `input` is a regular file (a FIFO or a device is refused from stat(), never
/// opened: opening a FIFO blocks), HDF5, and holds a 2-D integer dataset 'tokens'
/// [N][seq_len] and, optionally, 'targets' of the same shape.
EvalInputShape inspect_eval_input(const std::string& input, int seq) {
  const std::string F = "'" + clip_for_message(input) + "'";
  struct stat st;
  if (::stat(input.c_str(), &st) != 0) throw Error("examoe eval: cannot open input " + F + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error("examoe eval: input " + F + " is " + impl::file_kind(st.st_mode) + ", not a regular file");
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const io::Hid f(H5Fopen(input.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!f.ok()) throw Error("examoe eval: cannot open input " + F + " as HDF5");
  EvalInputShape shape;
  if (!inspect_eval_dataset(f, "tokens", F, seq, shape)) throw Error("examoe eval: " + F + " has no dataset 'tokens'");
  inspect_eval_dataset(f, "targets", F, seq, shape);
  return shape;
}

/// Checks the ids read from dataset `name`: tokens in [0, V); targets in [0, V) or -1 (no
/// target), the only negative value allowed. A bad value is reported as it is (beyond 32
/// bits too), with the index of the first one and how many there are. Fills `out`.
template <class I>
void check_ids(const std::vector<I>& v, const char* name, const std::string& input, int seq, int V,
               std::vector<int>& out) {
  const bool target = std::strcmp(name, "targets") == 0;
  std::size_t bad = 0, first = 0;
  out.resize(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const I x = v[i];
    bool ok = x < static_cast<I>(V);
    if constexpr (std::is_signed<I>::value) ok = ok && (x >= 0 || (target && x == -1));
    if (!ok && bad++ == 0) first = i;
    out[i] = ok ? static_cast<int>(x) : -1;
  }
  if (bad == 0) return;
  const std::size_t row = first / static_cast<std::size_t>(seq), col = first % static_cast<std::size_t>(seq);
  std::ostringstream os;
  os << "examoe eval: " << (target ? "target " : "token ") << v[first] << " outside [0, " << V << ") at " << name << "["
     << row << "][" << col << "] of '" << clip_for_message(input) << "' ("
     << (target ? "-1 marks a position without a target and is the only negative value allowed; " : "")
     << "the first of " << bad << (bad == 1 ? " bad value)" : " bad values)");
  throw Error(os.str());
}

/// The values of dataset `ds` as I (a 64-bit type of the stored signedness), checked.
template <class I>
void read_checked_ids(hid_t ds, hid_t mem, std::size_t count, const char* name, const std::string& input, int seq,
                      int V, std::vector<int>& out) {
  std::vector<I> v(count);
  if (count > 0 && H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
    throw Error("examoe eval: cannot read dataset '" + std::string(name) + "' of '" + clip_for_message(input) + "'");
  check_ids(v, name, input, seq, V, out);
}

/// Rank 0: reads dataset `name` (shape and class checked by inspect_eval_input) as 64-bit
/// integers, signed or unsigned as stored, so no value is clipped before it is checked.
void read_eval_ids(const std::string& input, const char* name, int seq, int V, std::vector<int>& out) {
  const io::Hid f(H5Fopen(input.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!f.ok()) throw Error("examoe eval: cannot open input '" + clip_for_message(input) + "' as HDF5");
  const io::Hid ds(H5Dopen2(f, name, H5P_DEFAULT), H5Dclose);
  const io::Hid sp(H5Dget_space(ds), H5Sclose), type(H5Dget_type(ds), H5Tclose);
  const std::size_t count = static_cast<std::size_t>(H5Sget_simple_extent_npoints(sp));
  if (H5Tget_sign(type) == H5T_SGN_NONE)
    read_checked_ids<unsigned long long>(ds, H5T_NATIVE_ULLONG, count, name, input, seq, V, out);
  else
    read_checked_ids<long long>(ds, H5T_NATIVE_LLONG, count, name, input, seq, V, out);
}

/// Rank 0: writes "logits" [n][seq][V] to `output` (through a temporary file, renamed when
/// complete).
void write_logits(const std::string& output, const std::vector<float>& all, long long n, int seq, int V) {
  const std::string tmp = output + ".tmp";
  io::Hid f(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  if (!f.ok()) throw Error("examoe eval: cannot create output '" + output + "'");
  {
    hsize_t dims[3] = {static_cast<hsize_t>(n), static_cast<hsize_t>(seq), static_cast<hsize_t>(V)};
    const io::Hid sp(H5Screate_simple(3, dims, nullptr), H5Sclose);
    const io::Hid ds(H5Dcreate2(f, "logits", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
    if (!ds.ok() || (!all.empty() && H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data()) < 0))
      throw Error("examoe eval: cannot write logits to '" + output + "'");
  }
  f.reset();
  if (std::rename(tmp.c_str(), output.c_str()) != 0)
    throw Error("examoe eval: cannot rename '" + tmp + "' to '" + output + "'");
}
#endif

/// The tokens (and targets) every rank holds.
struct EvalInput {
  long long n = 0;      ///< sequences
  int has_targets = 0;  ///< 1: `targets` holds the file's targets
  std::vector<int> tokens, targets;
};

/// The input's shape on every rank, checked by rank 0 before the mesh is built (a bad file
/// costs one agreement). Collective over `comm`.
EvalInput eval_input_shape(const std::string& input, int seq, int V, MPI_Comm comm) {
  auto c = make_mpi_communicator(comm);
  EvalInputShape shape;
  impl::agree(*c, [&] {
#if EXAMOE_ENABLE_HDF5
    if (c->rank() == 0) shape = inspect_eval_input(input, seq);
#else
    throw Error("examoe eval: this ExaMoE was built without HDF5");
#endif
  });
  EvalInput in;
  in.n = shape.n;
  in.has_targets = shape.targets ? 1 : 0;
  c->broadcast(&in.n, sizeof in.n, 0);
  c->broadcast(&in.has_targets, sizeof in.has_targets, 0);
  // MPI counts are int: the logits gathered on rank 0 must number at most 2^31 - 1.
  const long long max_n = INT_MAX / (static_cast<long long>(seq) * V);
  if (in.n > max_n)
    throw Error("examoe eval: '" + clip_for_message(input) + "' holds " + std::to_string(in.n) +
                " sequences; one eval run writes the logits of at most " + std::to_string(max_n) + " sequences of " +
                std::to_string(seq) + " tokens (2^31 - 1 values): split the input");
  return in;
}

/// Rank 0 reads and checks the ids; every rank receives them. Collective over `w`.
void read_eval_input(EvalInput& in, const std::string& input, int seq, int V, Communicator& w) {
#if EXAMOE_ENABLE_HDF5
  impl::agree(w, [&] {
    if (w.rank() != 0) return;
    read_eval_ids(input, "tokens", seq, V, in.tokens);
    if (in.has_targets) read_eval_ids(input, "targets", seq, V, in.targets);
  });
#else
  (void)input;
  (void)V;
#endif
  in.tokens.resize(static_cast<std::size_t>(in.n) * seq);
  w.broadcast(in.tokens.data(), in.tokens.size() * sizeof(int), 0);
  if (in.has_targets) {
    in.targets.resize(in.tokens.size());
    w.broadcast(in.targets.data(), in.targets.size() * sizeof(int), 0);
  }
}

/// This rank's sequences of the input (targets -1 where the file has none).
Batch eval_batch(const EvalInput& in, int seq, Communicator& w) {
  const auto [first, count] = impl::split(static_cast<int>(in.n), w.size(), w.rank());
  Batch b;
  b.batch = count;
  b.seq_len = seq;
  b.tokens.assign(in.tokens.begin() + static_cast<std::ptrdiff_t>(first) * seq,
                  in.tokens.begin() + static_cast<std::ptrdiff_t>(first + count) * seq);
  if (in.has_targets)
    b.targets.assign(in.targets.begin() + static_cast<std::ptrdiff_t>(first) * seq,
                     in.targets.begin() + static_cast<std::ptrdiff_t>(first + count) * seq);
  else
    b.targets.assign(b.tokens.size(), -1);
  return b;
}

/// Every rank's logits on rank 0, in rank order (= sequence order). Collective over `w`.
std::vector<float> gather_logits(const std::vector<float>& logits, Communicator& w) {
  std::vector<int> counts(w.size()), displs(w.size());
  const int mine = static_cast<int>(logits.size());
  MPI_Gather(&mine, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, w.mpi_comm());
  std::vector<float> all;
  if (w.rank() == 0) {
    long long tot = 0;
    for (int r = 0; r < w.size(); ++r) {
      displs[r] = static_cast<int>(tot);
      tot += counts[r];
    }
    all.resize(static_cast<std::size_t>(tot));
  }
  MPI_Gatherv(logits.data(), mine, MPI_FLOAT, all.data(), counts.data(), displs.data(), MPI_FLOAT, 0, w.mpi_comm());
  return all;
}

template <class S>
double eval_run(const TrainConfig& cfg, const std::string& ckpt, const std::string& input,
                const std::string& output, MPI_Comm comm, std::ostream* out) {
  const int seq = cfg.model.seq_len, V = cfg.model.vocab;
  EvalInput in = eval_input_shape(input, seq, V, comm);
  Mesh mesh(comm, cfg.parallel.ep, cfg.parallel.comm_options());
  Communicator& w = mesh.world();
  if (cfg.model.num_experts < mesh.ep_size())
    throw Error("examoe eval: the checkpoint's model.num_experts (" + std::to_string(cfg.model.num_experts) +
                ") must be at least the expert-parallel size ep = " + std::to_string(mesh.ep_size()) + " (set --parallel.ep)");
  {
    // Every rank holds the tokens and targets; rank 0 reads them as 64-bit values and gathers
    // every logit. Counted in the memory check before its values are read.
    const std::size_t values = static_cast<std::size_t>(in.n) * static_cast<std::size_t>(seq);
    impl::HeldData held;
    held.bytes = values * (sizeof(int) * (1 + in.has_targets) + sizeof(long long) + sizeof(float) * static_cast<std::size_t>(V));
    held.what = "the eval input '" + clip_for_message(input) + "' (its ids and their logits)";
    impl::check_memory(cfg, mesh, (in.n + w.size() - 1) / w.size() * seq, sizeof(S), held);
  }
  read_eval_input(in, input, seq, V, w);
  Model<S> model(cfg.model, cfg.parallel, mesh, cfg.train.seed);
  AdamW<S> opt(impl::adamw_config(cfg));
  impl::register_parameters(model, opt);
  load_checkpoint(ckpt, model, opt, cfg);

  const Batch b = eval_batch(in, seq, w);
  std::vector<float> logits;
  const StepStats st = model.evaluate(b, nullptr, &logits);
  double red[2] = {st.ce_sum, static_cast<double>(st.valid)};
  w.allreduce_sum(red, 2, DataType::f64);
  const std::vector<float> all = gather_logits(logits, w);
#if EXAMOE_ENABLE_HDF5
  impl::agree(w, [&] {
    if (w.rank() == 0) write_logits(output, all, in.n, seq, V);
  });
#endif
  const double loss = red[1] > 0 ? red[0] / red[1] : 0.0;
  if (out && w.rank() == 0) {
    *out << "examoe eval: " << in.n << " sequences of " << seq << " tokens from " << input << " with " << ckpt
         << " -> " << output << " (logits [" << in.n << "][" << seq << "][" << V << "])";
    if (red[1] > 0) *out << "; mean cross-entropy " << loss << " nats over " << static_cast<long long>(red[1]) << " targets";
    *out << "\n";
  }
  return loss;
}

}  // namespace

double eval_file(const std::string& ckpt, const std::string& input, const std::string& output, int ep,
                 MPI_Comm comm, std::ostream* out) {
  {
    // No output may overwrite a checkpoint or an input (compared by device and inode).
    auto c = make_mpi_communicator(comm);
    impl::agree(*c, [&] {
      if (c->rank() != 0) return;
      const std::string why =
          output_conflict(output, {{"the checkpoint being evaluated", ckpt}, {"the input (--input)", input}}, true);
      if (!why.empty())
        throw Error("examoe eval: --output " + why +
                    ": refused, writing the logits would destroy it (no output may overwrite a checkpoint or an "
                    "input; choose another --output)");
    });
  }
  const CheckpointInfo info = read_checkpoint_info(ckpt, comm);
  TrainConfig cfg;
  // Every rank read the same file, so every rank reaches the same verdict.
  try {
    for (const auto& [key, value] : info.config)
      for (const auto& k : config_keys())
        if (k.name == key) k.set(cfg, value);
    cfg.parallel.ep = ep;
    cfg.checkpoint.resume.clear();
    cfg.validate();
  } catch (const Error& e) {
    throw Error("examoe eval: checkpoint '" + ckpt + "' holds a config this ExaMoE cannot use: " + e.what());
  }
  return cfg.train.precision == "double" ? eval_run<double>(cfg, ckpt, input, output, comm, out)
                                         : eval_run<float>(cfg, ckpt, input, output, comm, out);
}

}  // namespace examoe
