// Flash-style attention on CPU, forward and backward (Dao 2023, "FlashAttention-2", Alg. 1 and 2).
//
// Work is split over (batch, head, query tile) in the forward and over (batch, head) in the
// backward, handed to workers one task at a time (cpu_parallel.h); each task writes only its own rows
// of out and lse, or its own head's dq, dk and dv, so no sum crosses tasks and the results do not depend
// on which worker ran which task (dk, dv of grouped heads are summed afterwards). Scores exist only one
// (query tile x key tile) block at a time, so memory grows linearly with the sequence: the
// forward keeps a running max and sum per row (online softmax, Milakov & Gimelshein 2018) and
// the backward recomputes probabilities from the saved log-sum-exp. The five tile products go
// to the BLAS sgemm that torch links (MKL on x86 wheels); if no sgemm symbol is present, at::mm
// on strided views does the same work more slowly.
// bfloat16 inputs on a CPU with AVX512-BF16 take the same tiles through bfloat16 products with float32
// accumulation (cpu_bf16_gemm.h), about twice the float32 rate, with flash-attn's roundings: the
// scores, the online softmax, the log-sum-exp and every accumulator (out, dq, dk, dv) are float32, and
// only P and dS are rounded to bfloat16 before they multiply V, dO, K and Q. Other inputs, and
// bfloat16 on CPUs without it, are computed in float32 (LONGTRAIN_CPU_BF16_GEMM=0/1 forces either
// path; 1 without AVX512-BF16, or "portable", runs portable loops: correct but slow, for tests).
// Causal masks are bottom-right aligned as in flash-attn: query i sees key j when j <= i + seq_k - seq_q;
// a row that sees no key gets output 0 and lse -inf. Grouped-query attention: query head h reads K/V
// head h / (heads / kv_heads).
// Masks on absolute positions (q_start + i for query i, k_start + j for key j): flash-attn's sliding
// window (left, right) (Beltagy et al. 2020, "Longformer"), attention sinks, the first tokens of each
// document kept visible past the window (Xiao et al. 2023, "StreamingLLM"), and documents (a query sees
// only keys with its own document start). The right edge (the diagonal under causal) bounds each tile's
// products as the causal mask does; key tiles start where a query tile's window starts, and tiles that
// no query of the tile sees (outside the window, the sinks or the tile's documents) are never computed,
// so a sliding window costs seq * window, not seq^2. Inside a tile the left edge and documents mask
// element by element.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../common/cpu_bf16_gemm.h"
#include "../common/cpu_convert.h"
#include "../common/cpu_math.h"
#include "../common/cpu_parallel.h"
#include "attention_checks.h"

extern "C" {
// Fortran BLAS, exported by libtorch_cpu when torch is built with MKL or OpenBLAS. Weak, so the
// extension still loads against a torch without it.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
}

namespace longtrain {
namespace {

// Score tiles of (query rows x kTileK keys); the row count follows the sequence length, as in
// torch's own CPU flash kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp: 256 query rows
// from 768 on, 512 keys): larger tiles make each sgemm call longer and the calls fewer.
constexpr int64_t kMaxTileQ = 256;
constexpr int64_t kTileK = 512;
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, op(X) = X^T when the flag is set.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_) {
    // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<float*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  if (beta == 0.0f) out.copy_(prod.mul_(alpha)); else out.mul_(beta).add_(prod, alpha);
}

// Keys per block of the document bounds (AttentionMask::block_min, block_max).
constexpr int64_t kDocBlock = 16;

// What the right edge does not cover: the window's left edge, the sinks and the documents.
struct AttentionMask {
  int64_t left = -1;   // row i sees keys j >= i + shift - left (and the sinks) when left >= 0
  int64_t shift = 0;   // q_start - k_start
  int64_t sinks = 0, k_start = 0;
  const int32_t *doc_q = nullptr, *doc_k = nullptr;  // (batch, seq_q), (batch, seq_k); null without documents
  int64_t blocks = 0;                               // kDocBlock-key blocks per row of doc_k
  std::vector<int32_t> block_min, block_max;        // doc_k's bounds per (batch, block)
};

struct AttentionProblem {
  int64_t batch, seq_q, seq_k, heads, kv_heads, dim;
  // The right edge: row i sees keys j <= i + offset when bounded (causal: offset = q_start - k_start;
  // a window's right edge adds to it).
  bool bounded;
  int64_t offset;
  float scale;
  int64_t tile_q;  // query rows per tile, <= kMaxTileQ
  const AttentionMask* mask = nullptr;  // null without left edge, sinks or documents
  int64_t q_stride() const { return heads * dim; }    // between rows of q, out, dout
  int64_t kv_stride() const { return kv_heads * dim; }  // between rows of k, v
  // Keys [0, end) that any query in [i0, i1) may see.
  int64_t key_end(int64_t i1) const { return bounded ? std::clamp<int64_t>(i1 + offset, 0, seq_k) : seq_k; }
  // The right-edge band of a product between the query tile at i0 and the key tile at j0 (none without one).
  Band band(Band::Kind kind, int64_t i0, int64_t j0) const {
    return bounded ? Band{kind, i0 + offset - j0 + 1} : Band{};
  }
  // Keys of row i inside the tile starting at key j0 of width width, up to the right edge.
  int64_t visible(int64_t i, int64_t j0, int64_t width) const {
    return bounded ? std::clamp<int64_t>(i + offset - j0 + 1, 0, width) : width;
  }
};

// The mask of one query tile's rows, for the element-wise part inside key tiles.
struct TileRows {
  int64_t lo[kMaxTileQ];        // the window's first key per row
  int64_t sink_end[kMaxTileQ];  // sink keys [0, sink_end) before lo, when of the row's document
  int32_t doc[kMaxTileQ];       // the row's document start
  const int32_t* doc_k = nullptr;  // this batch row's doc_k
  int32_t doc_min = 0, doc_max = 0;
};

void tile_rows(const AttentionProblem& p, int64_t b, int64_t i0, int64_t rows, TileRows& t) {
  const AttentionMask& m = *p.mask;
  if (m.doc_k) t.doc_k = m.doc_k + b * p.seq_k;
  t.doc_min = std::numeric_limits<int32_t>::max();
  t.doc_max = std::numeric_limits<int32_t>::min();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    t.doc[r] = m.doc_q ? m.doc_q[b * p.seq_q + i] : 0;
    t.doc_min = std::min(t.doc_min, t.doc[r]);
    t.doc_max = std::max(t.doc_max, t.doc[r]);
    t.lo[r] = m.left >= 0 ? std::clamp<int64_t>(i + m.shift - m.left, 0, p.seq_k) : 0;
    const int64_t before = std::min(t.lo[r], p.key_end(i + 1));
    t.sink_end[r] = m.sinks > 0 ? std::clamp<int64_t>(t.doc[r] + m.sinks - m.k_start, 0, before) : 0;
  }
}

