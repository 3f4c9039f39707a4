// bfloat16 x bfloat16 -> float32 matrix products for the CPU kernels, accumulated in float32.
//
// Products of two bfloat16 numbers are exact in float32, so with float32 accumulation the result is
// what a float32 matmul of the upcast inputs gives, up to summation order, at the bfloat16 rate of
// the CPU: AVX512-BF16's vdpbf16ps multiplies two pairs of bfloat16 and adds both into a float32
// lane, 32 products per instruction, twice the float32 FMA count. Neither torch nor the BLAS it links
// exports such a product for the CPU: at::mm rounds the result to bfloat16, and MKL's
// cblas_gemm_bf16bf16f32 does not use AVX512-BF16 on other vendors' CPUs (measured: no faster than
// sgemm). Without AVX512-BF16 the same contract runs as plain float32 loops (correct, not fast).
//
// Layout (the one vdpbf16ps wants, "VNNI"): A row-major with k contiguous and even; B packed by
// pack_b as (k / 2, n16, 2) with n16 = n rounded up to 16: the two k-values of each column side by side.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LT_HAS_X86 1
#define LT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define LT_HAS_X86 0
#endif

namespace longtrain {

using bf16 = c10::BFloat16;

inline bool cpu_has_bf16_dot() {
#if LT_HAS_X86
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Set to run the portable loops even where the CPU has AVX512-BF16 (so tests check them anywhere).
inline std::atomic<bool>& bf16_portable_only() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline bool use_native_bf16() { return cpu_has_bf16_dot() && !bf16_portable_only().load(std::memory_order_relaxed); }

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// op(B) packed: k-pair p of column j at data[p * ld + 2 * j], data[p * ld + 2 * j + 1]. Columns from
// j0 on are `columns(j0)`, rows from an even k0 on are `rows(k0)`.
struct PackedB {
  const uint16_t* data;
  int64_t ld;
  PackedB columns(int64_t j0) const { return {data + 2 * j0, ld}; }
  PackedB rows(int64_t k0) const { return {data + k0 / 2 * ld, ld}; }
};

// uint16 elements that pack_b writes for op(B)[k, n].
inline int64_t packed_b_size(int64_t k, int64_t n) { return (k + 1) / 2 * round16(n) * 2; }

// op(B)[k, n] (op = transpose when trans_b; row-major, leading dimension ldb) into `out`, laid out as
// (ceil(k / 2), round16(n), 2) with zeros where k is odd and beyond n.
inline PackedB pack_b(bool trans_b, int64_t k, int64_t n, const bf16* b, int64_t ldb, uint16_t* out) {
  const int64_t pairs = (k + 1) / 2, n16 = round16(n);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(b);
  for (int64_t kp = 0; kp < pairs; ++kp) {
    uint16_t* row = out + kp * n16 * 2;
    const int64_t k0 = 2 * kp;
    const bool odd_tail = k0 + 1 >= k;
    if (trans_b) {  // B^T is stored: column j of op(B) is row j of the buffer, its k-pair adjacent
      for (int64_t j = 0; j < n; ++j) {
        row[2 * j] = src[j * ldb + k0];
        row[2 * j + 1] = odd_tail ? 0 : src[j * ldb + k0 + 1];
      }
    } else {
      const uint16_t *r0 = src + k0 * ldb, *r1 = src + (k0 + 1) * ldb;
      for (int64_t j = 0; j < n; ++j) {
        row[2 * j] = r0[j];
        row[2 * j + 1] = odd_tail ? 0 : r1[j];
      }
    }
    std::fill(row + 2 * n, row + 2 * n16, uint16_t{0});
  }
  return {out, 2 * n16};
}

#if LT_HAS_X86
// R rows x NV vectors of 16 columns of C = alpha * A @ B + beta * C; masks select the valid columns.
template <int R, int NV>
LT_BF16_TARGET void bf16_tile(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* bp, int64_t ldbp,
                              float* c, int64_t ldc, float alpha, float beta, __mmask16 mask0, __mmask16 mask1) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bp + kp * ldbp + 32 * v);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, b[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == 0 ? mask0 : mask1;
      float* out = c + r * ldc + 16 * v;
      __m512 result = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.0f) result = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, out), vb, result);
      _mm512_mask_storeu_ps(out, mask, result);
    }
}

