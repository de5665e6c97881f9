// Training data: synthetic addition corpus and byte files.
#pragma once

namespace examoe {}