// Keys [j0, j0 + width) computed together for a query tile; `masked` when some of them are hidden
// from some rows by the left edge or the documents.
struct KeyTile {
  int64_t j0, width;
  bool masked, docs;  // docs: the documents differ inside the tile
};

// The key tiles a query tile [i0, i0 + rows) meets, in increasing key order (a fixed order of the sums).
std::vector<KeyTile> key_tiles(const AttentionProblem& p, int64_t b, int64_t i0, int64_t rows, const TileRows* t) {
  std::vector<KeyTile> tiles;
  const int64_t end = p.key_end(i0 + rows);
  if (!t) {
    for (int64_t j0 = 0; j0 < end; j0 += kTileK) tiles.push_back({j0, std::min(kTileK, end - j0), false, false});
    return tiles;
  }
  const AttentionMask& m = *p.mask;
  auto meets = [&](int64_t block) {  // whether a key block may hold one of the tile's documents
    const int64_t at = b * m.blocks + block;
    return m.block_max[at] >= t->doc_min && m.block_min[at] <= t->doc_max;
  };
  // Two ranges: the sinks [0, sink_end) and the window [lo, end); the second starts at an even key
  // (the bfloat16 path's packed K and V start their pairs there).
  int64_t sink_end = 0;
  for (int64_t r = 0; r < rows; ++r) sink_end = std::max(sink_end, t->sink_end[r]);
  std::pair<int64_t, int64_t> ranges[2] = {{0, sink_end}, {t->lo[0], end}};
  for (auto& [begin, stop] : ranges) {
    if (m.doc_k) {  // trim blocks of other documents off both ends
      while (begin < stop && !meets(begin / kDocBlock)) begin = (begin / kDocBlock + 1) * kDocBlock;
      while (stop > begin && !meets((stop - 1) / kDocBlock)) stop = (stop - 1) / kDocBlock * kDocBlock;
      begin = std::min(begin, stop);
    }
    if (begin < stop) begin -= begin % 2;
  }
  if (ranges[1].first <= ranges[0].second) {  // they touch: one range
    ranges[1].first = std::min(ranges[0].first, ranges[1].first);
    ranges[0] = {0, 0};
  }
  for (const auto& [begin, stop] : ranges) {
    // Tiles of equal width (even, so that each starts at an even key), not kTileK and a sliver.
    const int64_t count = (stop - begin + kTileK - 1) / kTileK;
    const int64_t step = count ? std::min(kTileK, ((stop - begin + count - 1) / count + 1) / 2 * 2) : kTileK;
    for (int64_t j0 = begin; j0 < stop; j0 += step) {
      const int64_t width = std::min(step, stop - j0);
      bool docs = false;
      if (m.doc_k) {
        int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
        bool any = false;
        for (int64_t block = j0 / kDocBlock; block <= (j0 + width - 1) / kDocBlock; ++block) {
          any = any || meets(block);
          lo = std::min(lo, m.block_min[b * m.blocks + block]);
          hi = std::max(hi, m.block_max[b * m.blocks + block]);
        }
        if (!any) continue;  // no key of the tile's documents
        docs = !(lo == hi && t->doc_min == lo && t->doc_max == lo);
      }
      tiles.push_back({j0, width, docs || t->lo[rows - 1] > j0, docs});
    }
  }
  return tiles;
}

// Sets the keys of row r that the left edge or the documents hide, among its first `end` keys of the
// tile, to `value`: -inf before the softmax, 0 after it.
template <typename T>
void mask_row(const TileRows& t, int64_t r, const KeyTile& tile, int64_t end, T* s, T value) {
  const int64_t first = std::clamp<int64_t>(t.lo[r] - tile.j0, 0, end);
  const int64_t sinks = std::clamp<int64_t>(t.sink_end[r] - tile.j0, 0, first);
  for (int64_t j = sinks; j < first; ++j) s[j] = value;
  if (!tile.docs) return;
  const int32_t* doc = t.doc_k + tile.j0;
  const int32_t own = t.doc[r];
  for (int64_t j = 0; j < end; ++j)
    if (doc[j] != own) s[j] = value;
}

// The element-wise mask of one (query tile, key tile) product, or none.
struct TileMask {
  const TileRows* rows;
  const KeyTile* tile;
  template <typename T>
  void apply(int64_t r, int64_t end, T* s, T value) const {
    if (rows && tile->masked) mask_row(*rows, r, *tile, end, s, value);
  }
};

