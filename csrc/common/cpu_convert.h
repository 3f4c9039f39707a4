// Rows of float32 / bfloat16 / float16 to and from float32, for CPU kernels that compute in float32
// whatever their storage. Loops are plain so that the LT_VECTOR_CLONES callers vectorize them; the
// bfloat16 rounding is nearest even, as c10::BFloat16's, written branch-free.
#pragma once

#include <torch/extension.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu_math.h"

namespace longtrain {

LT_INLINE float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Nearest even; a NaN stays a (quiet) NaN.
LT_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? (u >> 16) | 0x40u : rounded);
}

// n values to float32 (load_floats) and back, rounded (store_floats); float32 is a copy.
LT_VECTOR_CLONES static void load_floats_bf16(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(bits[i]);
}
LT_VECTOR_CLONES static void store_floats_bf16(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) bits[i] = float_to_bf16_bits(src[i]);
}
LT_VECTOR_CLONES static void load_floats_half(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
LT_VECTOR_CLONES static void store_floats_half(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}
inline void load_floats(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void load_floats(const c10::BFloat16* src, float* dst, int64_t n) { load_floats_bf16(src, dst, n); }
inline void load_floats(const c10::Half* src, float* dst, int64_t n) { load_floats_half(src, dst, n); }
inline void store_floats(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_floats(const float* src, c10::BFloat16* dst, int64_t n) { store_floats_bf16(src, dst, n); }
inline void store_floats(const float* src, c10::Half* dst, int64_t n) { store_floats_half(src, dst, n); }

// Calls fn(T{}) with T the C++ type of a float32, bfloat16 or float16 tensor; `what` names the
// op and operand in the error for any other dtype.
template <typename F>
void dispatch_float_types(at::ScalarType type, const char* what, const F& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": dtype ", type, " not supported (float32, bfloat16, float16)");
  }
}

}  // namespace longtrain