// 8 x 2 accumulators + 2 B vectors + 1 broadcast of A; 8 divides the tile heights of the attention
// kernel (64, 256), and measured as fast as 12 or 14 rows there.
constexpr int kBf16Rows = 8;

using Bf16TileFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, float, float,
                            __mmask16, __mmask16);

template <int NV, size_t... R>
constexpr std::array<Bf16TileFn, sizeof...(R)> bf16_tiles(std::index_sequence<R...>) {
  return {&bf16_tile<static_cast<int>(R) + 1, NV>...};
}
#endif

#if LT_HAS_X86
LT_BF16_TARGET inline void round_to_bf16_native(const float* src, int64_t lds, int64_t rows, int64_t width,
                                                uint16_t* a, int64_t lda, uint16_t* packed) {
  auto mask = [](int64_t left) -> __mmask16 { return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1; };
  for (int64_t r = 0; a && r < rows; ++r) {
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 m = mask(width - j);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + r * lds + j));
      _mm256_mask_storeu_epi16(a + r * lda + j, m, (__m256i)h);
    }
    for (int64_t j = width; j < lda && j < width + 1; ++j) a[r * lda + j] = 0;
  }
  if (!packed) return;
  alignas(64) static constexpr uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  const int64_t n16 = round16(width);
  for (int64_t r = 0; r < rows; r += 2) {
    uint16_t* row = packed + r / 2 * 2 * n16;
    for (int64_t j = 0; j < n16; j += 16) {
      const __mmask16 m = mask(width - j);
      const __m512 v0 = _mm512_maskz_loadu_ps(m, src + r * lds + j);
      const __m512 v1 = r + 1 < rows ? _mm512_maskz_loadu_ps(m, src + (r + 1) * lds + j) : _mm512_setzero_ps();
      // cvtne2ps puts v0 in the low 16 lanes and v1 in the high 16; pairs interleave them.
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
      _mm512_storeu_si512(row + 2 * j, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}
#endif

#if LT_HAS_X86
// 2^x on 16 lanes: 2^k (vscalefps, exact, and 0 below the float range) times 2^r, r = x - k in
// [-1/2, 1/2], by a degree-5 polynomial fitted for relative error (2e-7 in float32, as exp_approx).
// The native softmax works in base 2 with log2(e) folded into the score scale (as flash-attn's
// softmax_scale_log2): 9 vector operations per 16 exponentials against 14 for exp_approx.
LT_BF16_TARGET inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-151.0f));  // 2^-151 rounds to 0; keeps -inf out of r
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(0.0013266970636323094f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.009675459936261177f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.05550742521882057f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.24022121727466583f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931469440460205f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, k);
}

// One row of the online softmax in base 2, rounded on the way out: lo[j] = bf16(2^(s[j] - max)) for the
// `visible` first keys, 0 after them up to `width2`; returns the sum of the float32 values (flash-attn
// sums before rounding). s is only read.
LT_BF16_TARGET inline float exp_round_row(const float* s, int64_t visible, int64_t width2, float shift,
                                          uint16_t* lo) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 vshift = _mm512_set1_ps(shift);
  int64_t j = 0;
  for (; j < visible; j += 16) {
    const int64_t left = visible - j;
    const __mmask16 m = left >= 16 ? 0xFFFF : (1u << left) - 1;
    const __m512 e = _mm512_maskz_mov_ps(m, exp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vshift)));
    sum = _mm512_add_ps(sum, e);
    const int64_t room = width2 - j;  // zeros of the masked lanes fill the row up to width2
    const __mmask16 store = room >= 16 ? 0xFFFF : (1u << room) - 1;
    _mm256_mask_storeu_epi16(lo + j, store, (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (; j < width2; ++j) lo[j] = 0;
  return _mm512_reduce_add_ps(sum);
}
#endif

// rows x width float32 (leading dimension lds) rounded to bfloat16, nearest even: into `a` when given
// (row-major, leading dimension lda; a zero column at `width` when lda > width, for an even k), and
// when `packed` is given into pack_b's layout of the same (rows x width) matrix, the B operand of a
// product over its rows. The portable path needs `a` (it packs from it).
inline void round_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t width, uint16_t* a, int64_t lda,
                          uint16_t* packed) {
#if LT_HAS_X86
  if (use_native_bf16()) return round_to_bf16_native(src, lds, rows, width, a, lda, packed);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) a[r * lda + j] = c10::BFloat16(src[r * lds + j]).x;
    if (lda > width) a[r * lda + width] = 0;
  }
  if (packed) pack_b(false, rows, width, reinterpret_cast<const bf16*>(a), lda, packed);
}