// Online-softmax update of one row of a (pre-scaled) score tile, in place: scores -> unnormalised
// probabilities (zero beyond `visible`). Returns the factor that rescales what the row held before.
LT_VECTOR_CLONES
float softmax_row_update(float* __restrict s, int64_t visible, int64_t width, float& row_max, float& row_sum) {
  const float new_max = std::max(row_max, row_max_of(s, visible));
  if (new_max == kNegInf) {
    for (int64_t j = 0; j < width; ++j) s[j] = 0.0f;
    return 1.0f;
  }
  const float sum = exp_shifted(s, visible, new_max);
  for (int64_t j = visible; j < width; ++j) s[j] = 0.0f;
  const float alpha = row_max == kNegInf ? 0.0f : exp_approx(row_max - new_max);
  row_max = new_max;
  row_sum = row_sum * alpha + sum;
  return alpha;
}

// Finishes the out rows of a query tile from its accumulator: out = acc / sum, lse = max * unit +
// log(sum) (unit ln 2 when the max is in base 2); a row that saw no key keeps out 0 and gets lse -inf.
template <typename T>
void finish_rows(int64_t rows, int64_t d, const float* acc, int64_t ldacc, const float* row_max, const float* row_sum,
                 T* out, int64_t ldo, float* lse, float unit = 1.0f) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = row_sum[r] == 0.0f ? 0.0f : 1.0f / row_sum[r];
    for (int64_t c = 0; c < d; ++c) out[r * ldo + c] = static_cast<T>(acc[r * ldacc + c] * inv);
    lse[r] = row_sum[r] == 0.0f ? kNegInf : row_max[r] * unit + std::log(row_sum[r]);
  }
}

// Online-softmax step over one score tile for every row of a query tile, rescaling what the out
// accumulator held.
void softmax_tile(const AttentionProblem& p, int64_t rows, int64_t i0, int64_t j0, int64_t width, float* scores,
                  float* row_max, float* row_sum, float* acc, int64_t ldacc, const TileMask& mask) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * kTileK;
    const int64_t visible = p.visible(i0 + r, j0, width);
    mask.apply(r, visible, s, kNegInf);
    const float alpha = softmax_row_update(s, visible, width, row_max[r], row_sum[r]);
    mask.apply(r, visible, s, 0.0f);  // exp_approx(-inf) is tiny, not 0
    if (alpha != 1.0f)
      for (int64_t c = 0; c < p.dim; ++c) acc[r * ldacc + c] *= alpha;
  }
}

void forward_tile(const AttentionProblem& p, const float* q, const float* k, const float* v, float* out, float* lse,
                  int64_t b, int64_t h, int64_t i0, float* scores) {
  const int64_t rows = std::min(p.tile_q, p.seq_q - i0), d = p.dim, ldq = p.q_stride(), ldk = p.kv_stride();
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const float* q_tile = q + (b * p.seq_q + i0) * ldq + h * d;
  float* o_tile = out + (b * p.seq_q + i0) * ldq + h * d;  // its own accumulator
  const float* k_head = k + b * p.seq_k * ldk + kvh * d;
  const float* v_head = v + b * p.seq_k * ldk + kvh * d;
  float row_max[kMaxTileQ], row_sum[kMaxTileQ];
  for (int64_t r = 0; r < rows; ++r) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
    std::fill(o_tile + r * ldq, o_tile + r * ldq + d, 0.0f);
  }
  TileRows masks;
  if (p.mask) tile_rows(p, b, i0, rows, masks);
  for (const KeyTile& tile : key_tiles(p, b, i0, rows, p.mask ? &masks : nullptr)) {
    const int64_t j0 = tile.j0, width = tile.width;
    gemm(false, true, rows, width, d, p.scale, q_tile, ldq, k_head + j0 * ldk, ldk, 0.0f, scores, kTileK);
    softmax_tile(p, rows, i0, j0, width, scores, row_max, row_sum, o_tile, ldq,
                 TileMask{p.mask ? &masks : nullptr, &tile});
    gemm(false, false, rows, d, width, 1.0f, scores, kTileK, v_head + j0 * ldk, ldk, 1.0f, o_tile, ldq);
  }
  finish_rows(rows, d, o_tile, ldq, row_max, row_sum, o_tile, ldq, lse + (b * p.heads + h) * p.seq_q + i0);
}

// Probabilities of one score row from the saved lse; then, given dP in `dp`, dS = P * (dP - delta).
LT_VECTOR_CLONES
void probabilities_row(float* __restrict s, int64_t visible, int64_t width, float lse) {
  if (lse == kNegInf) visible = 0;
  for (int64_t j = 0; j < visible; ++j) s[j] = exp_approx(s[j] - lse);
  for (int64_t j = visible; j < width; ++j) s[j] = 0.0f;
}

#if LT_HAS_X86
// probabilities_row for every row of a tile, on AVX-512 (the bfloat16 path's CPUs), in base 2: the
// scores carry a factor log2(e), and so does the lse here.
LT_BF16_TARGET void probabilities_tile_native(const AttentionProblem& p, int64_t rows, int64_t i0, int64_t j0,
                                              int64_t width, const float* lse, float* probs) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = probs + r * kTileK;
    const int64_t visible = lse[r] == kNegInf ? 0 : p.visible(i0 + r, j0, width);
    const __m512 shift = _mm512_set1_ps(lse[r] * kLog2e);
    int64_t j = 0;
    for (; j + 16 <= visible; j += 16)
      _mm512_storeu_ps(s + j, exp2_16(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift)));
    if (j < visible) {
      const __mmask16 m = (1u << (visible - j)) - 1;
      _mm512_mask_storeu_ps(s + j, m, exp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), shift)));
      j = visible;
    }
    std::fill(s + j, s + width, 0.0f);
  }
}
#endif

