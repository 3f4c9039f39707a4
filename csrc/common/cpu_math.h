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
#include <limits>

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

// Sum of 16 lanes by halving, written out level by level (a loop over the levels went through
// the stack). One reduction per step is still costly; row_sums16 below batches 16 of them.
LT_INLINE float lane_sum16(const float* lanes) {
  float half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) quarter[i] = half[i] + half[i + 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

// GCC vector extensions: lowered to AVX-512, AVX2 or SSE2 by whichever clone inlines them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always inlined, so no vec16 crosses a call boundary
typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t index16 __attribute__((vector_size(64)));

LT_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sums of 16 rows of 16 floats (row r at rows + 16 r) into sums[0..16): each level adds the two
// halves of two vectors at once, so the 16 reductions take 15 vector adds and 31 shuffles in all
// instead of a tree per row. After the four levels lane l holds row bitreverse4(l).
LT_INLINE void row_sums16(const float* rows, float* sums) {
  const index16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const index16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const index16 lo2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const index16 hi2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const index16 lo3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const index16 hi3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const index16 lo4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const index16 hi4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  const index16 bit_reverse = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  vec16 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j) {
    const vec16 x = load16(rows + 32 * j), y = load16(rows + 32 * j + 16);
    a[j] = __builtin_shuffle(x, y, lo1) + __builtin_shuffle(x, y, hi1);
  }
  for (int j = 0; j < 4; ++j)
    b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], lo2) + __builtin_shuffle(a[2 * j], a[2 * j + 1], hi2);
  for (int j = 0; j < 2; ++j)
    c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], lo3) + __builtin_shuffle(b[2 * j], b[2 * j + 1], hi3);
  const vec16 d = __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], hi4);
  const vec16 ordered = __builtin_shuffle(d, bit_reverse);
  std::memcpy(sums, &ordered, sizeof(ordered));
}
#pragma GCC diagnostic pop

// sums[r] = sum of lanes[16 r .. 16 r + 16) for r < rows.
LT_INLINE void row_sums(const float* lanes, int64_t rows, float* sums) {
  int64_t r = 0;
  for (; r + 16 <= rows; r += 16) row_sums16(lanes + 16 * r, sums + r);
  for (; r < rows; ++r) sums[r] = lane_sum16(lanes + 16 * r);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kLanes = 16;

// Reductions keep kLanes partial results so that they vectorize without -ffast-math; the max is
// written on vec16 because GCC leaves a std::max reduction over floats scalar.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
LT_INLINE float row_max_of(const float* __restrict s, int64_t n) {
  vec16 lanes = vec16{} + kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec16 v = load16(s + j);
    lanes = v > lanes ? v : lanes;
  }
  float m = kNegInf;
  for (; j < n; ++j) m = std::max(m, s[j]);
  for (int64_t i = 0; i < kLanes; ++i) m = std::max(m, lanes[i]);
  return m;
}
#pragma GCC diagnostic pop

// s[j] <- exp(s[j] - shift) for j < n; returns the sum.
LT_INLINE float exp_shifted(float* __restrict s, int64_t n, float shift) {
  float lanes[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t i = 0; i < kLanes; ++i) {
      const float p = exp_approx(s[j + i] - shift);
      s[j + i] = p;
      lanes[i] += p;
    }
  float sum = 0.0f;
  for (; j < n; ++j) {
    s[j] = exp_approx(s[j] - shift);
    sum += s[j];
  }
  for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
}

LT_INLINE float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace longtrain
