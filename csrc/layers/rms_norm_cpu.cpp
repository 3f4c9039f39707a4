// RMSNorm (Zhang & Sennrich 2019) forward and backward on CPU, one row at a time in float32.
//
// In torch the norm is about six elementwise passes forward and a dozen backward over the
// (tokens x d_model) activations, each through memory, plus the casts that autocast adds around
// it. Here a row is loaded once into float32, normalised and scaled, and stored once in the output
// dtype (the autocast dtype under autocast, so the linear layers that follow need no cast); the
// backward reads dy, x and the saved 1/rms once and writes dx once. The weight's gradient is summed in
// float32 per fixed block of rows, then over the blocks in order: the blocks follow the row count only,
// so dweight is the same whatever the thread count (common/cpu_parallel.h).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_convert.h"
#include "../common/cpu_math.h"
#include "../common/cpu_parallel.h"

namespace longtrain {
namespace {

// Returns 1 / rms(x) and writes y = x / rms(x) * w.
LT_VECTOR_CLONES
float rms_forward_row(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t n, float eps) {
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t i = 0; i < kLanes; ++i) lanes[i] += x[j + i] * x[j + i];
  float sum = 0.0f;
  for (; j < n; ++j) sum += x[j] * x[j];
  for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
  const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (j = 0; j < n; ++j) y[j] = x[j] * rstd * w[j];
  return rstd;
}

// With xhat = x * rstd and g = dy * w: dx = rstd * (g - xhat * mean(g * xhat)); dw += dy * xhat.
LT_VECTOR_CLONES
void rms_backward_row(const float* __restrict dy, const float* __restrict x, const float* __restrict w, float rstd,
                      float* __restrict dx, float* __restrict dw, int64_t n) {
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t i = 0; i < kLanes; ++i) lanes[i] += dy[j + i] * w[j + i] * x[j + i];
  float dot = 0.0f;
  for (; j < n; ++j) dot += dy[j] * w[j] * x[j];
  for (int64_t i = 0; i < kLanes; ++i) dot += lanes[i];
  const float c = dot * rstd * rstd / static_cast<float>(n);  // mean(g * xhat) * rstd
  for (j = 0; j < n; ++j) {
    dx[j] = rstd * (dy[j] * w[j] - x[j] * c);
    dw[j] += dy[j] * x[j] * rstd;
  }
}

// Blocks of rows of the backward, each with its own partial dweight: at least kMinBlockRows rows, at
// most kMaxBlocks blocks (few enough that summing the partials costs little).
constexpr int64_t kMinBlockRows = 64, kMaxBlocks = 64;

// x (..., n) contiguous with n > 0, weight (n,); returns n.
int64_t check_rows(const checks::Call& call, const at::Tensor& x, const at::Tensor& weight) {
  using checks::DTypes;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, call.op, ": x must have shape (..., d_model) with d_model > 0, got ",
              checks::sizes_string(x.sizes()));
  call.tensor(x, "x", "(..., d_model)", x.sizes(), DTypes::kFloats, checks::Layout::kContiguous);
  call.tensor(weight, "weight", "(d_model,) with d_model x's last dim", {x.size(-1)}, DTypes::kFloats);
  return x.size(-1);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                    at::ScalarType out_dtype) {
  const checks::Call call("rms_norm_fwd", x, "x", c10::DeviceType::CPU);
  const int64_t n = check_rows(call, x, weight), rows = x.numel() / n;
  TORCH_CHECK(checks::dtype_allowed(out_dtype, checks::DTypes::kFloats), call.op,
              ": out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  dispatch_float_types(x.scalar_type(), "rms_norm_fwd x", [&](auto xt) {
    dispatch_float_types(out_dtype, "rms_norm_fwd out_dtype", [&](auto yt) {
      using X = decltype(xt);
      using Y = decltype(yt);
      const X* xp = x.data_ptr<X>();
      Y* yp = y.data_ptr<Y>();
      const float* wp = w.data_ptr<float>();
      float* rp = rstd.data_ptr<float>();
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        std::vector<float> xf(n), yf(n);
        for (int64_t r = begin; r < end; ++r) {
          load_floats(xp + r * n, xf.data(), n);
          rp[r] = rms_forward_row(xf.data(), wp, yf.data(), n, static_cast<float>(eps));
          store_floats(yf.data(), yp + r * n, n);
        }
      });
    });
  });
  return {y, rstd};
}

// dx in x's dtype; dweight float32.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd_in) {
  const checks::Call call("rms_norm_bwd", x, "x", c10::DeviceType::CPU);
  const int64_t n = check_rows(call, x, weight), rows = x.numel() / n;
  call.tensor(dy_in, "dy", "(..., d_model) like x", x.sizes(), checks::DTypes::kFloats);
  call.tensor(rstd_in, "rstd", "x's shape without d_model", x.sizes().slice(0, x.dim() - 1), checks::DTypes::kFloat32);
  const at::Tensor dy = dy_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t chunks = std::clamp<int64_t>(rows / kMinBlockRows, 1, kMaxBlocks);
  at::Tensor dw_parts = at::zeros({chunks, n}, x.options().dtype(at::kFloat));
  dispatch_float_types(x.scalar_type(), "rms_norm_bwd x", [&](auto xt) {
    dispatch_float_types(dy.scalar_type(), "rms_norm_bwd dy", [&](auto dyt) {
      using X = decltype(xt);
      using DY = decltype(dyt);
      const X* xp = x.data_ptr<X>();
      const DY* dyp = dy.data_ptr<DY>();
      X* dxp = dx.data_ptr<X>();
      const float *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
      float* dwp = dw_parts.data_ptr<float>();
      // `chunks` fixed ranges of rows, each with its own partial dweight.
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<float> xf(n), dyf(n), dxf(n);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = c * rows / chunks; r < (c + 1) * rows / chunks; ++r) {
            load_floats(xp + r * n, xf.data(), n);
            load_floats(dyp + r * n, dyf.data(), n);
            rms_backward_row(dyf.data(), xf.data(), wp, rp[r], dxf.data(), dwp + c * n, n);
            store_floats(dxf.data(), dxp + r * n, n);
          }
      });
    });
  });
  at::Tensor dweight = at::empty({n}, dw_parts.options());
  sum_in_order(dw_parts.data_ptr<float>(), chunks, n, n, dweight.data_ptr<float>());
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace longtrain
