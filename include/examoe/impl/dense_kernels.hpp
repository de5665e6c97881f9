// Dense transformer kernels (RMSNorm, causal attention, embedding, cross-entropy).
#pragma once
#include <examoe/impl/kokkos_compat.hpp>

namespace examoe::impl::dense {}