// dP beyond `visible` may be unwritten (Band): it is not read, and dS is zero there.
LT_VECTOR_CLONES
void score_grad_row(const float* __restrict prob, float* __restrict dp, int64_t visible, int64_t width, float delta) {
  for (int64_t j = 0; j < visible; ++j) dp[j] = prob[j] * (dp[j] - delta);
  for (int64_t j = visible; j < width; ++j) dp[j] = 0.0f;
}

struct AttentionGrads {
  const float *lse, *dlse;
  float *dq, *dk, *dv;  // float32, (batch, seq, heads, dim); dk, dv per query head
  bf16* dq_lo = nullptr;  // the bfloat16 path writes dq here, rounded once per query tile, instead of dq
};

// delta_r = dO_r . O_r - dlse_r for the rows of a query tile (d lse / d score = P, so an incoming lse
// gradient shifts the row's delta).
template <typename T>
void row_deltas(int64_t rows, int64_t d, const T* dout, int64_t lddo, const T* out, int64_t ldo, const float* dlse,
                float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    float dot = 0.0f;
    for (int64_t c = 0; c < d; ++c)
      dot += static_cast<float>(dout[r * lddo + c]) * static_cast<float>(out[r * ldo + c]);
    delta[r] = dot - (dlse ? dlse[r] : 0.0f);
  }
}

void backward_head(const AttentionProblem& p, const float* q, const float* k, const float* v, const float* dout,
                   const float* out, const AttentionGrads& g, int64_t b, int64_t h, float* probs, float* dprobs) {
  const int64_t d = p.dim, ldq = p.q_stride(), ldk = p.kv_stride();
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const float* k_head = k + b * p.seq_k * ldk + kvh * d;
  const float* v_head = v + b * p.seq_k * ldk + kvh * d;
  float* dk_head = g.dk + b * p.seq_k * ldq + h * d;
  float* dv_head = g.dv + b * p.seq_k * ldq + h * d;
  const int64_t row0 = (b * p.heads + h) * p.seq_q;
  float delta[kMaxTileQ];
  for (int64_t i0 = 0; i0 < p.seq_q; i0 += p.tile_q) {
    const int64_t rows = std::min(p.tile_q, p.seq_q - i0), offset = (b * p.seq_q + i0) * ldq + h * d;
    const float *q_tile = q + offset, *do_tile = dout + offset;
    float* dq_tile = g.dq + offset;
    row_deltas(rows, d, do_tile, ldq, out + offset, ldq, g.dlse ? g.dlse + row0 + i0 : nullptr, delta);
    TileRows masks;
    if (p.mask) tile_rows(p, b, i0, rows, masks);
    for (const KeyTile& tile : key_tiles(p, b, i0, rows, p.mask ? &masks : nullptr)) {
      const int64_t j0 = tile.j0, width = tile.width;
      const TileMask mask{p.mask ? &masks : nullptr, &tile};
      gemm(false, true, rows, width, d, p.scale, q_tile, ldq, k_head + j0 * ldk, ldk, 0.0f, probs, kTileK);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = p.visible(i0 + r, j0, width);
        probabilities_row(probs + r * kTileK, visible, width, g.lse[row0 + i0 + r]);
        mask.apply(r, visible, probs + r * kTileK, 0.0f);
      }
      gemm(true, false, width, d, rows, 1.0f, probs, kTileK, do_tile, ldq, 1.0f, dv_head + j0 * ldq, ldq);
      gemm(false, true, rows, width, d, 1.0f, do_tile, ldq, v_head + j0 * ldk, ldk, 0.0f, dprobs, kTileK);
      for (int64_t r = 0; r < rows; ++r)
        score_grad_row(probs + r * kTileK, dprobs + r * kTileK, width, width, delta[r]);
      gemm(false, false, rows, d, width, p.scale, dprobs, kTileK, k_head + j0 * ldk, ldk, 1.0f, dq_tile, ldq);
      gemm(true, false, width, d, rows, p.scale, dprobs, kTileK, q_tile, ldq, 1.0f, dk_head + j0 * ldq, ldq);
    }
  }
}

// ---- bfloat16 products (cpu_bf16_gemm.h) --------------------------------------------------------
// q, dout and out are head-major, (batch, heads, seq_q, dim), so a query tile is a contiguous block;
// K and V are packed once per kv head as the B operand of every product that reads them.

struct KvPacks {  // one kv head
  std::vector<uint16_t> k_t, v_t;  // op(B) = K^T, V^T: (dim x seq_k), for the scores and dP
  std::vector<uint16_t> k, v;      // op(B) = K, V: (seq_k x dim), for dQ and the out product
  PackedB kt_b, vt_b, k_b, v_b;
};

// Packs what `fwd` (K^T, V) or the backward (K^T, V^T, K) needs, for every (batch, kv head).
std::vector<KvPacks> pack_kv(const AttentionProblem& p, const bf16* k, const bf16* v, bool fwd) {
  std::vector<KvPacks> packs(p.batch * p.kv_heads);
  const int64_t d = p.dim, ld = p.kv_stride();
  parallel_tasks(p.batch * p.kv_heads, [&](int64_t bh, int64_t) {
    const int64_t offset = bh / p.kv_heads * p.seq_k * ld + bh % p.kv_heads * d;
    KvPacks& kv = packs[bh];
    auto pack = [&](bool trans, const bf16* x, std::vector<uint16_t>& buffer, PackedB& packed) {
      const int64_t rows = trans ? d : p.seq_k, cols = trans ? p.seq_k : d;
      buffer.resize(packed_b_size(rows, cols));
      packed = pack_b(trans, rows, cols, x + offset, ld, buffer.data());
    };
    pack(true, k, kv.k_t, kv.kt_b);
    if (fwd) {
      pack(false, v, kv.v, kv.v_b);
    } else {
      pack(true, v, kv.v_t, kv.vt_b);
      pack(false, k, kv.k, kv.k_b);
    }
  });
  return packs;
}

