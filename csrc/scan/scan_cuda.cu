// Selective scan of Mamba on CUDA, forward and backward, after the hardware-aware scan of
// Gu & Dao 2023 ("Mamba", section 3.3): the state never goes to global memory except at chunk
// boundaries, and the backward recomputes states instead of reading them.
//
// A block holds kWarps channels of one batch row; a warp owns one channel and lane n holds state
// n in a register (state <= 32). The sequence is walked in chunks of kScanChunk steps: B_t and
// C_t of the chunk are staged once per block in shared memory (they do not depend on the
// channel), u, delta, z per warp. The forward writes the state at every chunk start; the backward
// walks chunks in reverse, re-runs the forward of one chunk from its checkpoint into shared memory,
// then runs the adjoint recurrence g_{t-1} = exp(dt_t A) * (g_t + dy_t C_t) backwards through it.
// dB and dC, summed over channels, are accumulated in shared memory per block and then with
// atomicAdd in global memory (so the backward is not bitwise deterministic). A document reset at
// step t zeroes the state before the step; in the backward its decay is 0, which stops the adjoint.
#include "../common/cuda_math.cuh"
#include "scan_cuda.h"

namespace longtrain {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kChunk = kScanChunk;
constexpr int kMaxState = kScanMaxState;

template <typename T>
struct ScanShared {
  float B[kChunk][kMaxState], C[kChunk][kMaxState];
  float u[kWarps][kChunk], dt[kWarps][kChunk], z[kWarps][kChunk], y[kWarps][kChunk];
  bool reset[kChunk];
};

// Stage one chunk of B, C and the resets (per block) and u, dt, z (per warp) in shared memory.
template <typename T>
__device__ void load_chunk(const ScanParams& p, ScanShared<T>& s, int b, int d, int warp, int lane, int t0, int len) {
  const T* B = static_cast<const T*>(p.B) + static_cast<long>(b) * p.state * p.seq;
  const T* C = static_cast<const T*>(p.C) + static_cast<long>(b) * p.state * p.seq;
  for (int i = threadIdx.x; i < kChunk * kMaxState; i += blockDim.x) {
    const int n = i / kChunk, t = i % kChunk;  // consecutive threads read consecutive steps
    const bool in = n < p.state && t < len;
    s.B[t][n] = in ? to_float(B[static_cast<long>(n) * p.seq + t0 + t]) : 0.0f;
    s.C[t][n] = in ? to_float(C[static_cast<long>(n) * p.seq + t0 + t]) : 0.0f;
  }
  for (int t = threadIdx.x; t < kChunk; t += blockDim.x)
    s.reset[t] = p.reset && t < len && p.reset[static_cast<long>(b) * p.seq + t0 + t];
  if (d < p.dim) {
    const long row = (static_cast<long>(b) * p.dim + d) * p.seq + t0;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
    for (int t = lane; t < kChunk; t += 32) {
      const bool in = t < len;
      const float delta = in ? to_float(static_cast<const T*>(p.delta)[row + t]) + bias : 0.0f;
      s.u[warp][t] = in ? to_float(static_cast<const T*>(p.u)[row + t]) : 0.0f;
      s.dt[warp][t] = p.softplus ? softplus(delta) : delta;
      s.z[warp][t] = (in && p.z) ? to_float(static_cast<const T*>(p.z)[row + t]) : 0.0f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) scan_forward_kernel(ScanParams p) {
  __shared__ ScanShared<T> s;
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = blockIdx.x * kWarps + warp;
  const bool active = d < p.dim, has_state = active && lane < p.state;
  const long bd = static_cast<long>(b) * p.dim + d;
  const float A = has_state ? p.A[d * p.state + lane] : 0.0f;
  float h = (has_state && p.initial) ? p.initial[bd * p.state + lane] : 0.0f;
  for (int c = 0; c < p.n_chunks; ++c) {
    const int t0 = c * kChunk, len = min(kChunk, p.seq - t0);
    if (has_state) p.checkpoints[(bd * p.n_chunks + c) * p.state + lane] = h;
    __syncthreads();
    load_chunk(p, s, b, d, warp, lane, t0, len);
    __syncthreads();
    for (int t = 0; t < len; ++t) {
      const float dt = s.dt[warp][t];
      if (s.reset[t]) h = 0.0f;
      h = __expf(dt * A) * h + dt * s.u[warp][t] * s.B[t][lane];
      const float y = warp_sum(s.C[t][lane] * h);
      if (lane == 0) s.y[warp][t] = y;
    }
    __syncwarp();
    if (active) {
      const float skip = p.D ? p.D[d] : 0.0f;
      for (int t = lane; t < len; t += 32) {
        float y = s.y[warp][t] + skip * s.u[warp][t];
        if (p.z) y *= s.z[warp][t] * sigmoid(s.z[warp][t]);
        static_cast<T*>(p.out)[bd * p.seq + t0 + t] = from_float<T>(y);
      }
    }
  }
  if (has_state) p.last[bd * p.state + lane] = h;
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) scan_backward_kernel(ScanParams p, ScanGradParams g) {
  __shared__ ScanShared<T> s;
  __shared__ float states[kWarps][kChunk][kMaxState];
  __shared__ float dB[kChunk][kMaxState], dC[kChunk][kMaxState];
  __shared__ float dout[kWarps][kChunk];
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = blockIdx.x * kWarps + warp;
  const bool active = d < p.dim, has_state = active && lane < p.state;
  const long bd = static_cast<long>(b) * p.dim + d;
  const float A = has_state ? p.A[d * p.state + lane] : 0.0f;
  const float skip = (active && p.D) ? p.D[d] : 0.0f;
  const float bias = (active && p.delta_bias) ? p.delta_bias[d] : 0.0f;
  float adj = (has_state && g.dlast) ? g.dlast[bd * p.state + lane] : 0.0f;  // dL/dh_t
  float dA = 0.0f, dD = 0.0f;
  for (int c = p.n_chunks - 1; c >= 0; --c) {
    const int t0 = c * kChunk, len = min(kChunk, p.seq - t0);
    __syncthreads();
    load_chunk(p, s, b, d, warp, lane, t0, len);
    for (int i = threadIdx.x; i < kChunk * kMaxState; i += blockDim.x) {
      dB[i / kMaxState][i % kMaxState] = 0.0f;
      dC[i / kMaxState][i % kMaxState] = 0.0f;
    }
    if (active)
      for (int t = lane; t < len; t += 32) dout[warp][t] = to_float(static_cast<const T*>(g.dout)[bd * p.seq + t0 + t]);
    __syncthreads();
    // Recompute the chunk's states from its checkpoint.
    const float h_start = has_state ? p.checkpoints[(bd * p.n_chunks + c) * p.state + lane] : 0.0f;
    float h = h_start;
    for (int t = 0; t < len; ++t) {
      const float dt = s.dt[warp][t];
      if (s.reset[t]) h = 0.0f;
      h = __expf(dt * A) * h + dt * s.u[warp][t] * s.B[t][lane];
      states[warp][t][lane] = h;
      const float y = warp_sum(s.C[t][lane] * h);
      if (lane == 0) s.y[warp][t] = y;
    }
    __syncwarp();
    for (int t = len - 1; t >= 0; --t) {
      const float u = s.u[warp][t], dt = s.dt[warp][t], z = s.z[warp][t];
      float dy = dout[warp][t];
      if (p.z) {
        const float sz = sigmoid(z), y = s.y[warp][t] + skip * u;
        if (active && lane == 0) g.dz[bd * p.seq + t0 + t] = dy * y * sz * (1.0f + z * (1.0f - sz));
        dy *= z * sz;
      }
      dD += dy * u;
      const float h_t = states[warp][t][lane], h_prev = t > 0 ? states[warp][t - 1][lane] : h_start;
      const float decay = s.reset[t] ? 0.0f : __expf(dt * A);  // a reset cuts the state's history
      adj += dy * s.C[t][lane];
      if (has_state) {
        atomicAdd(&dC[t][lane], dy * h_t);
        atomicAdd(&dB[t][lane], adj * dt * u);
      }
      const float through_decay = adj * h_prev * decay;
      dA += through_decay * dt;
      const float sum_gB = warp_sum(adj * s.B[t][lane]), sum_gA = warp_sum(through_decay * A);
      adj *= decay;
      if (active && lane == 0) {
        g.du[bd * p.seq + t0 + t] = dy * skip + dt * sum_gB;
        float ddt = u * sum_gB + sum_gA;
        if (p.softplus) ddt *= sigmoid(to_float(static_cast<const T*>(p.delta)[bd * p.seq + t0 + t]) + bias);
        g.ddelta[bd * p.seq + t0 + t] = ddt;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kChunk * kMaxState; i += blockDim.x) {
      const int n = i / kChunk, t = i % kChunk;
      if (n < p.state && t < len) {
        const long at = (static_cast<long>(b) * p.state + n) * p.seq + t0 + t;
        atomicAdd(&g.dB[at], dB[t][n]);
        atomicAdd(&g.dC[at], dC[t][n]);
      }
    }
  }
  if (has_state) {
    g.dinitial[bd * p.state + lane] = adj;
    g.dA[bd * p.state + lane] = dA;
  }
  if (active && lane == 0) g.dD[bd] = dD;
}

template <typename T>
cudaError_t launch(const ScanParams& p, const ScanGradParams* g, cudaStream_t stream) {
  if (p.state > kMaxState) return cudaErrorInvalidValue;
  const dim3 grid((p.dim + kWarps - 1) / kWarps, p.batch);
  if (g) {
    scan_backward_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p, *g);
  } else {
    scan_forward_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t dispatch(const ScanParams& p, const ScanGradParams* g, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, g, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, g, stream);
    case DType::kFloat16: return launch<__half>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t scan_forward(const ScanParams& params, cudaStream_t stream) { return dispatch(params, nullptr, stream); }

cudaError_t scan_backward(const ScanParams& params, const ScanGradParams& grads, cudaStream_t stream) {
  return dispatch(params, &grads, stream);
}

}  // namespace cuda
}  // namespace longtrain
