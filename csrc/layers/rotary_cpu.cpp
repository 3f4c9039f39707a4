// Rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half layout, on CPU in one pass.
//
// torch spends a dozen passes on it (two half-slices upcast, four products, a sum and a difference, a
// concatenation, the downcast, and as many backward); here each element is read and written once, in
// float32 math. The backward is the same rotation by the opposite angle.
#include <torch/extension.h>

#include <vector>

#include "../common/checks.h"
#include "../common/cpu_convert.h"
#include "../common/cpu_math.h"

namespace longtrain {
namespace {

// One head: y[i] = x1 c - x2 s, y[half + i] = x1 s + x2 c (s negated for the inverse).
LT_VECTOR_CLONES
void rotate_head(const float* __restrict x, const float* __restrict cos, const float* __restrict sin, float sign,
                 float* __restrict y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i], c = cos[i], s = sign * sin[i];
    y[i] = x1 * c - x2 * s;
    y[half + i] = x1 * s + x2 * c;
  }
}

at::Tensor rotary_cpu(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  const checks::Call call("rotary", x_in, "x", c10::DeviceType::CPU);
  call.rank(x_in, "x", "(batch, seq, heads, head_dim)", 4);
  TORCH_CHECK(x_in.size(3) % 2 == 0, "rotary: x's head_dim must be even, got ", x_in.size(3));
  const int64_t batch = x_in.size(0), seq = x_in.size(1), heads = x_in.size(2), dim = x_in.size(3), half = dim / 2;
  call.tensor(x_in, "x", "(batch, seq, heads, head_dim)", x_in.sizes(), checks::DTypes::kFloats);
  call.tensor(cos_in, "cos", "(seq, head_dim / 2)", {seq, half}, checks::DTypes::kFloats);
  call.tensor(sin_in, "sin", "(seq, head_dim / 2)", {seq, half}, checks::DTypes::kFloats);
  const at::Tensor x = x_in.contiguous(), cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float sign = inverse ? -1.0f : 1.0f;
  dispatch_float_types(x.scalar_type(), "rotary", [&](auto t) {
    using T = decltype(t);
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const int64_t row = heads * dim;  // one (batch, position)
    at::parallel_for(0, batch * seq, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(row), yf(row);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t pos = r % seq;
        load_floats(xp + r * row, xf.data(), row);
        for (int64_t h = 0; h < heads; ++h)
          rotate_head(xf.data() + h * dim, cp + pos * half, sp + pos * half, sign, yf.data() + h * dim, half);
        store_floats(yf.data(), yp + r * row, row);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) { m.impl("rotary", &rotary_cpu); }

}  // namespace longtrain
