#pragma once
// Every tensor of a checkpoint (checkpoint_tensors.cpp): the groups /params, /adam_m and
// /adam_v, one dataset per row of Model::param_table() (a unit's parameters, or an expert
// tensor [E][a][b]), each with its checksum. Private to the checkpoint unit.
#include <examoe/config.hpp>
#include <examoe/model.hpp>
#include <examoe/optimizer.hpp>

#if EXAMOE_ENABLE_HDF5
#include <hdf5.h>
#endif

namespace examoe::io {

/// The three groups of tensors a checkpoint holds, in the order they are written.
enum class TensorGroup { params, adam_m, adam_v };
constexpr TensorGroup kTensorGroups[] = {TensorGroup::params, TensorGroup::adam_m, TensorGroup::adam_v};
/// The group's name in the file: "params", "adam_m" or "adam_v".
const char* group_name(TensorGroup group);

#if EXAMOE_ENABLE_HDF5
/// Creates group `group` in `file` and writes every tensor of it: dense parameters (or their
/// moments) from this rank's FSDP shards, experts from the first data-parallel replica's
/// owners. Collective over the model's world; failures (disk full) are agreed on every rank.
template <class S>
void write_tensors(hid_t file, Model<S>& model, const AdamW<S>& opt, TensorGroup group);
/// Reads every tensor of group `group` from `file` into the model (or the moments of `opt`),
/// checking shapes, checksums and values (finite; second moments >= 0). Collective over the
/// model's world; a rank's failure is thrown on every rank, naming the dataset.
template <class S>
void read_tensors(hid_t file, Model<S>& model, AdamW<S>& opt, TensorGroup group);
#endif

}  // namespace examoe::io