// Scratch of one worker for the bfloat16 path.
struct Bf16Workspace {
  std::vector<float> scores, dscores, acc, dk_t, dv_t;
  std::vector<float> dq;            // the dq of one query tile
  std::vector<uint16_t> lo, lo_b;  // a float32 tile rounded to bfloat16: as an A operand and packed as B
  explicit Bf16Workspace(int64_t tile_q)
      : scores(tile_q * kTileK), dscores(tile_q * kTileK), lo(tile_q * (kTileK + 1)),
        lo_b(packed_b_size(tile_q, kTileK)) {}
};

#if LT_HAS_X86
// softmax_tile with P rounded to bfloat16 into `lo` (rows x w2) in the same pass over each row, in
// base 2: the scores, row_max with them, carry a factor log2(e) (exp2_16).
LT_BF16_TARGET void softmax_round_tile_native(const AttentionProblem& p, int64_t rows, int64_t i0, int64_t j0,
                                              int64_t width, float* scores, float* row_max, float* row_sum,
                                              float* acc, int64_t ldacc, uint16_t* lo, int64_t w2,
                                              const TileMask& mask) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * kTileK;
    const int64_t visible = p.visible(i0 + r, j0, width);
    mask.apply(r, visible, s, kNegInf);  // exp2_16(-inf) is exactly 0
    const float new_max = std::max(row_max[r], row_max_of(s, visible));
    if (new_max == kNegInf) {  // nothing seen yet: P is 0, the accumulator untouched
      std::fill(lo + r * w2, lo + (r + 1) * w2, uint16_t{0});
      continue;
    }
    const float alpha = row_max[r] == kNegInf ? 0.0f : exp_approx((row_max[r] - new_max) * kLn2);
    row_sum[r] = row_sum[r] * alpha + exp_round_row(s, visible, w2, new_max, lo + r * w2);
    row_max[r] = new_max;
    if (alpha != 1.0f)
      for (int64_t c = 0; c < p.dim; ++c) acc[r * ldacc + c] *= alpha;
  }
}
#endif

// Whether the bfloat16 path's softmax runs natively, in base 2 (its scores scaled by log2(e) more).
bool base2_softmax() {
#if LT_HAS_X86
  return use_native_bf16();
#else
  return false;
#endif
}

// softmax_tile, then P rounded to bfloat16 into `lo` (rows x w2).
void softmax_round_tile(const AttentionProblem& p, int64_t rows, int64_t i0, int64_t j0, int64_t width, float* scores,
                        float* row_max, float* row_sum, float* acc, int64_t ldacc, uint16_t* lo, int64_t w2,
                        const TileMask& mask) {
#if LT_HAS_X86
  if (use_native_bf16())
    return softmax_round_tile_native(p, rows, i0, j0, width, scores, row_max, row_sum, acc, ldacc, lo, w2, mask);
#endif
  softmax_tile(p, rows, i0, j0, width, scores, row_max, row_sum, acc, ldacc, mask);
  round_to_bf16(scores, kTileK, rows, width, lo, w2, nullptr);
}

void forward_tile_bf16(const AttentionProblem& p, const bf16* q, const KvPacks& kv, bf16* out, float* lse, int64_t b,
                       int64_t h, int64_t i0, Bf16Workspace& ws) {
  const int64_t rows = std::min(p.tile_q, p.seq_q - i0), d = p.dim, ldo = p.q_stride();
  const uint16_t* q_tile = reinterpret_cast<const uint16_t*>(q) + ((b * p.heads + h) * p.seq_q + i0) * d;
  ws.acc.assign(rows * d, 0.0f);
  float row_max[kMaxTileQ], row_sum[kMaxTileQ];
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.0f);
  const bool base2 = base2_softmax();
  TileRows masks;
  if (p.mask) tile_rows(p, b, i0, rows, masks);
  for (const KeyTile& tile : key_tiles(p, b, i0, rows, p.mask ? &masks : nullptr)) {
    const int64_t j0 = tile.j0, width = tile.width, w2 = (width + 1) / 2 * 2;
    bf16_gemm_packed(rows, width, d, p.scale * (base2 ? kLog2e : 1.0f), q_tile, d, kv.kt_b.columns(j0), 0.0f,
                     ws.scores.data(), kTileK, p.band(Band::kRowsQueriesColsKeys, i0, j0));
    softmax_round_tile(p, rows, i0, j0, width, ws.scores.data(), row_max, row_sum, ws.acc.data(), d, ws.lo.data(), w2,
                       TileMask{p.mask ? &masks : nullptr, &tile});
    bf16_gemm_packed(rows, d, w2, 1.0f, ws.lo.data(), w2, kv.v_b.rows(j0), 1.0f, ws.acc.data(), d,
                     p.band(Band::kRowsQueriesKKeys, i0, j0));
  }
  finish_rows(rows, d, ws.acc.data(), d, row_max, row_sum, out + (b * p.seq_q + i0) * ldo + h * d, ldo,
              lse + (b * p.heads + h) * p.seq_q + i0, base2 ? kLn2 : 1.0f);
}

