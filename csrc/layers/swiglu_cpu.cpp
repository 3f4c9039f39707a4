// SwiGLU's gate, silu(g) * u (Shazeer 2020), forward and backward on CPU in one pass each.
//
// torch runs silu and the product as separate passes forward, and silu's backward plus two products
// backward, each through memory; here each element is read and written once, in float32 math
// whatever the storage (bfloat16 under autocast).
#include <torch/extension.h>

#include <vector>

#include "../common/checks.h"
#include "../common/cpu_convert.h"
#include "../common/cpu_math.h"

namespace longtrain {
namespace {

constexpr int64_t kBlock = 2048;  // elements converted to float32 at a time (stays in L1)

LT_VECTOR_CLONES
void swiglu_forward_block(const float* __restrict g, const float* __restrict u, float* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid_approx(g[i]) * u[i];
}

// d silu(g) / dg = s (1 + g (1 - s)) with s = sigmoid(g).
LT_VECTOR_CLONES
void swiglu_backward_block(const float* __restrict dh, const float* __restrict g, const float* __restrict u,
                           float* __restrict dg, float* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid_approx(g[i]);
    du[i] = dh[i] * g[i] * s;
    dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

// The gate g and up projection u: one shape and one float dtype (any strides: copied if need be).
void check_pair(const checks::Call& call, const at::Tensor& g, const at::Tensor& u) {
  call.tensor(g, "g", "(...)", g.sizes(), checks::DTypes::kFloats);
  call.tensor(u, "u", "(...) like g", g.sizes(), checks::DTypes::kFloats);
  TORCH_CHECK(u.scalar_type() == g.scalar_type(), call.op, ": u must have g's dtype ", g.scalar_type(), ", got ",
              u.scalar_type());
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& g_in, const at::Tensor& u_in) {
  const checks::Call call("swiglu_fwd", g_in, "g", c10::DeviceType::CPU);
  check_pair(call, g_in, u_in);
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor h = at::empty(g.sizes(), g.options());
  const int64_t numel = g.numel();
  dispatch_float_types(g.scalar_type(), "swiglu_fwd", [&](auto t) {
    using T = decltype(t);
    const T *gp = g.data_ptr<T>(), *up = u.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    at::parallel_for(0, numel, 16 * kBlock, [&](int64_t begin, int64_t end) {
      std::vector<float> gf(kBlock), uf(kBlock), hf(kBlock);
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t n = std::min(kBlock, end - i);
        load_floats(gp + i, gf.data(), n);
        load_floats(up + i, uf.data(), n);
        swiglu_forward_block(gf.data(), uf.data(), hf.data(), n);
        store_floats(hf.data(), hp + i, n);
      }
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dh_in, const at::Tensor& g_in,
                                                  const at::Tensor& u_in) {
  const checks::Call call("swiglu_bwd", dh_in, "dh", c10::DeviceType::CPU);
  check_pair(call, g_in, u_in);
  call.tensor(dh_in, "dh", "(...) like g", g_in.sizes(), checks::DTypes::kFloats);
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous(), dh = dh_in.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
  const int64_t numel = g.numel();
  dispatch_float_types(g.scalar_type(), "swiglu_bwd", [&](auto t) {
    using T = decltype(t);
    const T *gp = g.data_ptr<T>(), *up = u.data_ptr<T>(), *dhp = dh.data_ptr<T>();
    T *dgp = dg.data_ptr<T>(), *dup = du.data_ptr<T>();
    at::parallel_for(0, numel, 16 * kBlock, [&](int64_t begin, int64_t end) {
      std::vector<float> gf(kBlock), uf(kBlock), dhf(kBlock), dgf(kBlock), duf(kBlock);
      for (int64_t i = begin; i < end; i += kBlock) {
        const int64_t n = std::min(kBlock, end - i);
        load_floats(gp + i, gf.data(), n);
        load_floats(up + i, uf.data(), n);
        load_floats(dhp + i, dhf.data(), n);
        swiglu_backward_block(dhf.data(), gf.data(), uf.data(), dgf.data(), duf.data(), n);
        store_floats(dgf.data(), dgp + i, n);
        store_floats(duf.data(), dup + i, n);
      }
    });
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

}  // namespace longtrain
