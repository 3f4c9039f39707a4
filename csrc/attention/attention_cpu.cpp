// Flash-style attention on CPU, forward and backward (Dao 2023, "FlashAttention-2", Alg. 1 and 2).
//
// Work is split over (batch, head, query tile) in the forward and over (batch, head) in the
// backward, handed to workers one task at a time (cpu_parallel.h). Scores exist only one
// (query tile x key tile) block at a time, so memory grows linearly with the sequence: the
// forward keeps a running max and sum per row (online softmax, Milakov & Gimelshein 2018) and
// the backward recomputes probabilities from the saved log-sum-exp. The five tile products go
// to the BLAS sgemm that torch links (MKL on x86 wheels); if no sgemm symbol is present, at::mm
// on strided views does the same work more slowly.
// Inputs of any float dtype are computed in float32. Causal masks are bottom-right aligned as in
// flash-attn: query i sees key j when j <= i + seq_k - seq_q; a row that sees no key gets output 0
// and lse -inf. Grouped-query attention: query head h reads K/V head h / (heads / kv_heads).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/cpu_parallel.h"

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
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

struct AttentionProblem {
  int64_t batch, seq_q, seq_k, heads, kv_heads, dim;
  bool causal;
  float scale;
  int64_t tile_q;  // query rows per tile, <= kMaxTileQ
  int64_t q_stride() const { return heads * dim; }    // between rows of q, out, dout
  int64_t kv_stride() const { return kv_heads * dim; }  // between rows of k, v
  // Keys [0, end) that any query in [i0, i1) may see.
  int64_t key_end(int64_t i1) const { return causal ? std::clamp<int64_t>(i1 + seq_k - seq_q, 0, seq_k) : seq_k; }
  // Keys of row i inside the tile starting at key j0 of width width.
  int64_t visible(int64_t i, int64_t j0, int64_t width) const {
    return causal ? std::clamp<int64_t>(i + seq_k - seq_q - j0 + 1, 0, width) : width;
  }
};

constexpr int64_t kLanes = 16;

// Reductions keep kLanes partial results so that they vectorize without -ffast-math.
LT_INLINE float row_max_of(const float* __restrict s, int64_t n) {
  float lanes[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) lanes[i] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t i = 0; i < kLanes; ++i) lanes[i] = std::max(lanes[i], s[j + i]);
  float m = kNegInf;
  for (; j < n; ++j) m = std::max(m, s[j]);
  for (int64_t i = 0; i < kLanes; ++i) m = std::max(m, lanes[i]);
  return m;
}

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

void forward_tile(const AttentionProblem& p, const float* q, const float* k, const float* v, float* out, float* lse,
                  int64_t b, int64_t h, int64_t i0, std::vector<float>& scores) {
  const int64_t rows = std::min(p.tile_q, p.seq_q - i0), d = p.dim, ldq = p.q_stride(), ldk = p.kv_stride();
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const float* q_tile = q + (b * p.seq_q + i0) * ldq + h * d;
  float* o_tile = out + (b * p.seq_q + i0) * ldq + h * d;
  const float* k_head = k + b * p.seq_k * ldk + kvh * d;
  const float* v_head = v + b * p.seq_k * ldk + kvh * d;
  float row_max[kMaxTileQ], row_sum[kMaxTileQ];
  for (int64_t r = 0; r < rows; ++r) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
    std::fill(o_tile + r * ldq, o_tile + r * ldq + d, 0.0f);
  }
  const int64_t end = p.key_end(i0 + rows);
  for (int64_t j0 = 0; j0 < end; j0 += kTileK) {
    const int64_t width = std::min(kTileK, end - j0);
    gemm(false, true, rows, width, d, p.scale, q_tile, ldq, k_head + j0 * ldk, ldk, 0.0f, scores.data(), kTileK);
    for (int64_t r = 0; r < rows; ++r) {
      const float alpha =
          softmax_row_update(scores.data() + r * kTileK, p.visible(i0 + r, j0, width), width, row_max[r], row_sum[r]);
      if (alpha != 1.0f)
        for (int64_t c = 0; c < d; ++c) o_tile[r * ldq + c] *= alpha;
    }
    gemm(false, false, rows, d, width, 1.0f, scores.data(), kTileK, v_head + j0 * ldk, ldk, 1.0f, o_tile, ldq);
  }
  float* lse_row = lse + (b * p.heads + h) * p.seq_q + i0;
  for (int64_t r = 0; r < rows; ++r) {
    if (row_sum[r] == 0.0f) {
      lse_row[r] = kNegInf;
      continue;
    }
    const float inv = 1.0f / row_sum[r];
    for (int64_t c = 0; c < d; ++c) o_tile[r * ldq + c] *= inv;
    lse_row[r] = row_max[r] + std::log(row_sum[r]);
  }
}

// Probabilities of one score row from the saved lse; then, given dP in `dp`, dS = P * (dP - delta).
LT_VECTOR_CLONES
void probabilities_row(float* __restrict s, int64_t visible, int64_t width, float lse) {
  if (lse == kNegInf) visible = 0;
  for (int64_t j = 0; j < visible; ++j) s[j] = exp_approx(s[j] - lse);
  for (int64_t j = visible; j < width; ++j) s[j] = 0.0f;
}

LT_VECTOR_CLONES
void score_grad_row(const float* __restrict prob, float* __restrict dp, int64_t width, float delta) {
  for (int64_t j = 0; j < width; ++j) dp[j] = prob[j] * (dp[j] - delta);
}

