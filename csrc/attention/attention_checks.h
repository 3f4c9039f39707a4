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

// The mask arguments shared by both ops: a window (left, right) with -1 for unbounded, the count of
// attention-sink tokens, the absolute positions of the first query and key (absent: bottom-right
// aligned, q_start = seq_k - seq_q, k_start = 0), and document starts doc_q (batch, seq_q) and
// doc_k (batch, seq_k): int32, contiguous, the absolute position at which each token's document starts.
struct AttentionMaskArgs {
  int64_t window_left = -1, window_right = -1, sinks = 0;
  std::optional<at::Tensor> doc_q, doc_k;
  std::optional<int64_t> q_start, k_start;
};

// Whether the arguments ask for more than plain attention with a bottom-right causal mask.
inline bool attention_needs_mask(const AttentionShape& s, bool causal, const AttentionMaskArgs& m) {
  const int64_t shift = m.q_start.value_or(s.seq_k - s.seq_q) - m.k_start.value_or(0);
  return checks::Call::present(m.doc_q) || checks::Call::present(m.doc_k) || m.window_left >= 0 ||
         (!causal && m.window_right >= 0) || (causal && shift != s.seq_k - s.seq_q);
}

inline void check_document_starts(const checks::Call& call, const std::optional<at::Tensor>& x, const char* name,
                                  const char* shape, at::IntArrayRef sizes) {
  if (!checks::Call::present(x)) return;
  const at::Tensor& t = *x;
  TORCH_CHECK(t.device() == call.device, call.op, ": ", name, " must be on ", call.device,
              " like the other inputs, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, call.op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.sizes() == sizes, call.op, ": ", name, " must have shape ", shape, " = ", checks::sizes_string(sizes),
              ", got ", checks::sizes_string(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kInt, call.op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), call.op, ": ", name, " must be contiguous, got strides ",
              checks::sizes_string(t.strides()));
}

inline void check_attention_mask(const checks::Call& call, const AttentionShape& s, const AttentionMaskArgs& m) {
  TORCH_CHECK(m.window_left >= -1, call.op, ": window_left must be >= -1 (-1 = unbounded), got ", m.window_left);
  TORCH_CHECK(m.window_right >= -1, call.op, ": window_right must be >= -1 (-1 = unbounded), got ", m.window_right);
  TORCH_CHECK(m.sinks >= 0, call.op, ": sinks must be >= 0, got ", m.sinks);
  TORCH_CHECK(checks::Call::present(m.doc_q) == checks::Call::present(m.doc_k), call.op,
              ": doc_q and doc_k must be given together, got ", checks::Call::present(m.doc_q) ? "doc_q" : "doc_k",
              " only");
  check_document_starts(call, m.doc_q, "doc_q", "(batch, seq_q)", {s.batch, s.seq_q});
  check_document_starts(call, m.doc_k, "doc_k", "(batch, seq_k)", {s.batch, s.seq_k});
}

}  // namespace longtrain
