// Selective scan of Mamba on CPU, forward and backward (Gu & Dao 2023, "Mamba", Alg. 2):
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t,   y_t = <C_t, h_t> + D * u_t,   out_t = y_t * silu(z_t)
//   with dt_t = softplus(delta_t + delta_bias) when delta_softplus.
//
// The forward's tasks are (batch, channel) (common/cpu_parallel.h); each runs the recurrence over
// the whole sequence with the state in a small array that the compiler keeps in vector registers
// (the state dimension is padded to a multiple of 16 lanes). The forward stores the state only at
// the start of every `chunk` steps; the backward re-runs the forward inside one chunk at a time
// (states and decays kept in an L1-sized buffer) and then walks that chunk in reverse, as the CUDA
// kernel of mamba-ssm recomputes its states rather than storing them. dB and dC sum over channels,
// so the backward runs in segments of time, each as tasks of (batch, fixed block of channels) that
// add their channels in order into the block's own partial, whose sum in block order follows: the
// order of every sum is fixed, whatever the timing or thread count (cpu_parallel.h). Inputs of any
// float dtype are read as float32; all accumulation is float32. exp, softplus and sigmoid are the polynomial
// forms of common/cpu_math.h (no -ffast-math), within a few float32 ulp of libm.
//
// Document resets (packed sequences, like Mamba-2's seq_idx): at a step t with reset[b, t] the state
// is zeroed before the step, so h_t = dt_t * u_t * B_t. The backward's recomputed chunk then keeps a
// decay of 0 for that step, which stops dL/dh (and the decay's share of dA and ddelta) there, also
// when the reset is the first step of a chunk and the checkpoint holds the state before it.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/cpu_parallel.h"
#include "scan_checks.h"

