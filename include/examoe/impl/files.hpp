#pragma once
// What a path names when it is not a regular file, for the messages of every reader that
// refuses such paths before opening them (data files, eval inputs, config files).
#include <sys/stat.h>

namespace examoe::impl {

/// "a directory", "a FIFO (named pipe)", ... for a mode that is not S_ISREG.
inline const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

}  // namespace examoe::impl