// Inputs of the bfloat16 backward: head-major q, dout, out; q^T and dout^T as (batch, heads, dim,
// seq_q2) with seq_q2 = seq_q rounded up to even (zero column), the A operands of dK^T and dV^T.
struct Bf16Backward {
  const bf16 *q, *dout, *out, *q_t, *dout_t;
  int64_t seq_q2;
};

void backward_head_bf16(const AttentionProblem& p, const Bf16Backward& x, const KvPacks& kv, const AttentionGrads& g,
                        int64_t b, int64_t h, Bf16Workspace& ws) {
  const int64_t d = p.dim, ldg = p.q_stride(), bh = b * p.heads + h, row0 = bh * p.seq_q;
  auto as_bits = [](const bf16* x) { return reinterpret_cast<const uint16_t*>(x); };
  const uint16_t *q_head = as_bits(x.q) + row0 * d, *do_head = as_bits(x.dout) + row0 * d;
  const uint16_t *qt_head = as_bits(x.q_t) + bh * d * x.seq_q2, *dot_head = as_bits(x.dout_t) + bh * d * x.seq_q2;
  const bool base2 = base2_softmax();
  // dK^T and dV^T of this head, (dim, seq_k): their products then write rows, not columns.
  ws.dk_t.assign(d * p.seq_k, 0.0f);
  ws.dv_t.assign(d * p.seq_k, 0.0f);
  float delta[kMaxTileQ];
  for (int64_t i0 = 0; i0 < p.seq_q; i0 += p.tile_q) {
    const int64_t rows = std::min(p.tile_q, p.seq_q - i0), rows2 = (rows + 1) / 2 * 2;
    const uint16_t *q_tile = q_head + i0 * d, *do_tile = do_head + i0 * d;
    ws.dq.assign(rows * d, 0.0f);  // every key tile adds to it; rounded once below
    row_deltas(rows, d, x.dout + (row0 + i0) * d, d, x.out + (row0 + i0) * d, d, g.dlse ? g.dlse + row0 + i0 : nullptr,
               delta);
    TileRows masks;
    if (p.mask) tile_rows(p, b, i0, rows, masks);
    for (const KeyTile& tile : key_tiles(p, b, i0, rows, p.mask ? &masks : nullptr)) {
      const int64_t j0 = tile.j0, width = tile.width, w2 = (width + 1) / 2 * 2;
      const TileMask mask{p.mask ? &masks : nullptr, &tile};
      float *probs = ws.scores.data(), *dprobs = ws.dscores.data();
      const PackedB lo_b{ws.lo_b.data(), 2 * round16(width)};
      const Band cols = p.band(Band::kRowsQueriesColsKeys, i0, j0), ks = p.band(Band::kRowsQueriesKKeys, i0, j0),
                 qs = p.band(Band::kColsKeysKQueries, i0, j0);
      bf16_gemm_packed(rows, width, d, p.scale * (base2 ? kLog2e : 1.0f), q_tile, d, kv.kt_b.columns(j0), 0.0f,
                       probs, kTileK, cols);
#if LT_HAS_X86
      if (base2)
        probabilities_tile_native(p, rows, i0, j0, width, g.lse + row0 + i0, probs);
      else
#endif
        for (int64_t r = 0; r < rows; ++r)
          probabilities_row(probs + r * kTileK, p.visible(i0 + r, j0, width), width, g.lse[row0 + i0 + r]);
      if (p.mask)
        for (int64_t r = 0; r < rows; ++r) mask.apply(r, p.visible(i0 + r, j0, width), probs + r * kTileK, 0.0f);
      // P is only the B operand of dV^T: packed, no row-major copy (the portable path packs from one).
      round_to_bf16(probs, kTileK, rows, width, use_native_bf16() ? nullptr : ws.lo.data(), w2, ws.lo_b.data());
      bf16_gemm_packed(d, width, rows2, 1.0f, dot_head + i0, x.seq_q2, lo_b, 1.0f, ws.dv_t.data() + j0, p.seq_k, qs);
      bf16_gemm_packed(rows, width, d, 1.0f, do_tile, d, kv.vt_b.columns(j0), 0.0f, dprobs, kTileK, cols);
      for (int64_t r = 0; r < rows; ++r)
        score_grad_row(probs + r * kTileK, dprobs + r * kTileK, p.visible(i0 + r, j0, width), width, delta[r]);
      round_to_bf16(dprobs, kTileK, rows, width, ws.lo.data(), w2, ws.lo_b.data());
      bf16_gemm_packed(rows, d, w2, p.scale, ws.lo.data(), w2, kv.k_b.rows(j0), 1.0f, ws.dq.data(), d, ks);
      bf16_gemm_packed(d, width, rows2, p.scale, qt_head + i0, x.seq_q2, lo_b, 1.0f, ws.dk_t.data() + j0, p.seq_k, qs);
    }
    bf16* dq_tile = g.dq_lo + (b * p.seq_q + i0) * ldg + h * d;
    for (int64_t r = 0; r < rows; ++r) store_floats(ws.dq.data() + r * d, dq_tile + r * ldg, d);
  }
  float* dk_head = g.dk + b * p.seq_k * ldg + h * d;
  float* dv_head = g.dv + b * p.seq_k * ldg + h * d;
  // In blocks of 16 keys, so that each read of dK^T, dV^T is a whole cache line (key by key, every read
  // went to another row of them).
  for (int64_t j0 = 0; j0 < p.seq_k; j0 += 16)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = j0; j < std::min(j0 + 16, p.seq_k); ++j) {
        dk_head[j * ldg + c] = ws.dk_t[c * p.seq_k + j];
        dv_head[j * ldg + c] = ws.dv_t[c * p.seq_k + j];
      }
}

