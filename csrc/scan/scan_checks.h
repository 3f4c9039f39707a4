// Argument checks of the selective scan ops, shared by the CPU kernel (scan_cpu.cpp) and the CUDA
// binding (scan_cuda_binding.cpp) so that both accept exactly the same inputs (csrc/ops.cpp has the
// schemas). Every argument may have any strides: both copy it into their own layout.
#pragma once

#include <algorithm>

#include "../common/checks.h"

namespace longtrain {

struct ScanShape {
  int64_t batch, dim, seq, state, n_chunks;
};

// u, delta (batch, dim, seq); A (dim, state); B, C (batch, state, seq); D, delta_bias (dim,);
// z (batch, dim, seq); all float32, bfloat16 or float16. chunk > 0 steps per checkpoint.
inline ScanShape check_scan_inputs(const checks::Call& call, const at::Tensor& u, const at::Tensor& delta,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                   const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                   const std::optional<at::Tensor>& delta_bias, int64_t chunk) {
  using checks::DTypes;
  call.rank(u, "u", "(batch, dim, seq)", 3);
  call.rank(A, "A", "(dim, state)", 2);
  const int64_t batch = u.size(0), dim = u.size(1), seq = u.size(2), state = A.size(1);
  call.tensor(u, "u", "(batch, dim, seq)", {batch, dim, seq}, DTypes::kFloats);
  call.tensor(delta, "delta", "(batch, dim, seq)", {batch, dim, seq}, DTypes::kFloats);
  call.tensor(A, "A", "(dim, state)", {dim, state}, DTypes::kFloats);
  call.tensor(B, "B", "(batch, state, seq)", {batch, state, seq}, DTypes::kFloats);
  call.tensor(C, "C", "(batch, state, seq)", {batch, state, seq}, DTypes::kFloats);
  call.optional(D, "D", "(dim,)", {dim}, DTypes::kFloats);
  call.optional(z, "z", "(batch, dim, seq)", {batch, dim, seq}, DTypes::kFloats);
  call.optional(delta_bias, "delta_bias", "(dim,)", {dim}, DTypes::kFloats);
  TORCH_CHECK(chunk > 0, call.op, ": chunk must be positive, got ", chunk);
  return {batch, dim, seq, state, std::max<int64_t>(1, (seq + chunk - 1) / chunk)};
}

// The forward's initial_state (batch, dim, state), any float dtype.
inline void check_scan_initial_state(const checks::Call& call, const ScanShape& s,
                                     const std::optional<at::Tensor>& initial_state) {
  call.optional(initial_state, "initial_state", "(batch, dim, state)", {s.batch, s.dim, s.state},
                checks::DTypes::kFloats);
}

// The document resets (batch, seq) bool, when given.
inline void check_scan_reset(const checks::Call& call, const ScanShape& s, const std::optional<at::Tensor>& reset) {
  call.optional(reset, "reset", "(batch, seq)", {s.batch, s.seq}, checks::DTypes::kBool);
}

// The backward's own arguments: dout (batch, dim, seq), dlast_state (batch, dim, state), and the
// forward's checkpoints (batch, dim, n_chunks, state) float32.
inline void check_scan_grads(const checks::Call& call, const ScanShape& s, const at::Tensor& dout,
                             const std::optional<at::Tensor>& dlast_state, const at::Tensor& checkpoints) {
  using checks::DTypes;
  call.tensor(dout, "dout", "(batch, dim, seq)", {s.batch, s.dim, s.seq}, DTypes::kFloats);
  call.optional(dlast_state, "dlast_state", "(batch, dim, state)", {s.batch, s.dim, s.state}, DTypes::kFloats);
  call.tensor(checkpoints, "checkpoints", "(batch, dim, n_chunks, state)", {s.batch, s.dim, s.n_chunks, s.state},
              DTypes::kFloat32);
}

}  // namespace longtrain
