#pragma once
// Checks of command-line values that say what is wrong as the user wrote it: CLI11's own
// Range prints the bound of a double in 309 digits, and its conversion errors ("Could not
// convert") do not say why. CLI11 runs validators on the text before converting it, so a value
// that passes converts. Messages quote at most a bounded prefix of the value.
#include <examoe/error.hpp>

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

namespace examoe::app {

/// An integer in [lo, hi] (shown in --help as INT:POSITIVE, INT:NONNEGATIVE or INT:[lo, hi]).
inline CLI::Validator integer_in(long long lo, long long hi = 2147483647) {
  const bool open = hi == 2147483647;
  const std::string range = open ? ">= " + std::to_string(lo) : "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  const std::string help = open && lo == 1 ? "POSITIVE" : open && lo == 0 ? "NONNEGATIVE" : range;
  return CLI::Validator(
      [lo, hi, range](std::string& v) -> std::string {
        const std::string q = "'" + clip_for_message(v) + "'";
        char* end = nullptr;
        errno = 0;
        const long long x = std::strtoll(v.c_str(), &end, 10);
        if (v.empty() || end != v.c_str() + v.size()) return "must be an integer " + range + ", got " + q;
        if (errno == ERANGE || x < lo || x > hi) return "is out of range: it must be an integer " + range + ", got " + q;
        return {};
      },
      help);
}

/// A non-negative 64-bit integer (a seed).
inline CLI::Validator unsigned_integer() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        const std::string q = "'" + clip_for_message(v) + "'";
        if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos)
          return "must be a non-negative integer, got " + q;
        errno = 0;
        std::strtoull(v.c_str(), nullptr, 10);
        if (errno == ERANGE) return "is out of range: it must be an integer in [0, 18446744073709551615], got " + q;
        return {};
      },
      "");
}

/// "" when `v` is all of a finite double (stored in *x), else why not ("must be ...").
inline std::string parse_finite_number(const std::string& v, double* x) {
  const std::string q = "'" + clip_for_message(v) + "'";
  char* end = nullptr;
  errno = 0;
  *x = std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size()) return "must be a number, got " + q;
  if (errno == ERANGE && std::isinf(*x))
    return "is out of range: " + q + " is beyond the largest double (about 1.8e308); it must be a finite number";
  if (!std::isfinite(*x)) return "must be a finite number, got " + q;
  return {};
}

/// A finite number >= 0 (generate's sampling temperature, 0 = greedy; bench's capacity factor,
/// 0 = dropless): `zero` says what 0 means.
inline CLI::Validator nonnegative_number(const std::string& zero = "greedy") {
  return CLI::Validator(
      [zero](std::string& v) -> std::string {
        double x = 0;
        std::string err = parse_finite_number(v, &x);
        if (err.empty() && x < 0) err = "must be >= 0 (0 = " + zero + "), got '" + clip_for_message(v) + "'";
        return err;
      },
      "NONNEGATIVE");
}

/// A finite number greater than 0.
inline CLI::Validator positive_number() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        double x = 0;
        std::string err = parse_finite_number(v, &x);
        if (err.empty() && !(x > 0)) err = "must be positive, got '" + clip_for_message(v) + "'";
        return err;
      },
      "POSITIVE");
}

}  // namespace examoe::app