struct AttentionGrads {
  const float *dout, *out, *lse, *dlse;
  float *dq, *dk, *dv;  // dk, dv per query head: (batch, seq_k, heads, dim)
};

void backward_head(const AttentionProblem& p, const float* q, const float* k, const float* v, const AttentionGrads& g,
                   int64_t b, int64_t h, std::vector<float>& probs, std::vector<float>& dprobs) {
  const int64_t d = p.dim, ldq = p.q_stride(), ldk = p.kv_stride();
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const float* k_head = k + b * p.seq_k * ldk + kvh * d;
  const float* v_head = v + b * p.seq_k * ldk + kvh * d;
  float* dk_head = g.dk + b * p.seq_k * ldq + h * d;
  float* dv_head = g.dv + b * p.seq_k * ldq + h * d;
  const float* lse = g.lse + (b * p.heads + h) * p.seq_q;
  float delta[kMaxTileQ];
  for (int64_t i0 = 0; i0 < p.seq_q; i0 += p.tile_q) {
    const int64_t rows = std::min(p.tile_q, p.seq_q - i0), offset = (b * p.seq_q + i0) * ldq + h * d;
    const float *q_tile = q + offset, *do_tile = g.dout + offset, *o_tile = g.out + offset;
    float* dq_tile = g.dq + offset;
    for (int64_t r = 0; r < rows; ++r) {
      float dot = 0.0f;
      for (int64_t c = 0; c < d; ++c) dot += do_tile[r * ldq + c] * o_tile[r * ldq + c];
      // d lse / d score = P, so an incoming lse gradient shifts the row's delta.
      delta[r] = dot - (g.dlse ? g.dlse[(b * p.heads + h) * p.seq_q + i0 + r] : 0.0f);
    }
    const int64_t end = p.key_end(i0 + rows);
    for (int64_t j0 = 0; j0 < end; j0 += kTileK) {
      const int64_t width = std::min(kTileK, end - j0);
      gemm(false, true, rows, width, d, p.scale, q_tile, ldq, k_head + j0 * ldk, ldk, 0.0f, probs.data(), kTileK);
      for (int64_t r = 0; r < rows; ++r)
        probabilities_row(probs.data() + r * kTileK, p.visible(i0 + r, j0, width), width, lse[i0 + r]);
      gemm(true, false, width, d, rows, 1.0f, probs.data(), kTileK, do_tile, ldq, 1.0f, dv_head + j0 * ldq, ldq);
      gemm(false, true, rows, width, d, 1.0f, do_tile, ldq, v_head + j0 * ldk, ldk, 0.0f, dprobs.data(), kTileK);
      for (int64_t r = 0; r < rows; ++r)
        score_grad_row(probs.data() + r * kTileK, dprobs.data() + r * kTileK, width, delta[r]);
      gemm(false, false, rows, d, width, p.scale, dprobs.data(), kTileK, k_head + j0 * ldk, ldk, 1.0f, dq_tile, ldq);
      gemm(true, false, width, d, rows, p.scale, dprobs.data(), kTileK, q_tile, ldq, 1.0f, dk_head + j0 * ldq, ldq);
    }
  }
}

AttentionProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(),
              "attention: q must be (batch, seq_q, heads, dim), k and v (batch, seq_k, kv_heads, dim)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), "attention: q and k differ in batch or head dim");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "attention: heads must be a multiple of kv_heads");
  const int64_t tile_q = q.size(1) >= 768 ? 256 : 64;
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal, static_cast<float>(scale), tile_q};
}

at::Tensor as_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale) {
  const AttentionProblem p = make_problem(q_in, k_in, v_in, causal, scale);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_q}, q.options());
  const int64_t tiles = (p.seq_q + p.tile_q - 1) / p.tile_q;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t heads = p.batch * p.heads, tasks = heads * tiles;
  std::vector<std::vector<float>> scores(task_workers(tasks), std::vector<float>(p.tile_q * kTileK));
  // Last query tiles first: under a causal mask they see the most keys.
  parallel_tasks(tasks, [&](int64_t task, int64_t worker) {
    const int64_t bh = task % heads, tile = tiles - 1 - task / heads;
    forward_tile(p, qp, kp, vp, op, lp, bh / p.heads, bh % p.heads, tile * p.tile_q, scores[worker]);
  });
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q_in,
                                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const std::optional<at::Tensor>& dlse,
                                                                 bool causal, double scale) {
  const AttentionProblem p = make_problem(q_in, k_in, v_in, causal, scale);
  at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  at::Tensor dout_f = as_float(dout), out_f = as_float(out), lse_f = as_float(lse), dlse_f;
  if (dlse && dlse->defined()) dlse_f = as_float(*dlse);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros({p.batch, p.seq_k, p.heads, p.dim}, q.options()), dv = at::zeros_like(dk);
  AttentionGrads g{dout_f.data_ptr<float>(), out_f.data_ptr<float>(), lse_f.data_ptr<float>(),
                   dlse_f.defined() ? dlse_f.data_ptr<float>() : nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                   dv.data_ptr<float>()};
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  parallel_tasks(p.batch * p.heads, [&](int64_t bh, int64_t) {
    std::vector<float> probs(p.tile_q * kTileK), dprobs(p.tile_q * kTileK);
    backward_head(p, qp, kp, vp, g, bh / p.heads, bh % p.heads, probs, dprobs);
  });
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
