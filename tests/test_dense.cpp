#include <examoe/impl/dense_kernels.hpp>