// The problem and, when the arguments ask for more than a bottom-right causal mask, its mask (kept
// alive by the caller). Absolute positions only matter through q_start - k_start, and k_start for the sinks.
AttentionProblem make_problem(const AttentionShape& s, bool causal, double scale, const AttentionMaskArgs& args,
                              AttentionMask& mask) {
  const int64_t q_start = args.q_start.value_or(s.seq_k - s.seq_q), k_start = args.k_start.value_or(0);
  const int64_t right = causal ? 0 : args.window_right;  // flash-attn: causal sets the right edge to 0
  const bool docs = checks::Call::present(args.doc_q), masked = attention_needs_mask(s, causal, args);
  // Under a window, 64-row query tiles: a tile's keys span window + 64, of which each row sees the window
  // (measured at 8k, window 1k: 64 rows as fast as 128 and faster than 32 or 256).
  const int64_t tile_q = args.window_left >= 0 ? 64 : s.seq_q >= 768 ? 256 : 64;
  AttentionProblem p{s.batch, s.seq_q, s.seq_k, s.heads, s.kv_heads, s.dim, causal, s.seq_k - s.seq_q,
                     static_cast<float>(scale), tile_q};
  if (!masked) return p;
  p.bounded = right >= 0;
  p.offset = q_start - k_start + right;
  mask.left = args.window_left;
  mask.shift = q_start - k_start;
  mask.sinks = args.window_left >= 0 ? args.sinks : 0;
  mask.k_start = k_start;
  if (docs) {
    mask.doc_q = args.doc_q->data_ptr<int32_t>();
    mask.doc_k = args.doc_k->data_ptr<int32_t>();
    mask.blocks = (s.seq_k + kDocBlock - 1) / kDocBlock;
    mask.block_min.assign(s.batch * mask.blocks, std::numeric_limits<int32_t>::max());
    mask.block_max.assign(s.batch * mask.blocks, std::numeric_limits<int32_t>::min());
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t j = 0; j < s.seq_k; ++j) {
        const int64_t at = b * mask.blocks + j / kDocBlock;
        const int32_t doc = mask.doc_k[b * s.seq_k + j];
        mask.block_min[at] = std::min(mask.block_min[at], doc);
        mask.block_max[at] = std::max(mask.block_max[at], doc);
      }
  }
  p.mask = &mask;
  return p;
}

// bfloat16 products for bfloat16 inputs with an even head dim where the CPU has them natively.
// LONGTRAIN_CPU_BF16_GEMM overrides: 0 off, 1 on, "portable" on through the portable loops (read per
// call, so tests run every path in one process).
bool use_bf16_gemm(const AttentionProblem& p, std::initializer_list<at::Tensor> inputs) {
  for (const auto& x : inputs)
    if (x.scalar_type() != at::kBFloat16) return false;
  if (p.dim % 2 != 0) return false;
  const char* env = std::getenv("LONGTRAIN_CPU_BF16_GEMM");
  const std::string mode = env ? env : "";
  bf16_portable_only() = mode == "portable";
  if (!mode.empty()) return mode != "0";
  return cpu_has_bf16_dot();
}

at::Tensor as_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }
at::Tensor as_bf16(const at::Tensor& x) { return x.to(at::kBFloat16).contiguous(); }
at::Tensor head_major(const at::Tensor& x) { return x.to(at::kBFloat16).transpose(1, 2).contiguous(); }

