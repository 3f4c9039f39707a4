// Selective scan of Mamba on CPU, forward and backward (Gu & Dao 2023, "Mamba", Alg. 2):
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t,   y_t = <C_t, h_t> + D * u_t,   out_t = y_t * silu(z_t)
//   with dt_t = softplus(delta_t + delta_bias) when delta_softplus.
//
// Work is split over (batch, channel) tasks (common/cpu_parallel.h); each runs the recurrence over
// the whole sequence with the state in a small array that the compiler keeps in vector registers
// (the state dimension is padded to a multiple of 16 lanes). The forward stores the state only at
// the start of every `chunk` steps; the backward re-runs the forward inside one chunk at a time
// (states and decays kept in an L1-sized buffer) and then walks that chunk in reverse, as the CUDA
// kernel of mamba-ssm recomputes its states rather than storing them. Inputs of any float dtype
// are read as float32; all accumulation is float32. exp, softplus and sigmoid are the polynomial
// forms of common/cpu_math.h (no -ffast-math), within a few float32 ulp of libm.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/cpu_parallel.h"

namespace longtrain {
namespace {

constexpr int64_t kLanes = 16;

struct ScanProblem {
  int64_t batch, dim, seq, state, padded, chunk, n_chunks;
  const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *initial;  // B, C as (batch, seq, padded)
  bool softplus;
};

// Steps [t0, t1) of the recurrence for one channel; `h` holds the state in and out. Writes each
// step's y_t = <C_t, h_t> (before the D skip and gate), and with kKeep its state and decay.
template <bool kKeep>
LT_INLINE void scan_steps(const ScanProblem& p, int64_t b, int64_t d, int64_t t0, int64_t t1, float* __restrict h,
                          float* __restrict y, float* __restrict states, float* __restrict decays,
                          const float* __restrict dts, float* __restrict lanes) {
  const int64_t np = p.padded;
  const float* __restrict A = p.A + d * np;
  const float* __restrict u = p.u + (b * p.dim + d) * p.seq;
  for (int64_t t = t0; t < t1; ++t) {
    const float dt = dts[t - t0];
    const float dtu = dt * u[t];
    const float* __restrict Bt = p.B + (b * p.seq + t) * np;
    const float* __restrict Ct = p.C + (b * p.seq + t) * np;
    float acc[kLanes] = {0};
    for (int64_t n0 = 0; n0 < np; n0 += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) {
        const float decay = exp_approx(dt * A[n0 + i]);
        const float hn = decay * h[n0 + i] + dtu * Bt[n0 + i];
        h[n0 + i] = hn;
        acc[i] += Ct[n0 + i] * hn;
        if (kKeep) {
          states[(t - t0) * np + n0 + i] = hn;
          decays[(t - t0) * np + n0 + i] = decay;
        }
      }
    }
    std::memcpy(lanes + (t - t0) * kLanes, acc, sizeof(acc));
  }
  row_sums(lanes, t1 - t0, y);  // y_t for the whole chunk, 16 steps per batch of reductions
}

// One chunk of the recurrence for one channel: the step sizes dt into `dts`, then the steps; the
// backward (keep = true) also keeps every state and decay of the chunk.
LT_VECTOR_CLONES
void scan_chunk(const ScanProblem& p, int64_t b, int64_t d, int64_t t0, int64_t t1, float* __restrict h,
                float* __restrict y, float* __restrict states, float* __restrict decays, float* __restrict dts,
                float* __restrict lanes, bool keep) {
  const float* __restrict delta = p.delta + (b * p.dim + d) * p.seq;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
  if (p.softplus) {
    for (int64_t t = t0; t < t1; ++t) dts[t - t0] = softplus_approx(delta[t] + bias);
  } else {
    for (int64_t t = t0; t < t1; ++t) dts[t - t0] = delta[t] + bias;
  }
  if (keep) {
    scan_steps<true>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  } else {
    scan_steps<false>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  }
}

// Per-worker scratch of one chunk: the recomputed states and decays (chunk x padded) and
// per-step values (chunk each), and 16-lane partial sums per step awaiting their reduction.
struct ChunkBuffers {
  std::vector<float> states, decays, dts, ys, dys, sum_gB, sum_gA, lanes_B, lanes_A;
  explicit ChunkBuffers(const ScanProblem& p)
      : states(p.chunk * p.padded), decays(p.chunk * p.padded), dts(p.chunk), ys(p.chunk), dys(p.chunk),
        sum_gB(p.chunk), sum_gA(p.chunk), lanes_B(p.chunk * kLanes), lanes_A(p.chunk * kLanes) {}
};

// out = (y + D u) * silu(z), in place over one channel's row.
LT_VECTOR_CLONES
void skip_and_gate(float* __restrict y, const float* __restrict u, const float* __restrict z, float skip, int64_t n) {
  if (z) {
    for (int64_t t = 0; t < n; ++t) y[t] = (y[t] + skip * u[t]) * z[t] * sigmoid_approx(z[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) y[t] += skip * u[t];
  }
}

void scan_forward_channel(const ScanProblem& p, int64_t b, int64_t d, float* out, float* last, float* checkpoints,
                          ChunkBuffers& buf) {
  const int64_t np = p.padded, bd = b * p.dim + d;
  std::vector<float> h(np, 0.0f);
  if (p.initial) std::copy(p.initial + bd * p.state, p.initial + (bd + 1) * p.state, h.begin());
  float* y = out + bd * p.seq;
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    std::copy(h.begin(), h.begin() + p.state, checkpoints + (bd * p.n_chunks + c) * p.state);
    scan_chunk(p, b, d, c * p.chunk, std::min(p.seq, (c + 1) * p.chunk), h.data(), y + c * p.chunk,
               buf.states.data(), buf.decays.data(), buf.dts.data(), buf.lanes_B.data(), false);
  }
  std::copy(h.begin(), h.begin() + p.state, last + bd * p.state);
  skip_and_gate(y, p.u + bd * p.seq, p.z ? p.z + bd * p.seq : nullptr, p.D ? p.D[d] : 0.0f, p.seq);
}

struct ScanGrads {
  const float *dout, *dlast, *checkpoints;
  float *du, *ddelta, *dz, *dinitial;
  float *dA, *dD;    // per (batch, channel): (batch, dim, padded), (batch, dim)
  float *dB, *dC;    // per worker: (workers, batch, seq, padded), summed afterwards
};

// Reverse pass over one chunk, given its recomputed states, decays and y; `g` is dL/dh_t carried
// back. The per-step scalar work (gate, skip, softplus derivative) runs in separate loops over
// the chunk so that it vectorizes too; only the recurrence itself goes step by step.
LT_VECTOR_CLONES
void reverse_chunk(const ScanProblem& p, const ScanGrads& grads, int64_t b, int64_t d, int64_t t0, int64_t t1,
                   ChunkBuffers& buf, const float* __restrict h_start, float* __restrict g, float* __restrict dA,
                   float* __restrict dB, float* __restrict dC) {
  const int64_t np = p.padded, bd = b * p.dim + d, len = t1 - t0;
  const float* __restrict A = p.A + d * np;
  const float* __restrict u = p.u + bd * p.seq + t0;
  const float* __restrict dout = grads.dout + bd * p.seq + t0;
  const float* __restrict ys = buf.ys.data();
  const float* __restrict dts = buf.dts.data();
  float* __restrict dys = buf.dys.data();
  float* __restrict sum_gB = buf.sum_gB.data();
  float* __restrict sum_gA = buf.sum_gA.data();
  float* __restrict lanes_B = buf.lanes_B.data();
  float* __restrict lanes_A = buf.lanes_A.data();
  const float skip = p.D ? p.D[d] : 0.0f;
  if (p.z) {
    const float* __restrict z = p.z + bd * p.seq + t0;
    float* __restrict dz = grads.dz + bd * p.seq + t0;
    for (int64_t s = 0; s < len; ++s) {
      const float sz = sigmoid_approx(z[s]), y = ys[s] + skip * u[s];
      dz[s] = dout[s] * y * sz * (1.0f + z[s] * (1.0f - sz));
      dys[s] = dout[s] * z[s] * sz;
    }
  } else {
    for (int64_t s = 0; s < len; ++s) dys[s] = dout[s];
  }
  float dD_sum = 0.0f;  // kept local: neighbouring channels' dD share a cache line across workers
  for (int64_t s = 0; s < len; ++s) dD_sum += dys[s] * u[s];
  grads.dD[bd] += dD_sum;
  for (int64_t s = len - 1; s >= 0; --s) {
    const float* __restrict h = buf.states.data() + s * np;
    const float* __restrict h_prev = s > 0 ? h - np : h_start;
    const float* __restrict decay = buf.decays.data() + s * np;
    const float* __restrict Bt = p.B + (b * p.seq + t0 + s) * np;
    const float* __restrict Ct = p.C + (b * p.seq + t0 + s) * np;
    float* __restrict dBt = dB + (t0 + s) * np;
    float* __restrict dCt = dC + (t0 + s) * np;
    const float dt = dts[s], dy = dys[s], dtu = dt * u[s];
    float gB[kLanes] = {0}, gA[kLanes] = {0};
    for (int64_t n0 = 0; n0 < np; n0 += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t n = n0 + i;
        const float gn = g[n] + dy * Ct[n];
        dCt[n] += dy * h[n];
        dBt[n] += gn * dtu;
        gB[i] += gn * Bt[n];
        const float through_decay = gn * h_prev[n] * decay[n];
        gA[i] += through_decay * A[n];
        dA[n] += through_decay * dt;
        g[n] = gn * decay[n];
      }
    }
    std::memcpy(lanes_B + s * kLanes, gB, sizeof(gB));
    std::memcpy(lanes_A + s * kLanes, gA, sizeof(gA));
  }
  row_sums(lanes_B, len, sum_gB);
  row_sums(lanes_A, len, sum_gA);
  float* __restrict du = grads.du + bd * p.seq + t0;
  float* __restrict ddelta = grads.ddelta + bd * p.seq + t0;
  for (int64_t s = 0; s < len; ++s) {
    du[s] = dys[s] * skip + dts[s] * sum_gB[s];
    ddelta[s] = u[s] * sum_gB[s] + sum_gA[s];
  }
  if (p.softplus) {
    const float* __restrict delta = p.delta + bd * p.seq + t0;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
    for (int64_t s = 0; s < len; ++s) ddelta[s] *= sigmoid_approx(delta[s] + bias);
  }
}