namespace longtrain {
namespace {

constexpr int64_t kLanes = 16;
// The backward's blocks: at least kMinBlockChannels channels each and at most kMaxBlocks blocks per
// batch row (the final sum reads each block's partial once: few blocks keep it cheap, enough blocks
// keep the workers busy), segments of about kSegmentSteps steps (their partials stay in L2).
constexpr int64_t kMinBlockChannels = 32, kMaxBlocks = 64, kSegmentSteps = 1024;

struct ScanProblem {
  int64_t batch, dim, seq, state, padded, chunk, n_chunks;
  const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias, *initial;  // B, C as (batch, seq, padded)
  bool softplus;
  const bool* reset;  // (batch, seq) or null
};

// Steps [t0, t1) of the recurrence for one channel; `h` holds the state in and out. Writes each
// step's y_t = <C_t, h_t> (before the D skip and gate), and with kKeep its state and decay. kReset:
// p.reset is given (a separate instance, so that the loop without resets is the one it always was).
template <bool kKeep, bool kReset>
LT_INLINE void scan_steps(const ScanProblem& p, int64_t b, int64_t d, int64_t t0, int64_t t1, float* __restrict h,
                          float* __restrict y, float* __restrict states, float* __restrict decays,
                          const float* __restrict dts, float* __restrict lanes) {
  const int64_t np = p.padded;
  const float* __restrict A = p.A + d * np;
  const float* __restrict u = p.u + (b * p.dim + d) * p.seq;
  const bool* __restrict reset = kReset ? p.reset + b * p.seq : nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    const bool starts = kReset && reset[t];
    if (starts) std::fill(h, h + np, 0.0f);
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
    if (kKeep && starts) std::fill(decays + (t - t0) * np, decays + (t - t0 + 1) * np, 0.0f);
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
  if (keep && p.reset) {
    scan_steps<true, true>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  } else if (keep) {
    scan_steps<true, false>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  } else if (p.reset) {
    scan_steps<false, true>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  } else {
    scan_steps<false, false>(p, b, d, t0, t1, h, y, states, decays, dts, lanes);
  }
}

// Per-worker scratch of one chunk: the recomputed states and decays (chunk x padded) and
// per-step values (chunk each), 16-lane partial sums per step awaiting their reduction, and the
// state at the chunk's start and end (padded; the padding lanes stay zero). Each task writes what it
// reads: nothing carries from one task to the next.
struct ChunkBuffers {
  std::vector<float> states, decays, dts, ys, dys, sum_gB, sum_gA, lanes_B, lanes_A, h, h_start;
  explicit ChunkBuffers(const ScanProblem& p)
      : states(p.chunk * p.padded), decays(p.chunk * p.padded), dts(p.chunk), ys(p.chunk), dys(p.chunk),
        sum_gB(p.chunk), sum_gA(p.chunk), lanes_B(p.chunk * kLanes), lanes_A(p.chunk * kLanes), h(p.padded),
        h_start(p.padded) {}
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
  const float *dout, *checkpoints;
  float *du, *ddelta, *dz;
  float *dA, *dD, *ddelta_bias;  // per (batch, channel): (batch, dim, padded), (batch, dim), (batch, dim)
  float* g;                      // dL/dh carried back from segment to segment, (batch, dim, padded)
};

// Reverse pass over one chunk, given its recomputed states, decays and y; `g` is dL/dh_t carried
// back; dB, dC point at the chunk's first step in a (steps, padded) partial. The per-step scalar
// work (gate, skip, softplus derivative) runs in separate loops over the chunk so that it
// vectorizes too; only the recurrence itself goes step by step.
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
    float* __restrict dBt = dB + s * np;
    float* __restrict dCt = dC + s * np;
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
  if (p.delta_bias) {
    float sum = 0.0f;
    for (int64_t s = 0; s < len; ++s) sum += ddelta[s];
    grads.ddelta_bias[bd] += sum;
  }
}

// Chunks [c0, c1) of one channel, last first, adding into its block's partials dB, dC (steps from
// c0 * chunk on, padded).
void scan_backward_segment(const ScanProblem& p, const ScanGrads& gr, int64_t b, int64_t d, int64_t c0, int64_t c1,
                           ChunkBuffers& buf, float* dB, float* dC) {
  const int64_t np = p.padded, bd = b * p.dim + d;
  float *h = buf.h.data(), *h_start = buf.h_start.data();
  for (int64_t c = c1 - 1; c >= c0; --c) {
    const int64_t t0 = c * p.chunk, t1 = std::min(p.seq, t0 + p.chunk), offset = (t0 - c0 * p.chunk) * np;
    const float* start = gr.checkpoints + (bd * p.n_chunks + c) * p.state;
    std::copy(start, start + p.state, h_start);
    std::copy(h_start, h_start + np, h);
    scan_chunk(p, b, d, t0, t1, h, buf.ys.data(), buf.states.data(), buf.decays.data(), buf.dts.data(),
               buf.lanes_B.data(), true);
    reverse_chunk(p, gr, b, d, t0, t1, buf, h_start, gr.g + bd * np, gr.dA + bd * np, dB + offset, dC + offset);
  }
}

// x (batch, ...) contiguous, summed over the batch in index order.
at::Tensor sum_batch(const at::Tensor& x) {
  at::Tensor out = at::empty(x.sizes().slice(1), x.options());
  sum_in_order(x.data_ptr<float>(), x.size(0), out.numel(), out.numel(), out.data_ptr<float>());
  return out;
}

// dB and dC (batch, seq, padded), summed over channels. Tasks are (batch, block of channels), each
// adding its channels in order into its block's partial; the partials are then summed in block order.
// Time runs in segments, last first (g carries dL/dh between them), so that partials hold a segment.
void backward_in_blocks(const ScanProblem& p, const ScanGrads& gr, float* dB, float* dC) {
  const int64_t np = p.padded;
  const int64_t block = std::max(kMinBlockChannels, (p.dim + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = std::max<int64_t>(1, (p.dim + block - 1) / block), tasks = p.batch * blocks;
  const int64_t segment_chunks = std::max<int64_t>(1, kSegmentSteps / p.chunk);
  const int64_t segment = std::min(p.seq, segment_chunks * p.chunk);  // steps of a partial
  const AlignedFloats parts_B = aligned_floats(tasks * segment * np), parts_C = aligned_floats(tasks * segment * np);
  std::vector<ChunkBuffers> buffers(task_workers(tasks), ChunkBuffers(p));
  for (int64_t c1 = p.n_chunks; c1 > 0; c1 -= segment_chunks) {
    const int64_t c0 = std::max<int64_t>(0, c1 - segment_chunks), t0 = c0 * p.chunk;
    const int64_t steps = std::min(p.seq, c1 * p.chunk) - t0;
    parallel_tasks(tasks, [&](int64_t task, int64_t worker) {
      const int64_t b = task / blocks, d0 = task % blocks * block, d1 = std::min(p.dim, d0 + block);
      float *part_B = parts_B.get() + task * segment * np, *part_C = parts_C.get() + task * segment * np;
      std::fill(part_B, part_B + steps * np, 0.0f);
      std::fill(part_C, part_C + steps * np, 0.0f);
      for (int64_t d = d0; d < d1; ++d) scan_backward_segment(p, gr, b, d, c0, c1, buffers[worker], part_B, part_C);
    });
    at::parallel_for(0, p.batch * steps, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end;) {  // the rows of one batch row at a time
        const int64_t b = row / steps, t = row % steps, rows = std::min(end - row, steps - t);
        const int64_t first = b * blocks * segment * np + t * np, out = (b * p.seq + t0 + t) * np;
        sum_in_order(parts_B.get() + first, blocks, segment * np, rows * np, dB + out);
        sum_in_order(parts_C.get() + first, blocks, segment * np, rows * np, dC + out);
        row += rows;
      }
    });
  }
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
  at::Tensor u, delta, A, B, C, D, z, delta_bias, reset;
  bool has_D, has_z, has_delta_bias;  // not the pointers: an empty tensor's may be null (seq 0)
};

// Float32 copies in the kernel's layout of inputs already checked (check_scan_inputs).
Prepared prepare(const ScanShape& s, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias, bool softplus,
                 int64_t chunk, const std::optional<at::Tensor>& reset) {
  Prepared r;
  const int64_t padded = (s.state + kLanes - 1) / kLanes * kLanes;
  r.u = as_float(u);
  r.delta = as_float(delta);
  r.A = at::constant_pad_nd(A.to(at::kFloat), {0, padded - s.state}).contiguous();
  r.B = pad_transpose(B, padded);
  r.C = pad_transpose(C, padded);
  r.has_D = checks::Call::present(D);
  r.has_z = checks::Call::present(z);
  r.has_delta_bias = checks::Call::present(delta_bias);
  if (r.has_D) r.D = as_float(*D);
  if (r.has_z) r.z = as_float(*z);
  if (r.has_delta_bias) r.delta_bias = as_float(*delta_bias);
  // An empty tensor's pointer may be null (seq 0): then no step reads it.
  if (checks::Call::present(reset)) r.reset = reset->contiguous();
  r.p = ScanProblem{s.batch, s.dim, s.seq, s.state, padded, chunk, s.n_chunks, r.u.data_ptr<float>(),
                    r.delta.data_ptr<float>(), r.A.data_ptr<float>(), r.B.data_ptr<float>(), r.C.data_ptr<float>(),
                    opt_ptr(r.D), opt_ptr(r.z), opt_ptr(r.delta_bias), nullptr, softplus,
                    r.reset.defined() ? r.reset.data_ptr<bool>() : nullptr};
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus, const std::optional<at::Tensor>& initial_state, int64_t chunk,
    const std::optional<at::Tensor>& reset) {
  const checks::Call call("selective_scan_fwd", u, "u", c10::DeviceType::CPU);
  const ScanShape shape = check_scan_inputs(call, u, delta, A, B, C, D, z, delta_bias, chunk);
  check_scan_initial_state(call, shape, initial_state);
  check_scan_reset(call, shape, reset);
  Prepared r = prepare(shape, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, reset);
  at::Tensor initial;
  if (checks::Call::present(initial_state)) initial = as_float(*initial_state);
  r.p.initial = opt_ptr(initial);
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
                       const at::Tensor& checkpoints, int64_t chunk, const std::optional<at::Tensor>& reset) {
  const checks::Call call("selective_scan_bwd", dout, "dout", c10::DeviceType::CPU);
  const ScanShape shape = check_scan_inputs(call, u, delta, A, B, C, D, z, delta_bias, chunk);
  check_scan_grads(call, shape, dout, dlast_state, checkpoints);
  check_scan_reset(call, shape, reset);
  Prepared r = prepare(shape, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, reset);
  const ScanProblem& p = r.p;
  const int64_t np = p.padded;
  auto opts = u.options().dtype(at::kFloat);
  at::Tensor dout_f = as_float(dout), cps = as_float(checkpoints);
  at::Tensor g = at::zeros({p.batch, p.dim, np}, opts);  // dL/dh, from dlast_state at the end of the sequence
  if (checks::Call::present(dlast_state)) g.narrow(2, 0, p.state).copy_(*dlast_state);
  at::Tensor du = at::empty({p.batch, p.dim, p.seq}, opts), ddelta = at::empty_like(du);
  at::Tensor dz = r.has_z ? at::empty_like(du) : at::empty({0}, opts);
  at::Tensor dA = at::zeros({p.batch, p.dim, np}, opts), dD = at::zeros({p.batch, p.dim}, opts);
  at::Tensor ddelta_bias = at::zeros({p.batch, p.dim}, opts);
  ScanGrads gr{dout_f.data_ptr<float>(), cps.data_ptr<float>(), du.data_ptr<float>(), ddelta.data_ptr<float>(),
               r.has_z ? dz.data_ptr<float>() : nullptr, dA.data_ptr<float>(), dD.data_ptr<float>(),
               ddelta_bias.data_ptr<float>(), g.data_ptr<float>()};
  at::Tensor dB = at::empty({p.batch, p.seq, np}, opts), dC = at::empty_like(dB);
  backward_in_blocks(p, gr, dB.data_ptr<float>(), dC.data_ptr<float>());
  auto unpad = [&](const at::Tensor& x) { return x.narrow(2, 0, p.state).transpose(1, 2).contiguous(); };
  at::Tensor dinitial = g.narrow(2, 0, p.state).contiguous();
  return {du, ddelta, sum_batch(dA).narrow(1, 0, p.state).contiguous(), unpad(dB), unpad(dC),
          r.has_D ? sum_batch(dD) : at::empty({0}, opts), dz,
          r.has_delta_bias ? sum_batch(ddelta_bias) : at::empty({0}, opts), dinitial};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace longtrain
