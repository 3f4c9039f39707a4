// Flash-style attention on CUDA, forward and backward (Dao et al. 2022, "FlashAttention";
// Dao 2023, "FlashAttention-2"): K/V (or Q/dO) tiles staged in shared memory, one query (or key)
// row per thread with its accumulators in registers, online softmax in the forward, probabilities
// recomputed from the saved log-sum-exp in the backward. The backward runs two passes without
// atomics (deterministic): one over query tiles for dQ, one over key tiles for dK and dV; dK and
// dV are written per query head and the caller sums them over each grouped-query group.
// Causal masks are bottom-right aligned: query i sees key j when j <= i + seq_k - seq_q.
// These kernels use CUDA cores only; they are the portable path, flash_attn the fast one.
#include <math_constants.h>

#include "../common/cuda_math.cuh"
#include "attention_cuda.h"

namespace longtrain {
namespace cuda {
namespace {

constexpr int kRows = 64;  // query (or key) rows per block, one per thread
constexpr int kTile = 32;  // rows per shared-memory tile of the other side

struct RowLayout {
  int seq, heads;
  __device__ long at(int b, int i, int h, int head_dim) const {
    return ((static_cast<long>(b) * seq + i) * heads + h) * head_dim;
  }
};

template <typename T, int kDim>
__device__ void load_row(const T* src, float* dst) {
#pragma unroll
  for (int c = 0; c < kDim; ++c) dst[c] = to_float(src[c]);
}

// Stage rows [r0, r0 + kTile) of one head into shared memory, zero past `rows`.
template <typename T, int kDim>
__device__ void load_tile(const T* base, RowLayout layout, int b, int h, int r0, int rows, float (*tile)[kDim]) {
  for (int i = threadIdx.x; i < kTile * kDim; i += blockDim.x) {
    const int r = i / kDim, c = i % kDim;
    tile[r][c] = r0 + r < rows ? to_float(base[layout.at(b, r0 + r, h, kDim) + c]) : 0.0f;
  }
}

template <int kDim>
__device__ __forceinline__ float dot(const float* a, const float* b) {
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < kDim; ++c) s += a[c] * b[c];
  return s;
}

template <typename T, int kDim>
__global__ void __launch_bounds__(kRows) forward_kernel(AttentionParams p) {
  __shared__ float k_tile[kTile][kDim], v_tile[kTile][kDim];
  const int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * kRows + threadIdx.x;
  const int kvh = h / (p.heads / p.kv_heads), offset = p.seq_k - p.seq_q;
  const RowLayout q_rows{p.seq_q, p.heads}, kv_rows{p.seq_k, p.kv_heads};
  const bool valid = i < p.seq_q;
  float q[kDim], acc[kDim];
  if (valid) load_row<T, kDim>(static_cast<const T*>(p.q) + q_rows.at(b, i, h, kDim), q);
#pragma unroll
  for (int c = 0; c < kDim; ++c) acc[c] = 0.0f;
  float row_max = -CUDART_INF_F, row_sum = 0.0f;
  const int last_row = min(p.seq_q, (blockIdx.x + 1) * kRows) - 1;
  const int key_end = p.causal ? max(0, min(p.seq_k, last_row + offset + 1)) : p.seq_k;
  for (int j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    load_tile<T, kDim>(static_cast<const T*>(p.k), kv_rows, b, kvh, j0, p.seq_k, k_tile);
    load_tile<T, kDim>(static_cast<const T*>(p.v), kv_rows, b, kvh, j0, p.seq_k, v_tile);
    __syncthreads();
    if (!valid) continue;
    const int visible = min(kTile, (p.causal ? min(p.seq_k, i + offset + 1) : p.seq_k) - j0);
    for (int r = 0; r < visible; ++r) {
      const float score = dot<kDim>(q, k_tile[r]) * p.scale;
      if (score > row_max) {
        const float alpha = __expf(row_max - score);
        row_sum *= alpha;
#pragma unroll
        for (int c = 0; c < kDim; ++c) acc[c] *= alpha;
        row_max = score;
      }
      const float prob = __expf(score - row_max);
      row_sum += prob;
#pragma unroll
      for (int c = 0; c < kDim; ++c) acc[c] += prob * v_tile[r][c];
    }
  }
  if (!valid) return;
  const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
  T* out = static_cast<T*>(p.out) + q_rows.at(b, i, h, kDim);
#pragma unroll
  for (int c = 0; c < kDim; ++c) out[c] = from_float<T>(acc[c] * inv);
  p.lse[(static_cast<long>(b) * p.heads + h) * p.seq_q + i] = row_sum > 0.0f ? row_max + logf(row_sum) : -CUDART_INF_F;
}

template <typename T, int kDim>
__global__ void delta_kernel(AttentionParams p, AttentionGradParams g) {
  const long row = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;  // over (batch, heads, seq_q)
  if (row >= static_cast<long>(p.batch) * p.heads * p.seq_q) return;
  const int i = row % p.seq_q, h = (row / p.seq_q) % p.heads, b = row / (static_cast<long>(p.seq_q) * p.heads);
  const long at = RowLayout{p.seq_q, p.heads}.at(b, i, h, kDim);
  const T *dout = static_cast<const T*>(g.dout) + at, *out = static_cast<const T*>(g.out) + at;
  float s = 0.0f;
  for (int c = 0; c < kDim; ++c) s += to_float(dout[c]) * to_float(out[c]);
  g.delta[row] = s - (g.dlse ? g.dlse[row] : 0.0f);
}

// dQ: one query row per thread, key tiles in shared memory.
template <typename T, int kDim>
__global__ void __launch_bounds__(kRows) dq_kernel(AttentionParams p, AttentionGradParams g) {
  __shared__ float k_tile[kTile][kDim], v_tile[kTile][kDim];
  const int b = blockIdx.z, h = blockIdx.y, i = blockIdx.x * kRows + threadIdx.x;
  const int kvh = h / (p.heads / p.kv_heads), offset = p.seq_k - p.seq_q;
  const RowLayout q_rows{p.seq_q, p.heads}, kv_rows{p.seq_k, p.kv_heads};
  const long stat = (static_cast<long>(b) * p.heads + h) * p.seq_q + i;
  const bool valid = i < p.seq_q && p.lse[stat] > -CUDART_INF_F;  // rows that see no key get dq = 0
  float q[kDim], dout[kDim], dq[kDim];
  float lse = 0.0f, delta = 0.0f;
  if (valid) {
    load_row<T, kDim>(static_cast<const T*>(p.q) + q_rows.at(b, i, h, kDim), q);
    load_row<T, kDim>(static_cast<const T*>(g.dout) + q_rows.at(b, i, h, kDim), dout);
    lse = p.lse[stat];
    delta = g.delta[stat];
  }
#pragma unroll
  for (int c = 0; c < kDim; ++c) dq[c] = 0.0f;
  const int last_row = min(p.seq_q, (blockIdx.x + 1) * kRows) - 1;
  const int key_end = p.causal ? max(0, min(p.seq_k, last_row + offset + 1)) : p.seq_k;
  for (int j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();
    load_tile<T, kDim>(static_cast<const T*>(p.k), kv_rows, b, kvh, j0, p.seq_k, k_tile);
    load_tile<T, kDim>(static_cast<const T*>(p.v), kv_rows, b, kvh, j0, p.seq_k, v_tile);
    __syncthreads();
    if (!valid) continue;
    const int visible = min(kTile, (p.causal ? min(p.seq_k, i + offset + 1) : p.seq_k) - j0);
    for (int r = 0; r < visible; ++r) {
      const float prob = __expf(dot<kDim>(q, k_tile[r]) * p.scale - lse);
      const float dscore = prob * (dot<kDim>(dout, v_tile[r]) - delta) * p.scale;
#pragma unroll
      for (int c = 0; c < kDim; ++c) dq[c] += dscore * k_tile[r][c];
    }
  }
  if (i >= p.seq_q) return;
  T* out = static_cast<T*>(g.dq) + q_rows.at(b, i, h, kDim);
#pragma unroll
  for (int c = 0; c < kDim; ++c) out[c] = from_float<T>(dq[c]);
}

// dK, dV: one key row per thread (of one query head), query tiles in shared memory.
template <typename T, int kDim>
__global__ void __launch_bounds__(kRows) dkdv_kernel(AttentionParams p, AttentionGradParams g) {
  __shared__ float q_tile[kTile][kDim], do_tile[kTile][kDim];
  __shared__ float lse_tile[kTile], delta_tile[kTile];
  const int b = blockIdx.z, h = blockIdx.y, j = blockIdx.x * kRows + threadIdx.x;
  const int kvh = h / (p.heads / p.kv_heads), offset = p.seq_k - p.seq_q;
  const RowLayout q_rows{p.seq_q, p.heads}, kv_rows{p.seq_k, p.kv_heads}, grad_rows{p.seq_k, p.heads};
  const bool valid = j < p.seq_k;
  float k[kDim], v[kDim], dk[kDim], dv[kDim];
  if (valid) {
    load_row<T, kDim>(static_cast<const T*>(p.k) + kv_rows.at(b, j, kvh, kDim), k);
    load_row<T, kDim>(static_cast<const T*>(p.v) + kv_rows.at(b, j, kvh, kDim), v);
  }
#pragma unroll
  for (int c = 0; c < kDim; ++c) dk[c] = dv[c] = 0.0f;
  // The first query that sees any key of this block.
  const int first_key = blockIdx.x * kRows;
  const int q_begin = p.causal ? max(0, first_key - offset) : 0;
  const long stats = (static_cast<long>(b) * p.heads + h) * p.seq_q;
  for (int i0 = q_begin / kTile * kTile; i0 < p.seq_q; i0 += kTile) {
    __syncthreads();
    load_tile<T, kDim>(static_cast<const T*>(p.q), q_rows, b, h, i0, p.seq_q, q_tile);
    load_tile<T, kDim>(static_cast<const T*>(g.dout), q_rows, b, h, i0, p.seq_q, do_tile);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      const bool in = i0 + r < p.seq_q;
      lse_tile[r] = in ? p.lse[stats + i0 + r] : -CUDART_INF_F;
      delta_tile[r] = in ? g.delta[stats + i0 + r] : 0.0f;
    }
    __syncthreads();
    if (!valid) continue;
    for (int r = 0; r < kTile; ++r) {
      const int i = i0 + r;
      if (i >= p.seq_q || lse_tile[r] == -CUDART_INF_F || (p.causal && j > i + offset)) continue;
      const float prob = __expf(dot<kDim>(q_tile[r], k) * p.scale - lse_tile[r]);
      const float dscore = prob * (dot<kDim>(do_tile[r], v) - delta_tile[r]) * p.scale;
#pragma unroll
      for (int c = 0; c < kDim; ++c) {
        dv[c] += prob * do_tile[r][c];
        dk[c] += dscore * q_tile[r][c];
      }
    }
  }
  if (!valid) return;
  float *dk_out = g.dk + grad_rows.at(b, j, h, kDim), *dv_out = g.dv + grad_rows.at(b, j, h, kDim);
#pragma unroll
  for (int c = 0; c < kDim; ++c) {
    dk_out[c] = dk[c];
    dv_out[c] = dv[c];
  }
}

template <typename T, int kDim>
cudaError_t launch(const AttentionParams& p, const AttentionGradParams* g, cudaStream_t stream) {
  const dim3 q_grid((p.seq_q + kRows - 1) / kRows, p.heads, p.batch);
  if (!g) {
    forward_kernel<T, kDim><<<q_grid, kRows, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const long rows = static_cast<long>(p.batch) * p.heads * p.seq_q;
  delta_kernel<T, kDim><<<(rows + 255) / 256, 256, 0, stream>>>(p, *g);
  dq_kernel<T, kDim><<<q_grid, kRows, 0, stream>>>(p, *g);
  const dim3 k_grid((p.seq_k + kRows - 1) / kRows, p.heads, p.batch);
  dkdv_kernel<T, kDim><<<k_grid, kRows, 0, stream>>>(p, *g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dim(const AttentionParams& p, const AttentionGradParams* g, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, g, stream);
    case 64: return launch<T, 64>(p, g, stream);
    case 128: return launch<T, 128>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dispatch(const AttentionParams& p, const AttentionGradParams* g, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return dispatch_dim<float>(p, g, stream);
    case DType::kBFloat16: return dispatch_dim<__nv_bfloat16>(p, g, stream);
    case DType::kFloat16: return dispatch_dim<__half>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool attention_supports_head_dim(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

cudaError_t attention_forward(const AttentionParams& params, cudaStream_t stream) {
  return dispatch(params, nullptr, stream);
}

cudaError_t attention_backward(const AttentionParams& params, const AttentionGradParams& grads, cudaStream_t stream) {
  return dispatch(params, &grads, stream);
}

}  // namespace cuda
}  // namespace longtrain
