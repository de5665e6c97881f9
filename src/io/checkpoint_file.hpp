#pragma once
// The checkpoint file as bytes (checkpoint_file.cpp): the header block in front of the HDF5
// data (magic line, format version, size, whole-file checksum, run id), verified before HDF5
// reads a byte of the file. Private to the checkpoint unit; independent of HDF5.
#include <examoe/comm.hpp>

#include <cstdint>
#include <string>

namespace examoe::io {

/// What the header block of a checkpoint says (docs/checkpoint-format.md, "Header").
struct CheckpointHeader {
  int format = 0;
  std::uint64_t bytes = 0, chunk = 0, checksum = 0;
  std::uint64_t run = 0;  ///< run id (0 = none: written before run ids)
};

/// Verifies the header and the whole-file checksum of `path` (collective over `comm`; every
/// failure is thrown on every rank, naming the file); returns the header.
CheckpointHeader verify_checkpoint_header(const std::string& path, Communicator& comm);

}  // namespace examoe::io
