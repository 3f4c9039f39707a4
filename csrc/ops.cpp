// Schemas of the longtrain custom ops (namespace `longtrain`); CPU and CUDA implementations
// register themselves next to their kernels (csrc/<op>/*_cpu.cpp, csrc/<op>/*_cuda_binding.cpp).
#include <torch/extension.h>

#include "common/cpu_parallel.h"

TORCH_LIBRARY(longtrain, m) {
  // Selective scan (Mamba). `checkpoints` holds the state at the start of every `chunk` steps,
  // (batch, dim, n_chunks, state) float32, so the backward recomputes states chunk by chunk.
  // `reset` (batch, seq) bool: True where a document starts (the state is zeroed before that step).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, int chunk, Tensor? reset=None) "
      "-> (Tensor out, Tensor last_state, Tensor checkpoints)");
  // Gradients are float32; the ones of absent optional inputs are empty tensors.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor checkpoints, int chunk, "
      "Tensor? reset=None) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, "
      "Tensor dinitial_state)");
  // Attention in flash-attn's layout: q (batch, seq_q, heads, dim), k/v (batch, seq_k, kv_heads, dim);
  // lse (batch, heads, seq_q) float32. `dlse`, when given, is the gradient flowing into lse.
  // Masks on absolute positions (q_start, k_start; absent: bottom-right aligned): a window
  // (window_left, window_right), -1 unbounded; `sinks` first tokens of each document visible past the
  // window; doc_q (batch, seq_q), doc_k (batch, seq_k) int32 document starts, keys of other documents hidden.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, int window_left=-1, "
      "int window_right=-1, int sinks=0, Tensor? doc_q=None, Tensor? doc_k=None, int? q_start=None, "
      "int? k_start=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, bool causal, "
      "float scale, int window_left=-1, int window_right=-1, int sinks=0, Tensor? doc_q=None, Tensor? doc_k=None, "
      "int? q_start=None, int? k_start=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  // Softmax cross-entropy of logit rows (rows, vocab) against int64 targets, `ignore_index` rows
  // skipped: returns each row's loss (float32, 0 when ignored) and overwrites the logits with
  // d loss_row / d logits = softmax - one-hot (zeros when ignored).
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor targets, int ignore_index) -> Tensor");
  // RMSNorm over the last dim: y (in out_dtype) and 1/rms per row (float32); the backward gives dx
  // in x's dtype and dweight in float32.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  // SwiGLU's gate: h = silu(g) * u, elementwise, in g's dtype.
  m.def("swiglu_fwd(Tensor g, Tensor u) -> Tensor");
  m.def("swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor dg, Tensor du)");
  // Rotary embedding of x (batch, seq, heads, dim), rotate-half pairs, by cos/sin (seq, dim / 2);
  // inverse rotates by the opposite angle (the backward).
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  // Test hook of the determinism tests: the order in which CPU kernels hand tasks to workers
  // (0 in order, 1 reversed, 2 shuffled by `seed`, 3 one slowed worker; common/cpu_parallel.h).
  // Returns the previous order. Results must not depend on it.
  m.def("_set_task_order(int mode, int seed) -> int", &longtrain::set_task_order);
}

// The extension is imported as a Python module (longtrain.kernels._C) to load the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("with_cuda") =
#ifdef LONGTRAIN_WITH_CUDA
      true;
#else
      false;
#endif
}
