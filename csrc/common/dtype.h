// Dtype codes shared by the Python side and every kernel in csrc/ (torch-free).
#pragma once
#include <cstdint>

namespace ptk {

// Must match posttrain_kernels/_extension.py::DTYPE_CODES.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace ptk