void scan_backward_channel(const ScanProblem& p, const ScanGrads& gr, int64_t b, int64_t d, int64_t worker,
                           ChunkBuffers& buf) {
  const int64_t np = p.padded, bd = b * p.dim + d;
  std::vector<float> g(np, 0.0f), h(np, 0.0f), h_start(np, 0.0f);
  if (gr.dlast) std::copy(gr.dlast + bd * p.state, gr.dlast + (bd + 1) * p.state, g.begin());
  float* dB = gr.dB + (worker * p.batch + b) * p.seq * np;
  float* dC = gr.dC + (worker * p.batch + b) * p.seq * np;
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * p.chunk, t1 = std::min(p.seq, t0 + p.chunk);
    const float* start = gr.checkpoints + (bd * p.n_chunks + c) * p.state;
    std::copy(start, start + p.state, h_start.begin());
    std::copy(h_start.begin(), h_start.end(), h.begin());
    scan_chunk(p, b, d, t0, t1, h.data(), buf.ys.data(), buf.states.data(), buf.decays.data(), buf.dts.data(),
               buf.lanes_B.data(), true);
    reverse_chunk(p, gr, b, d, t0, t1, buf, h_start.data(), g.data(), gr.dA + bd * np, dB, dC);
  }
  std::copy(g.begin(), g.begin() + p.state, gr.dinitial + bd * p.state);
}