// (batch, seq, heads, dim) -> (batch, heads, dim, seq rounded up to even) in bfloat16, zero-padded: a
// transpose in blocks of 32 positions (torch's strided copy for it measured 4x slower).
at::Tensor dim_major(const at::Tensor& x_in) {
  const at::Tensor x = as_bf16(x_in);
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), dim = x.size(3), seq2 = (seq + 1) / 2 * 2;
  at::Tensor out = at::empty({batch, heads, dim, seq2}, x.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<bf16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
  parallel_tasks(batch * heads, [&](int64_t bh, int64_t) {
    const int64_t b = bh / heads, h = bh % heads;
    uint16_t* head = dst + bh * dim * seq2;
    for (int64_t s0 = 0; s0 < seq; s0 += 32)
      for (int64_t c = 0; c < dim; ++c)
        for (int64_t s = s0; s < std::min(s0 + 32, seq); ++s) head[c * seq2 + s] = src[((b * seq + s) * heads + h) * dim + c];
    if (seq2 > seq)
      for (int64_t c = 0; c < dim; ++c) head[c * seq2 + seq] = 0;
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale,
                                                     int64_t window_left, int64_t window_right, int64_t sinks,
                                                     const std::optional<at::Tensor>& doc_q,
                                                     const std::optional<at::Tensor>& doc_k,
                                                     std::optional<int64_t> q_start, std::optional<int64_t> k_start) {
  const checks::Call call("attention_fwd", q_in, "q", c10::DeviceType::CPU);
  const AttentionShape shape = check_attention_inputs(call, q_in, k_in, v_in);
  const AttentionMaskArgs args{window_left, window_right, sinks, doc_q, doc_k, q_start, k_start};
  check_attention_mask(call, shape, args);
  AttentionMask mask;
  const AttentionProblem p = make_problem(shape, causal, scale, args, mask);
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_q}, q_in.options().dtype(at::kFloat));
  const int64_t tiles = (p.seq_q + p.tile_q - 1) / p.tile_q, heads = p.batch * p.heads, tasks = heads * tiles;
  // Tasks run last query tiles first: under a causal mask they see the most keys.
  if (use_bf16_gemm(p, {q_in, k_in, v_in})) {
    at::Tensor q = head_major(q_in), k = as_bf16(k_in), v = as_bf16(v_in);
    at::Tensor out = at::empty(q_in.sizes(), q_in.options().dtype(at::kBFloat16));
    const std::vector<KvPacks> kv = pack_kv(p, k.data_ptr<bf16>(), v.data_ptr<bf16>(), true);
    std::vector<Bf16Workspace> ws(task_workers(tasks), Bf16Workspace(p.tile_q));
    parallel_tasks(tasks, [&](int64_t task, int64_t worker) {
      const int64_t bh = task % heads, b = bh / p.heads, h = bh % p.heads, tile = tiles - 1 - task / heads;
      forward_tile_bf16(p, q.data_ptr<bf16>(), kv[b * p.kv_heads + h / (p.heads / p.kv_heads)], out.data_ptr<bf16>(),
                        lse.data_ptr<float>(), b, h, tile * p.tile_q, ws[worker]);
    });
    return {out, lse};
  }
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  std::vector<AlignedFloats> scores(task_workers(tasks));
  for (auto& buffer : scores) buffer = aligned_floats(p.tile_q * kTileK);
  parallel_tasks(tasks, [&](int64_t task, int64_t worker) {
    const int64_t bh = task % heads, tile = tiles - 1 - task / heads;
    forward_tile(p, qp, kp, vp, op, lp, bh / p.heads, bh % p.heads, tile * p.tile_q, scores[worker].get());
  });
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q_in,
                                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const std::optional<at::Tensor>& dlse,
                                                                 bool causal, double scale, int64_t window_left,
                                                                 int64_t window_right, int64_t sinks,
                                                                 const std::optional<at::Tensor>& doc_q,
                                                                 const std::optional<at::Tensor>& doc_k,
                                                                 std::optional<int64_t> q_start,
                                                                 std::optional<int64_t> k_start) {
  const checks::Call call("attention_bwd", dout, "dout", c10::DeviceType::CPU);
  const AttentionShape shape = check_attention_inputs(call, q_in, k_in, v_in);
  check_attention_grads(call, shape, dout, out, lse, dlse);
  const AttentionMaskArgs args{window_left, window_right, sinks, doc_q, doc_k, q_start, k_start};
  check_attention_mask(call, shape, args);
  AttentionMask mask;
  const AttentionProblem p = make_problem(shape, causal, scale, args, mask);
  at::Tensor lse_f = as_float(lse), dlse_f;
  if (checks::Call::present(dlse)) dlse_f = as_float(*dlse);
  auto fopts = q_in.options().dtype(at::kFloat);
  const bool lo = use_bf16_gemm(p, {q_in, k_in, v_in});
  // The bfloat16 path writes every element of dq (bfloat16) and of each head's dk, dv: no zeroing.
  at::Tensor dq = lo ? at::empty(q_in.sizes(), q_in.options().dtype(at::kBFloat16)) : at::zeros(q_in.sizes(), fopts);
  at::Tensor dk = lo ? at::empty({p.batch, p.seq_k, p.heads, p.dim}, fopts)
                     : at::zeros({p.batch, p.seq_k, p.heads, p.dim}, fopts);
  at::Tensor dv = lo ? at::empty_like(dk) : at::zeros_like(dk);
  AttentionGrads g{lse_f.data_ptr<float>(), dlse_f.defined() ? dlse_f.data_ptr<float>() : nullptr,
                   lo ? nullptr : dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()};
  if (lo) {
    g.dq_lo = dq.data_ptr<bf16>();
    at::Tensor q = head_major(q_in), d_out = head_major(dout), o = head_major(out);
    at::Tensor q_t = dim_major(q_in), dout_t = dim_major(dout), k = as_bf16(k_in), v = as_bf16(v_in);
    const std::vector<KvPacks> kv = pack_kv(p, k.data_ptr<bf16>(), v.data_ptr<bf16>(), false);
    const Bf16Backward x{q.data_ptr<bf16>(), d_out.data_ptr<bf16>(), o.data_ptr<bf16>(), q_t.data_ptr<bf16>(),
                         dout_t.data_ptr<bf16>(), q_t.size(3)};
    std::vector<Bf16Workspace> ws(task_workers(p.batch * p.heads), Bf16Workspace(p.tile_q));
    parallel_tasks(p.batch * p.heads, [&](int64_t bh, int64_t worker) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      backward_head_bf16(p, x, kv[b * p.kv_heads + h / (p.heads / p.kv_heads)], g, b, h, ws[worker]);
    });
  } else {
    at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in), d_out = as_float(dout), o = as_float(out);
    std::vector<AlignedFloats> probs(task_workers(p.batch * p.heads)), dprobs(probs.size());
    for (size_t w = 0; w < probs.size(); ++w) {
      probs[w] = aligned_floats(p.tile_q * kTileK);
      dprobs[w] = aligned_floats(p.tile_q * kTileK);
    }
    parallel_tasks(p.batch * p.heads, [&](int64_t bh, int64_t worker) {
      backward_head(p, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), d_out.data_ptr<float>(),
                    o.data_ptr<float>(), g, bh / p.heads, bh % p.heads, probs[worker].get(), dprobs[worker].get());
    });
  }
  const int64_t group = p.heads / p.kv_heads;
  if (group > 1) {
    dk = dk.view({p.batch, p.seq_k, p.kv_heads, group, p.dim}).sum(3);
    dv = dv.view({p.batch, p.seq_k, p.kv_heads, group, p.dim}).sum(3);
  }
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(longtrain, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace longtrain
