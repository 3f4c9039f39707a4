// Shared by the CUDA kernels (compiled with plain CUDA headers only) and their torch bindings.
#pragma once

#include <cuda_runtime_api.h>

namespace longtrain {
namespace cuda {

// Element type of the tensors a kernel reads and writes; accumulation is always float32.
enum class DType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace cuda
}  // namespace longtrain