at::Tensor as_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }
const float* opt_ptr(const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; }

// B or C (batch, state, seq) -> (batch, seq, padded) float32, zero in the padding lanes.
at::Tensor pad_transpose(const at::Tensor& x, int64_t padded) {
  auto t = x.to(at::kFloat).transpose(1, 2);
  return at::constant_pad_nd(t, {0, padded - x.size(1)}).contiguous();
}

struct Prepared {
  ScanProblem p;
  at::Tensor u, delta, A, B, C, D, z, delta_bias, initial;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& delta_bias, bool softplus,
                 const std::optional<at::Tensor>& initial, int64_t chunk) {
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "selective_scan: u, delta must be (batch, dim, seq)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "selective_scan: A must be (dim, state)");
  TORCH_CHECK(B.dim() == 3 && C.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == A.size(1) &&
                  B.size(2) == u.size(2) && C.sizes() == B.sizes(),
              "selective_scan: B, C must be (batch, state, seq)");
  TORCH_CHECK(chunk > 0, "selective_scan: chunk must be positive");
  Prepared r;
  const int64_t state = A.size(1), padded = (state + kLanes - 1) / kLanes * kLanes;
  r.u = as_float(u);
  r.delta = as_float(delta);
  r.A = at::constant_pad_nd(A.to(at::kFloat), {0, padded - state}).contiguous();
  r.B = pad_transpose(B, padded);
  r.C = pad_transpose(C, padded);
  if (D && D->defined()) r.D = as_float(*D);
  if (z && z->defined()) r.z = as_float(*z);
  if (delta_bias && delta_bias->defined()) r.delta_bias = as_float(*delta_bias);
  if (initial && initial->defined()) r.initial = as_float(*initial);
  const int64_t seq = u.size(2);
  r.p = ScanProblem{u.size(0), u.size(1), seq, state, padded, chunk, std::max<int64_t>(1, (seq + chunk - 1) / chunk),
                    r.u.data_ptr<float>(), r.delta.data_ptr<float>(), r.A.data_ptr<float>(), r.B.data_ptr<float>(),
                    r.C.data_ptr<float>(), opt_ptr(r.D), opt_ptr(r.z), opt_ptr(r.delta_bias), opt_ptr(r.initial),
                    softplus};
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus, const std::optional<at::Tensor>& initial_state, int64_t chunk) {
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk);
  const ScanProblem& p = r.p;
  auto opts = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.batch, p.dim, p.seq}, opts);
  at::Tensor last = at::empty({p.batch, p.dim, p.state}, opts);
  at::Tensor checkpoints = at::empty({p.batch, p.dim, p.n_chunks, p.state}, opts);
  float *out_ptr = out.data_ptr<float>(), *last_ptr = last.data_ptr<float>(), *cp = checkpoints.data_ptr<float>();
  std::vector<ChunkBuffers> buffers(task_workers(p.batch * p.dim), ChunkBuffers(p));
  parallel_tasks(p.batch * p.dim, [&](int64_t i, int64_t worker) {
    scan_forward_channel(p, i / p.dim, i % p.dim, out_ptr, last_ptr, cp, buffers[worker]);
  });
  return {out.to(u.scalar_type()), last, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
                       const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const at::Tensor& checkpoints, int64_t chunk) {
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, std::nullopt, chunk);
  const ScanProblem& p = r.p;
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef({p.batch, p.dim, p.n_chunks, p.state}),
              "selective_scan_bwd: checkpoints do not match the inputs and chunk");
  auto opts = u.options().dtype(at::kFloat);
  at::Tensor dout_f = as_float(dout), cps = as_float(checkpoints), dlast;
  if (dlast_state && dlast_state->defined()) dlast = as_float(*dlast_state);
  // One task per (batch, channel); dB and dC are summed over channels into one buffer per worker
  // (so without atomics), and the buffers are added up at the end.
  const int64_t workers = task_workers(p.batch * p.dim);
  at::Tensor du = at::empty({p.batch, p.dim, p.seq}, opts), ddelta = at::empty_like(du);
  at::Tensor dz = p.z ? at::empty_like(du) : at::empty({0}, opts);
  at::Tensor dinitial = at::empty({p.batch, p.dim, p.state}, opts);
  at::Tensor dA = at::zeros({p.batch, p.dim, p.padded}, opts), dD = at::zeros({p.batch, p.dim}, opts);
  at::Tensor dB = at::zeros({workers, p.batch, p.seq, p.padded}, opts), dC = at::zeros_like(dB);
  ScanGrads gr{dout_f.data_ptr<float>(), opt_ptr(dlast), cps.data_ptr<float>(), du.data_ptr<float>(),
               ddelta.data_ptr<float>(), p.z ? dz.data_ptr<float>() : nullptr, dinitial.data_ptr<float>(),
               dA.data_ptr<float>(), dD.data_ptr<float>(), dB.data_ptr<float>(), dC.data_ptr<float>()};
  std::vector<ChunkBuffers> buffers(workers, ChunkBuffers(p));
  parallel_tasks(p.batch * p.dim, [&](int64_t task, int64_t worker) {
    scan_backward_channel(p, gr, task / p.dim, task % p.dim, worker, buffers[worker]);
  });
  auto unpad = [&](const at::Tensor& x) { return x.sum(0).narrow(2, 0, p.state).transpose(1, 2).contiguous(); };
  at::Tensor ddelta_bias = p.delta_bias ? ddelta.sum({0, 2}) : at::empty({0}, opts);
  at::Tensor dD_out = p.D ? dD.sum(0) : at::empty({0}, opts);
  return {du, ddelta, dA.sum(0).narrow(1, 0, p.state).contiguous(), unpad(dB), unpad(dC), dD_out, dz, ddelta_bias,
          dinitial};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace longtrain
