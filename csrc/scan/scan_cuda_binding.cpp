// Torch binding of the CUDA selective scan (scan_cuda.cu); compiled only when the extension is
// built with CUDA. Tensors are checked (scan_checks.h, the same checks as the CPU kernel's) and made
// contiguous here; the kernels see raw pointers.
#ifdef LONGTRAIN_WITH_CUDA
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "scan_checks.h"
#include "scan_cuda.h"

namespace longtrain {
namespace {

cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "selective_scan (CUDA): unsupported dtype ", x.scalar_type());
  }
}

struct Inputs {
  at::Tensor u, delta, B, C, z, A, D, delta_bias, initial, reset;
  cuda::ScanParams params;
};

// Contiguous copies of inputs already checked (check_scan_inputs), in the kernel's dtypes.
Inputs prepare(const ScanShape& s, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
               const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
               const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias, bool softplus,
               const std::optional<at::Tensor>& initial, int64_t chunk, const std::optional<at::Tensor>& reset) {
  TORCH_CHECK(chunk == cuda::kScanChunk, "selective_scan (CUDA): chunk must be ", cuda::kScanChunk);
  TORCH_CHECK(s.state <= cuda::kScanMaxState, "selective_scan (CUDA): state must be <= ", cuda::kScanMaxState);
  Inputs r;
  const auto type = u.scalar_type();
  r.u = u.contiguous();
  r.delta = delta.to(type).contiguous();
  r.B = B.to(type).contiguous();
  r.C = C.to(type).contiguous();
  if (checks::Call::present(z)) r.z = z->to(type).contiguous();
  r.A = A.to(at::kFloat).contiguous();
  if (checks::Call::present(D)) r.D = D->to(at::kFloat).contiguous();
  if (checks::Call::present(delta_bias)) r.delta_bias = delta_bias->to(at::kFloat).contiguous();
  if (checks::Call::present(initial)) r.initial = initial->to(at::kFloat).contiguous();
  if (checks::Call::present(reset)) r.reset = reset->contiguous();
  const int seq = static_cast<int>(u.size(2));
  auto ptr = [](const at::Tensor& x) -> const float* { return x.defined() ? x.data_ptr<float>() : nullptr; };
  r.params = cuda::ScanParams{static_cast<int>(u.size(0)), static_cast<int>(u.size(1)), seq,
                              static_cast<int>(A.size(1)), std::max(1, (seq + cuda::kScanChunk - 1) / cuda::kScanChunk),
                              dtype_of(u), r.u.data_ptr(), r.delta.data_ptr(), r.B.data_ptr(), r.C.data_ptr(),
                              r.z.defined() ? r.z.data_ptr() : nullptr, ptr(r.A), ptr(r.D), ptr(r.delta_bias),
                              ptr(r.initial), softplus, nullptr, nullptr, nullptr,
                              r.reset.defined() ? r.reset.data_ptr<bool>() : nullptr};
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus, const std::optional<at::Tensor>& initial_state, int64_t chunk,
    const std::optional<at::Tensor>& reset) {
  const checks::Call call("selective_scan_fwd", u, "u", c10::DeviceType::CUDA);
  const ScanShape shape = check_scan_inputs(call, u, delta, A, B, C, D, z, delta_bias, chunk);
  check_scan_initial_state(call, shape, initial_state);
  check_scan_reset(call, shape, reset);
  const c10::cuda::CUDAGuard guard(u.device());
  Inputs r = prepare(shape, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk, reset);
  auto& p = r.params;
  auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(r.u), last = at::empty({p.batch, p.dim, p.state}, f32);
  at::Tensor checkpoints = at::empty({p.batch, p.dim, p.n_chunks, p.state}, f32);
  p.out = out.data_ptr();
  p.last = last.data_ptr<float>();
  p.checkpoints = checkpoints.data_ptr<float>();
  const cudaError_t status = cuda::scan_forward(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "selective_scan forward kernel: ", cudaGetErrorString(status));
  return {out, last, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
                        const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const at::Tensor& checkpoints, int64_t chunk, const std::optional<at::Tensor>& reset) {
  const checks::Call call("selective_scan_bwd", dout, "dout", c10::DeviceType::CUDA);
  const ScanShape shape = check_scan_inputs(call, u, delta, A, B, C, D, z, delta_bias, chunk);
  check_scan_grads(call, shape, dout, dlast_state, checkpoints);
  check_scan_reset(call, shape, reset);
  const c10::cuda::CUDAGuard guard(u.device());
  Inputs r = prepare(shape, u, delta, A, B, C, D, z, delta_bias, delta_softplus, std::nullopt, chunk, reset);
  auto& p = r.params;
  at::Tensor cps = checkpoints.to(at::kFloat).contiguous();
  p.checkpoints = cps.data_ptr<float>();
  at::Tensor dout_c = dout.to(u.scalar_type()).contiguous(), dlast;
  if (checks::Call::present(dlast_state)) dlast = dlast_state->to(at::kFloat).contiguous();
  auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty({p.batch, p.dim, p.seq}, f32), ddelta = at::empty_like(du);
  at::Tensor dz = r.z.defined() ? at::empty_like(du) : at::empty({0}, f32);
  at::Tensor dA = at::empty({p.batch, p.dim, p.state}, f32), dD = at::empty({p.batch, p.dim}, f32);
  at::Tensor dB = at::zeros({p.batch, p.state, p.seq}, f32), dC = at::zeros_like(dB);
  at::Tensor dinitial = at::empty({p.batch, p.dim, p.state}, f32);
  cuda::ScanGradParams g{dout_c.data_ptr(), dlast.defined() ? dlast.data_ptr<float>() : nullptr,
                         du.data_ptr<float>(), ddelta.data_ptr<float>(),
                         r.z.defined() ? dz.data_ptr<float>() : nullptr, dA.data_ptr<float>(), dD.data_ptr<float>(),
                         dB.data_ptr<float>(), dC.data_ptr<float>(), dinitial.data_ptr<float>()};
  const cudaError_t status = cuda::scan_backward(p, g, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "selective_scan backward kernel: ", cudaGetErrorString(status));
  at::Tensor ddelta_bias = r.delta_bias.defined() ? ddelta.sum({0, 2}) : at::empty({0}, f32);
  return {du, ddelta, dA.sum(0), dB, dC, r.D.defined() ? dD.sum(0) : at::empty({0}, f32), dz, ddelta_bias, dinitial};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda);
}

}  // namespace longtrain
#endif  // LONGTRAIN_WITH_CUDA
