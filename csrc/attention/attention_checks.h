// Argument checks of the attention ops, shared by the CPU kernel (attention_cpu.cpp) and the CUDA
// binding (attention_cuda_binding.cpp) so that both accept exactly the same inputs (csrc/ops.cpp has
// the schemas). Every argument may have any strides: both copy it into their own layout.
#pragma once

#include "../common/checks.h"

namespace longtrain {

struct AttentionShape {
  int64_t batch, seq_q, seq_k, heads, kv_heads, dim;
};

// q (batch, seq_q, heads, dim); k, v (batch, seq_k, kv_heads, dim) with heads a multiple of kv_heads;
// float32, bfloat16 or float16.
inline AttentionShape check_attention_inputs(const checks::Call& call, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v) {
  using checks::DTypes;
  call.rank(q, "q", "(batch, seq_q, heads, dim)", 4);
  call.rank(k, "k", "(batch, seq_k, kv_heads, dim)", 4);
  const AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  call.tensor(q, "q", "(batch, seq_q, heads, dim)", {s.batch, s.seq_q, s.heads, s.dim}, DTypes::kFloats);
  call.tensor(k, "k", "(batch, seq_k, kv_heads, dim)", {s.batch, s.seq_k, s.kv_heads, s.dim}, DTypes::kFloats);
  call.tensor(v, "v", "(batch, seq_k, kv_heads, dim)", {s.batch, s.seq_k, s.kv_heads, s.dim}, DTypes::kFloats);
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, call.op, ": k's kv_heads (", s.kv_heads,
              ") must be positive and divide q's heads (", s.heads, ")");
  return s;
}

// The backward's own arguments: dout and out like q, the forward's lse (batch, heads, seq_q) float32,
// and dlse, the gradient flowing into lse, of the same shape.
inline void check_attention_grads(const checks::Call& call, const AttentionShape& s, const at::Tensor& dout,
                                  const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  using checks::DTypes;
  call.tensor(dout, "dout", "(batch, seq_q, heads, dim)", {s.batch, s.seq_q, s.heads, s.dim}, DTypes::kFloats);
  call.tensor(out, "out", "(batch, seq_q, heads, dim)", {s.batch, s.seq_q, s.heads, s.dim}, DTypes::kFloats);
  call.tensor(lse, "lse", "(batch, heads, seq_q)", {s.batch, s.heads, s.seq_q}, DTypes::kFloat32);
  call.optional(dlse, "dlse", "(batch, heads, seq_q)", {s.batch, s.heads, s.seq_q}, DTypes::kFloats);
}

}  // namespace longtrain
