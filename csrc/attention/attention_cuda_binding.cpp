// Torch binding of the CUDA attention (attention_cuda.cu); compiled only when the extension is
// built with CUDA. Tensors are checked (attention_checks.h, the same checks as the CPU kernel's) and
// made contiguous here; the kernels see raw pointers.
#ifdef LONGTRAIN_WITH_CUDA
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention_checks.h"
#include "attention_cuda.h"

namespace longtrain {
namespace {

cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "attention (CUDA): unsupported dtype ", x.scalar_type());
  }
}

// q, k, v contiguous, checked by check_attention_inputs; the CUDA kernels want one dtype and some head dims.
cuda::AttentionParams make_params(const checks::Call& call, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, bool causal, double scale) {
  TORCH_CHECK(cuda::attention_supports_head_dim(static_cast<int>(q.size(3))), call.op,
              " (CUDA): head_dim must be 32, 64 or 128, got ", q.size(3));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), call.op,
              " (CUDA): q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  return cuda::AttentionParams{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
                               static_cast<int>(q.size(2)), static_cast<int>(k.size(2)), static_cast<int>(q.size(3)),
                               causal, static_cast<float>(scale), dtype_of(q), q.data_ptr(), k.data_ptr(),
                               v.data_ptr(), nullptr, nullptr};
}

// The CUDA kernels have no window, sinks, documents or other positions yet: refused, never ignored.
void check_no_mask(const checks::Call& call, const AttentionShape& s, bool causal, const AttentionMaskArgs& args) {
  check_attention_mask(call, s, args);
  TORCH_CHECK(!attention_needs_mask(s, causal, args), call.op,
              " (CUDA): window_left, window_right, sinks, doc_q, doc_k, q_start and k_start are not supported on "
              "CUDA yet; use the CPU kernel or the reference");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal, double scale,
                                                      int64_t window_left, int64_t window_right, int64_t sinks,
                                                      const std::optional<at::Tensor>& doc_q,
                                                      const std::optional<at::Tensor>& doc_k,
                                                      std::optional<int64_t> q_start, std::optional<int64_t> k_start) {
  const checks::Call call("attention_fwd", q_in, "q", c10::DeviceType::CUDA);
  check_no_mask(call, check_attention_inputs(call, q_in, k_in, v_in), causal,
                AttentionMaskArgs{window_left, window_right, sinks, doc_q, doc_k, q_start, k_start});
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto p = make_params(call, q, k, v, causal, scale);
  at::Tensor out = at::empty_like(q), lse = at::empty({p.batch, p.heads, p.seq_q}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaError_t status = cuda::attention_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "attention forward kernel: ", cudaGetErrorString(status));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q_in,
                                                                  const at::Tensor& k_in, const at::Tensor& v_in,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const std::optional<at::Tensor>& dlse, bool causal,
                                                                  double scale, int64_t window_left,
                                                                  int64_t window_right, int64_t sinks,
                                                                  const std::optional<at::Tensor>& doc_q,
                                                                  const std::optional<at::Tensor>& doc_k,
                                                                  std::optional<int64_t> q_start,
                                                                  std::optional<int64_t> k_start) {
  const checks::Call call("attention_bwd", dout, "dout", c10::DeviceType::CUDA);
  const AttentionShape shape = check_attention_inputs(call, q_in, k_in, v_in);
  check_attention_grads(call, shape, dout, out, lse, dlse);
  check_no_mask(call, shape, causal,
                AttentionMaskArgs{window_left, window_right, sinks, doc_q, doc_k, q_start, k_start});
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto p = make_params(call, q, k, v, causal, scale);
  at::Tensor lse_c = lse.to(at::kFloat).contiguous(), dlse_c;
  p.lse = lse_c.data_ptr<float>();
  if (checks::Call::present(dlse)) dlse_c = dlse->to(at::kFloat).contiguous();
  at::Tensor dout_c = dout.to(q.scalar_type()).contiguous(), out_c = out.to(q.scalar_type()).contiguous();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({p.batch, p.heads, p.seq_q}, f32), dq = at::empty_like(q);
  at::Tensor dk = at::empty({p.batch, p.seq_k, p.heads, p.head_dim}, f32), dv = at::empty_like(dk);
  cuda::AttentionGradParams g{dout_c.data_ptr(), out_c.data_ptr(),
                              dlse_c.defined() ? dlse_c.data_ptr<float>() : nullptr,
                              delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr<float>(), dv.data_ptr<float>()};
  const cudaError_t status = cuda::attention_backward(p, g, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "attention backward kernel: ", cudaGetErrorString(status));
  const int64_t group = p.heads / p.kv_heads;
  if (group > 1) {
    dk = dk.view({p.batch, p.seq_k, p.kv_heads, group, p.head_dim}).sum(3);
    dv = dv.view({p.batch, p.seq_k, p.kv_heads, group, p.head_dim}).sum(3);
  }
  return {dq, dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace longtrain
#endif  // LONGTRAIN_WITH_CUDA
