// Launch interface of the CUDA selective scan (scan_cuda.cu); no torch types, so that the
// kernels compile with plain CUDA headers.
#pragma once

#include "../common/cuda_types.h"

namespace longtrain {
namespace cuda {

// Time steps per shared-memory chunk, which is also the checkpoint interval on CUDA.
constexpr int kScanChunk = 32;
constexpr int kScanMaxState = 32;  // one state per lane of a warp

struct ScanParams {
  int batch, dim, seq, state, n_chunks;
  DType dtype;
  const void *u, *delta, *B, *C, *z;          // dtype; u, delta, z (batch, dim, seq); B, C (batch, state, seq)
  const float *A, *D, *delta_bias, *initial;  // (dim, state), (dim), (dim), (batch, dim, state); may be null but A
  bool softplus;
  void* out;                                  // dtype, (batch, dim, seq)
  float *last, *checkpoints;                  // (batch, dim, state), (batch, dim, n_chunks, state)
  const bool* reset;                          // (batch, seq), document starts; may be null
};

struct ScanGradParams {
  const void* dout;    // dtype, (batch, dim, seq)
  const float* dlast;  // (batch, dim, state) or null
  float *du, *ddelta, *dz;       // (batch, dim, seq); dz may be null
  float *dA, *dD;                // per batch row: (batch, dim, state), (batch, dim)
  float *dB, *dC;                // (batch, state, seq), zero on entry (accumulated with atomics)
  float* dinitial;               // (batch, dim, state)
};

cudaError_t scan_forward(const ScanParams& params, cudaStream_t stream);
cudaError_t scan_backward(const ScanParams& params, const ScanGradParams& grads, cudaStream_t stream);

}  // namespace cuda
}  // namespace longtrain