// The causal band of a product inside attention: local query a sees local key b iff b < a + offset.
// `kind` names the product's query and key indices. Outside the band the masked operand (P or dS) is
// zero, so the products skip it exactly, in blocks of 8 rows x 32 columns x 2 k; entries of C outside
// it may be left unwritten (their readers stop at each row's visible keys).
struct Band {
  enum Kind {
    kNone,
    kRowsQueriesColsKeys,  // S = Q K^T, dP = dO V^T: C's columns end per row block
    kRowsQueriesKKeys,     // out += P V, dQ += dS K: the sum over keys ends per row block
    kColsKeysKQueries,     // dV^T += dO^T P, dK^T += Q^T dS: the sum over queries starts per column block
  } kind = kNone;
  int64_t offset = 0;
};

// C[m, n] (float32, leading dimension ldc) = alpha * A @ B + beta * C, A (m, k2) row-major with k2
// even, B packed by pack_b; `band` skips what a causal mask zeroes.
inline void bf16_gemm_packed(int64_t m, int64_t n, int64_t k2, float alpha, const uint16_t* a, int64_t lda, PackedB b,
                             float beta, float* c, int64_t ldc, Band band = {}) {
  const int64_t pairs = k2 / 2;
#if LT_HAS_X86
  if (use_native_bf16()) {
    static const auto one = bf16_tiles<1>(std::make_index_sequence<kBf16Rows>());
    static const auto two = bf16_tiles<2>(std::make_index_sequence<kBf16Rows>());
    // A block of rows stays in L1 while it meets every column block of B (from L2): measured 1.3x
    // faster than the other loop order on the attention tile shapes.
    for (int64_t i0 = 0; i0 < m; i0 += kBf16Rows) {
      const int64_t rows = std::min<int64_t>(kBf16Rows, m - i0);
      const int64_t last_sees = i0 + rows - 1 + band.offset;  // keys [0, last_sees) reach the block's last row
      const int64_t n_end = band.kind == Band::kRowsQueriesColsKeys ? std::clamp<int64_t>(last_sees, 0, n) : n;
      const int64_t pair_end =
          band.kind == Band::kRowsQueriesKKeys ? (std::clamp<int64_t>(last_sees, 0, k2) + 1) / 2 : pairs;
      for (int64_t j0 = 0; j0 < n_end; j0 += 32) {
        const int64_t cols = std::min<int64_t>(32, n_end - j0);
        // Key j0 is first seen by query j0 - offset + 1; start at its (even) pair.
        const int64_t pair0 =
            band.kind == Band::kColsKeysKQueries ? std::clamp<int64_t>(j0 - band.offset + 1, 0, k2) / 2 : 0;
        const __mmask16 mask0 = cols >= 16 ? 0xFFFF : (1u << cols) - 1;
        const __mmask16 mask1 = cols >= 32 ? 0xFFFF : cols > 16 ? (1u << (cols - 16)) - 1 : 0;
        const auto& tiles = cols > 16 ? two : one;
        tiles[rows - 1](std::max<int64_t>(pair_end - pair0, 0), a + i0 * lda + 2 * pair0, lda,
                        b.data + pair0 * b.ld + 2 * j0, b.ld, c + i0 * ldc + j0, ldc, alpha, beta, mask0, mask1);
      }
    }
    return;
  }
#endif
  std::vector<float> row(n);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t kp = 0; kp < pairs; ++kp) {
      const float a0 = c10::detail::f32_from_bits(a[i * lda + 2 * kp]);
      const float a1 = c10::detail::f32_from_bits(a[i * lda + 2 * kp + 1]);
      const uint16_t* bp = b.data + kp * b.ld;
      for (int64_t j = 0; j < n; ++j)
        row[j] += a0 * c10::detail::f32_from_bits(bp[2 * j]) + a1 * c10::detail::f32_from_bits(bp[2 * j + 1]);
    }
    float* out = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) out[j] = alpha * row[j] + (beta == 0.0f ? 0.0f : beta * out[j]);
  }
}

}  // namespace longtrain
