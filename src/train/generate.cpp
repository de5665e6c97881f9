// `examoe generate`: a checkpoint's model decoding one position at a time (the KV-cache
// decoder of src/model/decoder.cpp), the next token sampled on world rank 0 and shared with
// every rank, experts served by their owners. docs/model.md, "Decoding with a KV cache".
#include "model/decoder.hpp"
#include "train/resources.hpp"
#include "train/setup.hpp"

#include <examoe/checkpoint.hpp>
#include <examoe/error.hpp>
#include <examoe/generate.hpp>
#include <examoe/impl/agree.hpp>
#include <examoe/impl/random.hpp>
#include <examoe/placement.hpp>
#include <examoe/train.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <numeric>

namespace examoe {

int sample_token(const std::vector<double>& logits, const SamplingOptions& o, long long position) {
  const std::string f = "examoe::sample_token: ";
  const int V = static_cast<int>(logits.size());
  if (V <= 0) throw Error(f + "no logits");
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    throw Error(f + "the temperature must be a finite number >= 0, got " + std::to_string(o.temperature));
  if (o.top_k < 0) throw Error(f + "top_k must be >= 0, got " + std::to_string(o.top_k));
  // Candidates by decreasing logit, ties to the lower id (a strict order: the same everywhere).
  std::vector<int> ids(static_cast<std::size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  const auto before = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (o.temperature == 0) return *std::min_element(ids.begin(), ids.end(), before);
  const int k = o.top_k > 0 ? std::min(o.top_k, V) : V;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
  // softmax(z / T) over the candidates, then the inverse CDF at u.
  std::vector<double> w(static_cast<std::size_t>(k));
  double total = 0;
  for (int i = 0; i < k; ++i) {
    w[i] = std::exp((logits[ids[i]] - logits[ids[0]]) / o.temperature);
    total += w[i];
  }
  const double u = impl::uniform01(impl::hash_key(o.seed, 0x67656E, static_cast<std::uint64_t>(position), 0)) * total;
  double cdf = 0;
  for (int i = 0; i < k; ++i) {
    cdf += w[i];
    if (u < cdf) return ids[i];
  }
  return ids[k - 1];  // u * total rounded up to the last partial sum
}

std::vector<int> parse_token_list(const std::string& text) {
  std::vector<int> out;
  std::size_t start = 0;
  int index = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const std::size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    item = a == std::string::npos ? "" : item.substr(a, b - a + 1);
    char* end = nullptr;
    errno = 0;
    const long long v = item.empty() ? 0 : std::strtoll(item.c_str(), &end, 10);
    const bool digits = !item.empty() && item.find_first_not_of("0123456789") == std::string::npos;
    if (!digits || errno == ERANGE || v > 2147483647LL)
      throw Error("examoe generate: --prompt-tokens entry " + std::to_string(index) + " '" + clip_for_message(item) +
                  "' is not a token id (a non-negative integer); give the ids comma-separated, e.g. 12,7,300");
    out.push_back(static_cast<int>(v));
    ++index;
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

namespace {
/// The options' errors against the model (not collective: the callers agree them).
void check_generate_options(const GenerateOptions& o, const ModelConfig& mc) {
  const std::string f = "examoe generate: ";
  if (o.prompt.empty()) throw Error(f + "the prompt is empty: give at least one token");
  if (static_cast<int>(o.prompt.size()) > mc.seq_len)
    throw Error(f + "the prompt holds " + std::to_string(o.prompt.size()) + " tokens; the model was trained with seq_len " +
                std::to_string(mc.seq_len) + " and reads at most that many");
  for (std::size_t i = 0; i < o.prompt.size(); ++i)
    if (o.prompt[i] < 0 || o.prompt[i] >= mc.vocab)
      throw Error(f + "prompt token " + std::to_string(o.prompt[i]) + " (position " + std::to_string(i) +
                  ") is outside the model's vocabulary [0, " + std::to_string(mc.vocab) + ")");
  if (o.max_new < 1) throw Error(f + "--max-new must be at least 1, got " + std::to_string(o.max_new));
  if (!(o.sampling.temperature >= 0) || !std::isfinite(o.sampling.temperature))
    throw Error(f + "--temperature must be a finite number >= 0 (0 = greedy), got " + std::to_string(o.sampling.temperature));
  if (o.sampling.top_k < 0) throw Error(f + "--top-k must be >= 0 (0 = all tokens), got " + std::to_string(o.sampling.top_k));
}
}  // namespace

template <class S>
GenerateResult generate_tokens(Model<S>& model, const GenerateOptions& o) {
  Communicator& w = model.mesh().world();
  impl::agree(w, [&] { check_generate_options(o, model.config()); });
  const bool holder = w.rank() == 0;  // world rank 0 decodes; every rank serves its experts
  impl::IncrementalDecoder<S> dec(model, holder ? 1 : 0);
  std::vector<S> logits;
  auto feed = [&](int token) { dec.step(holder ? std::vector<int>{token} : std::vector<int>{}, logits); };
  for (int t : o.prompt) feed(t);
  GenerateResult r;
  long long position = static_cast<long long>(o.prompt.size());
  while (true) {
    int token = 0;
    if (holder) token = sample_token(std::vector<double>(logits.begin(), logits.end()), o.sampling, position);
    w.broadcast(&token, sizeof token, 0);
    r.tokens.push_back(token);
    if (token == o.stop_token) { r.stop = GenerateStop::stop_token; break; }
    if (static_cast<int>(r.tokens.size()) >= o.max_new) { r.stop = GenerateStop::max_new; break; }
    if (dec.position() >= dec.capacity()) { r.stop = GenerateStop::seq_len; break; }
    feed(token);
    ++position;
  }
  return r;
}

template <class S>
HeldOutAccuracy generate_held_out(Model<S>& model, const AdditionCorpus& corpus) {
  Communicator& w = model.mesh().world();
  const int seq = model.config().seq_len, V = model.config().vocab;
  const int nseq = corpus.num_val_sequences(seq);
  const auto share = impl::split(nseq, w.size(), w.rank());
  const int B = share.second;
  Batch b;
  corpus.val_batch(share.first, B, seq, b);
  impl::IncrementalDecoder<S> dec(model, B);
  const SamplingOptions greedy;
  std::vector<int> in(static_cast<std::size_t>(B)), problem(B, -1);
  std::vector<char> on_track(B, 0);
  std::vector<char> wrong(static_cast<std::size_t>(corpus.num_val_problems()), 0), seen(wrong.size(), 0);
  std::vector<S> logits;
  std::vector<double> row(static_cast<std::size_t>(V));
  for (int i = 0; i < B; ++i) in[i] = b.tokens[static_cast<std::size_t>(i) * seq];
  for (int s = 0; s < seq; ++s) {
    dec.step(in, logits);
    for (int i = 0; i < B; ++i) {
      const std::size_t r = static_cast<std::size_t>(i) * seq + s;
      const int target = b.targets[r], p = b.sample_of_row.empty() ? -1 : b.sample_of_row[r];
      int next = s + 1 < seq ? b.tokens[r + 1] : 0;  // the true byte: context
      if (p >= 0 && target >= 0) {  // an answer byte of problem p is generated here
        if (problem[i] != p) {      // the '=' of problem p: its answer starts
          problem[i] = p;
          on_track[i] = 1;
          seen[p] = 1;
        }
        if (on_track[i]) {
          std::copy(logits.begin() + static_cast<std::ptrdiff_t>(i) * V, logits.begin() + static_cast<std::ptrdiff_t>(i + 1) * V, row.begin());
          const int g = sample_token(row, greedy, s + 1);
          if (g == target) next = s + 1 < seq ? g : 0;  // fed back: the decoding goes on
          else { on_track[i] = 0; wrong[p] = 1; }     // given up; the true bytes continue
        }
      }
      in[i] = next;
    }
  }
  double red[2] = {0, 0};
  for (std::size_t p = 0; p < seen.size(); ++p)
    if (seen[p]) { red[0] += 1; red[1] += wrong[p] ? 0 : 1; }
  w.allreduce_sum(red, 2, DataType::f64);
  HeldOutAccuracy acc;
  acc.problems = corpus.num_val_problems();
  acc.exact = static_cast<int>(red[1]);
  return acc;
}

template GenerateResult generate_tokens(Model<float>&, const GenerateOptions&);
template GenerateResult generate_tokens(Model<double>&, const GenerateOptions&);
template HeldOutAccuracy generate_held_out(Model<float>&, const AdditionCorpus&);
template HeldOutAccuracy generate_held_out(Model<double>&, const AdditionCorpus&);

namespace {

/// The config a checkpoint was trained with, for a run on `comm` (every expert-parallel).
TrainConfig checkpoint_config(const CheckpointInfo& info, const std::string& ckpt) {
  TrainConfig cfg;
  // Every rank read the same file, so every rank reaches the same verdict.
  try {
    for (const auto& [key, value] : info.config)
      for (const auto& k : config_keys())
        if (k.name == key) k.set(cfg, value);
    cfg.parallel.ep = 0;
    cfg.checkpoint.resume.clear();
    cfg.validate();
  } catch (const Error& e) {
    throw Error("examoe generate: checkpoint '" + clip_for_message(ckpt) + "' holds a config this ExaMoE cannot use: " + e.what());
  }
  return cfg;
}

/// The prompt of the request as token ids, checked against the model (agreed by the caller).
std::vector<int> request_prompt(const GenerateRequest& q, const TrainConfig& cfg) {
  const std::string f = "examoe generate: ";
  if (q.held_out) {
    if (q.has_text || q.has_tokens) throw Error(f + "--held-out takes no prompt (it decodes the held-out problems)");
    if (!cfg.data.path.empty())
      throw Error(f + "--held-out needs a checkpoint trained on the built-in addition corpus; '" +
                  clip_for_message(q.checkpoint) + "' was trained on '" + clip_for_message(cfg.data.path) + "'");
    return {};
  }
  if (q.has_text && q.has_tokens) throw Error(f + "give --prompt or --prompt-tokens, not both");
  if (!q.has_text && !q.has_tokens) throw Error(f + "no prompt: give --prompt TEXT or --prompt-tokens ID,ID,... (or --held-out)");
  if (q.has_text && cfg.model.vocab != 256)
    throw Error(f + "--prompt TEXT is for byte models (vocabulary 256); this model's vocabulary is " +
                std::to_string(cfg.model.vocab) + " tokens: give the prompt as --prompt-tokens ID,ID,...");
  std::vector<int> prompt;
  if (q.has_text)
    for (unsigned char c : q.prompt_text) prompt.push_back(c);
  else
    prompt = parse_token_list(q.prompt_tokens);
  if (prompt.empty()) throw Error(f + "the prompt is empty: give at least one byte or token");
  return prompt;
}

/// The generation the request asks for; for the addition corpus it also stops at '\n'.
GenerateOptions generate_options(const GenerateRequest& q, const GenerateOutcome& out) {
  GenerateOptions o;
  o.prompt = out.prompt;
  o.max_new = q.max_new;
  o.sampling = q.sampling;
  o.stop_token = out.addition ? '\n' : -1;
  return o;
}

template <class S>
void generate_run(const GenerateRequest& q, const TrainConfig& cfg, const CheckpointInfo& info, GenerateOutcome& out,
                  MPI_Comm comm) {
  Mesh mesh(comm, 0, cfg.parallel.comm_options());
  Communicator& w = mesh.world();
  impl::agree(w, [&] {
    if (cfg.model.num_experts < mesh.ep_size())
      throw Error("examoe generate: the checkpoint's model has " + std::to_string(cfg.model.num_experts) +
                  " experts per layer; every rank holds at least one, so run it on at most that many ranks (got " +
                  std::to_string(mesh.ep_size()) + ")");
  });
  // The most rows a rank decodes at once: one sequence, or its share of the validation set.
  std::unique_ptr<AdditionCorpus> corpus;
  long long rows = 1;
  if (q.held_out) {
    corpus = std::make_unique<AdditionCorpus>(cfg.train.seed, cfg.data.digits, cfg.data.val_problems);
    rows = (corpus->num_val_sequences(cfg.model.seq_len) + w.size() - 1) / w.size();
  }
  impl::check_memory(cfg, mesh, rows * cfg.model.seq_len, sizeof(S));
  Model<S> model(cfg.model, cfg.parallel, mesh, cfg.train.seed);
  AdamW<S> opt(impl::adamw_config(cfg));
  impl::register_parameters(model, opt);
  // At the expert-parallel size that wrote it, the experts go where the checkpoint's placement
  // put them (a rebalanced run's included); at another size, balanced blocks.
  bool same_table = info.ep == mesh.ep_size() && static_cast<int>(info.placement.size()) == cfg.model.n_layers;
  for (const auto& row : info.placement) same_table = same_table && static_cast<int>(row.size()) == cfg.model.num_experts;
  for (int l = 0; same_table && l < cfg.model.n_layers; ++l) {
    const Placement saved = Placement::from_owners(info.placement[l], mesh.ep_size());
    if (saved != model.moe(l).placement()) model.moe(l).set_placement(saved);
  }
  load_checkpoint(q.checkpoint, model, opt, cfg);
  if (q.held_out) {
    out.held_out = generate_held_out(model, *corpus);
    return;
  }
  out.result = generate_tokens(model, generate_options(q, out));
}

}  // namespace

GenerateOutcome generate_from_checkpoint(const GenerateRequest& q, MPI_Comm comm) {
  const CheckpointInfo info = read_checkpoint_info(q.checkpoint, comm);
  auto c = make_mpi_communicator(comm);
  TrainConfig cfg;
  GenerateOutcome out;
  impl::agree(*c, [&] {
    cfg = checkpoint_config(info, q.checkpoint);
    out.vocab = cfg.model.vocab;
    out.seq_len = cfg.model.seq_len;
    out.addition = cfg.data.path.empty();
    out.prompt = request_prompt(q, cfg);
    if (!q.held_out) check_generate_options(generate_options(q, out), cfg.model);
  });
  if (cfg.train.precision == "double") generate_run<double>(q, cfg, info, out, comm);
  else generate_run<float>(q, cfg, info, out, comm);
  return out;
}

}  // namespace examoe
