#pragma once
// Incremental decoding with a key/value cache: the model's forward one position at a time.
// Private to the library (src/model); `examoe generate` drives it (src/train/generate.cpp).
#include <examoe/model.hpp>

#include "model/shared_experts.hpp"

#include <Kokkos_Core.hpp>

#include <memory>
#include <vector>

namespace examoe::impl {

/// Runs a trained Model forward one position at a time for `batch` sequences of this rank,
/// all at the same position, keeping each layer's keys and values of the positions already
/// seen (the KV cache, docs/model.md "Decoding with a KV cache"), so a new position costs one
/// row per sequence instead of a forward of the whole prefix. The logits at position s equal
/// those of the full forward (Model::evaluate) of the same tokens at s, up to rounding.
///
/// The dense parameters are gathered once, at construction, into full copies held by the
/// decoder (inference replicates the dense weights); the experts stay where the model's
/// placement puts them: every step calls each MoE layer's forward on every rank of the model's
/// world (collective), with this rank's `batch` rows, which may be 0 (the rank then only
/// serves its experts to the others). Construction and step() are collective over the
/// model's world; every rank must take the same number of steps.
template <class S>
class IncrementalDecoder {
 public:
  using execution_space = typename Model<S>::execution_space;
  using memory_space = typename Model<S>::memory_space;
  using matrix = typename Model<S>::matrix;
  using vector = typename Model<S>::vector;
  using ivector = typename Model<S>::ivector;

  /// Gathers the model's dense parameters (collective) and sizes the cache for `batch`
  /// sequences of model.config().seq_len positions. `batch` >= 0, per rank.
  IncrementalDecoder(Model<S>& model, int batch);

  int batch() const { return batch_; }
  /// Positions fed so far (the next step() writes position position()).
  int position() const { return pos_; }
  /// The most positions a sequence can hold: the model's seq_len.
  int capacity() const { return cfg_.seq_len; }
  /// Forgets every cached position (the next step() is position 0).
  void reset() { pos_ = 0; }

  /// Feeds `tokens[b]` (in [0, vocab)) at position position() to sequence b of this rank
  /// (tokens.size() == batch()) and returns, in `logits`, the next-token logits of every
  /// sequence, [batch][vocab] row-major. Collective; throws examoe::Error (on every rank)
  /// when the cache is full or a token is outside the vocabulary.
  void step(const std::vector<int>& tokens, std::vector<S>& logits);

 private:
  struct Block {
    Block() {}  // never value-initialise a struct holding Views (see Fsdp::Unit)
    vector attn_norm, moe_norm;
    matrix wq, wk, wv, wo;
    matrix shared_w1, shared_w2, shared_w3;  // the shared experts (extent 0: none)
    matrix k_cache, v_cache;  // [seq_len * batch][d], row s * batch + b
  };
  void copy_dense_parameters();
  void block_step(int l);

  Model<S>& model_;
  ModelConfig cfg_;
  execution_space space_;
  int batch_ = 0, pos_ = 0;
  matrix wte_, wpe_, lm_head_;
  vector final_norm_;
  std::vector<Block> blocks_;
  // One position's rows ([max(batch, 1)][...]): the stream x, norms, q, attention output,
  // residual h, MoE input/output, final norm, logits; p: the attention weights [batch*heads][seq].
  matrix x_, a_, q_, o_, t_, h_, m_, y_, f_, logits_, p_;
  vector inv_rms_;
  ivector tokens_;
  std::unique_ptr<SharedExperts<S>> shared_;  // null: the model has none
  typename SharedExperts<S>::Saved shared_saved_;
};

extern template class IncrementalDecoder<float>;
extern template class IncrementalDecoder<double>;

}  // namespace examoe::impl
