// Softmax cross-entropy of logit rows and its gradient, in one sweep per row, on CPU.
//
// The training loss (trainer/model/decoder.py) forms the logits one chunk of tokens at a time and
// needs, per chunk, each row's loss and d loss / d logits = softmax - one-hot. In torch that is about
// ten passes over the chunk (upcast, max, subtract, exp, sum, log, divide, scatter, mask, downcast),
// each reading and writing the whole (tokens x vocab) block from memory. Here one row (a vocabulary of
// float32, 16 KiB at 4k) is read once, worked on while it stays in L1, and its gradient written over
// the logits in their own dtype. Math is float32 whatever the storage (as flash-attn's and Liger-Kernel's
// losses do), with rounding to nearest even on the way back to bfloat16.
#include <torch/extension.h>

#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_convert.h"
#include "../common/cpu_math.h"

namespace longtrain {
namespace {

// One row in float32 (in `x`, n values): x <- softmax(x) with 1 taken off at `target`; returns
// logsumexp(x) - x[target].
LT_INLINE float softmax_grad_row(float* __restrict x, int64_t n, int64_t target) {
  const float max = row_max_of(x, n);
  const float target_logit = x[target];
  const float sum = exp_shifted(x, n, max);
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  x[target] -= 1.0f;
  return std::log(sum) - (target_logit - max);
}

LT_VECTOR_CLONES
float row_float(float* __restrict x, int64_t n, int64_t target, float* __restrict) {
  return softmax_grad_row(x, n, target);
}

LT_VECTOR_CLONES
float row_bfloat16(c10::BFloat16* __restrict row, int64_t n, int64_t target, float* __restrict buf) {
  uint16_t* x = reinterpret_cast<uint16_t*>(row);
  for (int64_t j = 0; j < n; ++j) buf[j] = bf16_bits_to_float(x[j]);
  const float loss = softmax_grad_row(buf, n, target);
  for (int64_t j = 0; j < n; ++j) x[j] = float_to_bf16_bits(buf[j]);
  return loss;
}

LT_VECTOR_CLONES
float row_half(c10::Half* __restrict x, int64_t n, int64_t target, float* __restrict buf) {
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(x[j]);
  const float loss = softmax_grad_row(buf, n, target);
  for (int64_t j = 0; j < n; ++j) x[j] = c10::Half(buf[j]);
  return loss;
}

template <typename T, typename Row>
void rows_loop(T* logits, int64_t row_stride, int64_t rows, int64_t vocab, const int64_t* targets,
               int64_t ignore_index, float* losses, Row row_fn) {
  // A few rows per task: each row is a vocabulary long, so even one is work enough to share.
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : vocab);
    for (int64_t r = begin; r < end; ++r) {
      T* x = logits + r * row_stride;
      if (targets[r] == ignore_index) {  // no loss, no gradient
        std::memset(static_cast<void*>(x), 0, vocab * sizeof(T));
        losses[r] = 0.0f;
        continue;
      }
      losses[r] = row_fn(x, vocab, targets[r], buf.data());
    }
  });
}

at::Tensor cross_entropy_grad_cpu(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index) {
  // Rows are written in place by different workers: each must be dense, and none may overlap another.
  const checks::Call call("cross_entropy_grad_", logits, "logits", c10::DeviceType::CPU);
  call.rank(logits, "logits", "(rows, vocab)", 2);
  TORCH_CHECK(logits.size(1) > 0, "cross_entropy_grad_: logits must have a vocab of at least 1, got ",
              checks::sizes_string(logits.sizes()));
  call.tensor(logits, "logits", "(rows, vocab)", logits.sizes(), checks::DTypes::kFloats, checks::Layout::kRowsContiguous);
  call.tensor(targets, "targets", "(rows,)", {logits.size(0)}, checks::DTypes::kInt64);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const at::Tensor t = targets.contiguous();
  const int64_t* target = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // checked before any row is overwritten
    TORCH_CHECK(target[r] == ignore_index || (target[r] >= 0 && target[r] < vocab), "cross_entropy_grad_: target ",
                target[r], " of row ", r, " is outside the vocabulary [0, ", vocab, ")");
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  float* out = losses.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      rows_loop(logits.data_ptr<float>(), stride, rows, vocab, target, ignore_index, out, row_float);
      break;
    case at::kBFloat16:
      rows_loop(logits.data_ptr<c10::BFloat16>(), stride, rows, vocab, target, ignore_index, out, row_bfloat16);
      break;
    case at::kHalf:
      rows_loop(logits.data_ptr<c10::Half>(), stride, rows, vocab, target, ignore_index, out, row_half);
      break;
    default:
      TORCH_CHECK(false, "cross_entropy_grad_: logits dtype ", logits.scalar_type(),
                  " not supported (float32, bfloat16, float16)");
  }
  return losses;
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) { m.impl("cross_entropy_grad_", &cross_entropy_grad_cpu); }

}  // namespace longtrain
