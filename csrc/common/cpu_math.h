// Scalar math written so that GCC vectorizes loops calling it, without -ffast-math.
//
// libm's expf is a call the vectorizer cannot see through; `exp_approx` is the classic
// Cody-Waite range reduction + degree-6 polynomial (as in Cephes' expf), accurate to about
// 2 ulp for |x| < 87, and made only of operations that vectorize (round by magic number,
// int shift into the exponent field). Callers mark their hot loops with LT_VECTOR_CLONES
// so that AVX-512 and AVX2+FMA variants are picked at load time (by feature level; "arch=<cpu>"
// clones would test for one CPU model and fall back to SSE2 on every other).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LT_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LT_VECTOR_CLONES
#endif
#define LT_INLINE inline __attribute__((always_inline))

namespace longtrain {

LT_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);  // min/max, not a branch, so that it vectorizes
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(1 + w) for w in [0, 1]: 2 atanh(s) with s = w / (2 + w) <= 1/3, odd series to s^13
// (truncation below 5e-8 relative).
LT_INLINE float log1p_unit(float w) {
  const float s = w / (2.0f + w), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), branch-free.
LT_INLINE float softplus_approx(float x) { return std::max(x, 0.0f) + log1p_unit(exp_approx(-std::fabs(x))); }

// Sum of 16 lanes by halving, written out level by level so that it compiles to a few in-register
// vector adds (a loop over the levels went through the stack, and a running sum is 16 adds).
LT_INLINE float lane_sum16(const float* lanes) {
  float half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) quarter[i] = half[i] + half[i + 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

LT_INLINE float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace longtrain
