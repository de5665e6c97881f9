#include <examoe/data.hpp>
