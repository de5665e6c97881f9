#pragma once
// The HDF5 token reader (token_hdf5.cpp), opened by open_token_file. Private to src/train.
#include <examoe/data.hpp>
#include <examoe/train.hpp>

#include <memory>
#include <string>

namespace examoe::impl::data {

/// Whether data.path is a byte file (data.format bytes, or auto with model.vocab_size `vocab`
/// = 256 on a file auto reads as bytes) without data.val_path or data.dataset: FileCorpus,
/// read whole by every rank and counted in the memory check, as before token files existed.
bool reads_bytes_whole(const DataOptions& data, int vocab);
/// data.path (and data.val_path) as a TokenCorpus, files opened and checked (not collective).
/// With data.format auto and model.vocab_size (`vocab`) other than 256, a file auto would read
/// as bytes is refused: it is likely headerless uint16 tokens (nanoGPT's train.bin).
std::unique_ptr<TokenCorpus> open_token_corpus(const DataOptions& data, std::uint64_t seed, int vocab);

/// Dataset `dataset` (empty: 'tokens') of the HDF5 file `path`, checked as open_token_file
/// documents. Errors are prefixed `fn`; `key` names the config key of the path.
std::unique_ptr<TokenFile> open_hdf5_token_file(const char* fn, const std::string& path, const std::string& dataset,
                                                const char* key);

/// Adds ids [0, vocab) of `v` to `counts` (if not null) and returns the first bad one (index
/// `first` + its position). For the scans of every reader.
template <class I>
BadToken check_chunk(const I* v, std::size_t n, std::uint64_t first, int vocab, std::vector<std::int64_t>* counts) {
  BadToken bad;
  for (std::size_t i = 0; i < n; ++i) {
    const I x = v[i];
    bool ok = x < static_cast<I>(vocab);
    if constexpr (static_cast<I>(-1) < static_cast<I>(0)) ok = ok && x >= 0;
    if (!ok) {
      bad.found = true;
      bad.index = first + i;
      bad.value = std::to_string(x);
      return bad;
    }
    if (counts) ++(*counts)[static_cast<std::size_t>(x)];
  }
  return bad;
}

}  // namespace examoe::impl::data
