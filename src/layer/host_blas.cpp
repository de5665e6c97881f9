// Which kernels the host BLAS runs (include/examoe/impl/host_blas.hpp).
#include <examoe/impl/host_blas.hpp>

#include <algorithm>
#include <cctype>
#include <iterator>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define EXAMOE_HAVE_DLSYM 1
#endif

namespace examoe::impl::host {
namespace {

/// OpenBLAS's char* f(void) entry point `name`, looked up in the process (Kokkos Kernels links
/// the BLAS, not ExaMoE; another BLAS, or none, has no such symbol), or nullptr.
using NameFn = char* (*)();
NameFn openblas_entry(const char* name) {
#ifdef EXAMOE_HAVE_DLSYM
  return reinterpret_cast<NameFn>(dlsym(RTLD_DEFAULT, name));
#else
  (void)name;
  return nullptr;
#endif
}

std::string call(const char* name) {
  const NameFn f = openblas_entry(name);
  const char* s = f ? f() : nullptr;
  return s ? std::string(s) : std::string();
}

/// OpenBLAS's x86-64 kernels with AVX2 or wider (its DYNAMIC_ARCH core names, any case).
bool has_avx2_kernels(const std::string& core) {
  static const char* const wide[] = {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids", "excavator"};
  std::string c = core;
  std::transform(c.begin(), c.end(), c.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return std::find_if(std::begin(wide), std::end(wide), [&](const char* w) { return c == w; }) != std::end(wide);
}

}  // namespace

std::string blas_core() { return call("openblas_get_corename"); }

std::string blas_config() { return call("openblas_get_config"); }

std::string blas_core_warning(const std::string& core, const std::string& isa, const std::string& config) {
  const bool avx512 = isa == "avx512f", avx2 = avx512 || isa == "avx2";
  if (core.empty() || !avx2 || has_avx2_kernels(core)) return {};
  const char* fit = avx512 ? "SkylakeX" : "Haswell";
  std::string w = "OpenBLAS runs its '" + core + "' kernels on this CPU, which has " +
                  (avx512 ? "AVX-512" : "AVX2") + ": GEMMs run several times slower than the CPU allows";
  if (!config.empty()) w += " (" + config + ")";
  w += ". An OpenBLAS older than the CPU does not recognise it; set OPENBLAS_CORETYPE=" + std::string(fit) +
       " in the environment of every rank (docs/performance.md, \"The host BLAS\"), or use a newer OpenBLAS";
  return w;
}

}  // namespace examoe::impl::host
