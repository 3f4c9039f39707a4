// Launch interface of the CUDA attention (attention_cuda.cu); no torch types, so that the
// kernels compile with plain CUDA headers.
#pragma once

#include "../common/cuda_types.h"

namespace longtrain {
namespace cuda {

struct AttentionParams {
  int batch, seq_q, seq_k, heads, kv_heads, head_dim;  // head_dim: 32, 64 or 128
  bool causal;
  float scale;
  DType dtype;
  const void *q, *k, *v;  // dtype; q (batch, seq_q, heads, head_dim), k, v (batch, seq_k, kv_heads, head_dim)
  void* out;              // dtype, like q
  float* lse;             // (batch, heads, seq_q)
};

struct AttentionGradParams {
  const void *dout, *out;  // dtype, like q
  const float* dlse;       // (batch, heads, seq_q) or null
  float* delta;            // scratch (batch, heads, seq_q): rowsum(dout * out) - dlse
  void* dq;                // dtype, like q
  float *dk, *dv;          // per query head: (batch, seq_k, heads, head_dim), summed over groups by the caller
};

bool attention_supports_head_dim(int head_dim);
cudaError_t attention_forward(const AttentionParams& params, cudaStream_t stream);
cudaError_t attention_backward(const AttentionParams& params, const AttentionGradParams& grads, cudaStream_t stream);

}  // namespace cuda
}  // namespace longtrain
