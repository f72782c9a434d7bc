// Native CPU kernels for the small-batch (decode) path of llmaas's llama model.
//
// Owns: weight-only matmuls that read GGUF-style blocks directly (Q4: 32 nibbles + scale and min; Q8: 32 int8 +
// scale), unmerged LoRA deltas, the per-token element-wise work around them (RMSNorm, interleaved RoPE, SiLU*mul),
// grouped-query attention for a few query rows with optional attention statistics, and the decode of stored KV
// chunks (llmaas.kv.codec's INT8/INT4/INT2/FP16 layouts) into the engine's fp16 KV tensors, and the scatter and
// checksum verification of a chunk read.
// Ignores: anything about where KV lives or which rows are active. Callers pass views (row/column ranges, strides);
// every function writes into caller-owned tensors (only small scratch vectors are allocated inside).
// Numerics: weights are used exactly as stored in the GGUF; matmul activations are rounded to 16 bits per 32-value
// block (see QuantizedRows); everything else (norms, RoPE, softmax, attention, accumulation) is fp32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// XXH3-64, the chunk log's section checksum (llmaas.storage.chunk_record), inlined from the vendored header.
#define XXH_INLINE_ALL
#include "third_party/xxhash.h"

namespace {

constexpr int64_t kBlock = 32;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "llmaas kernel: ", what); }

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 0x55));
  return _mm_cvtss_f32(lo);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Block scales are fp16 where the GGUF stores them so (Q4_0, Q4_1, Q8_0) and fp32 where they are products (Q4_K).
inline float load_scale(const at::Half* p) { return half_to_float(*reinterpret_cast<const uint16_t*>(p)); }
inline float load_scale(const float* p) { return *p; }

// exp for x <= 0 (softmax after max subtraction), Cephes-style: 2^n * p(r), relative error ~1e-7.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  x = _mm256_max_ps(x, lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 c1 = _mm256_set1_ps(0.693359375f);
  const __m256 c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, c1));
  r = _mm256_sub_ps(r, _mm256_mul_ps(fx, c2));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// Grain sizes: small enough that two threads split a 576-row matrix, large enough to amortise the fork.
constexpr int64_t kRowGrain = 32;

// Software prefetch of the weight rows a decode matmul reads next. A whole-width matrix is one sequential stream that
// the hardware prefetcher follows, but a sub-model reads only a prefix (or a few ranges) of every row, and those
// strided runs were latency-bound: the down projection at level 0.5 (576 of 1536 columns) took 52 us against the
// whole matrix's 35 (Zen 4, in the decode loop). Rows this far ahead are requested while the current one computes.
int64_t g_prefetch_bytes = 2048;  // how far ahead, in bytes of weights; 0: none (set_prefetch_bytes, for measuring)
int64_t set_prefetch_bytes(int64_t bytes) {  // returns the previous distance
  const int64_t previous = g_prefetch_bytes;
  g_prefetch_bytes = bytes;
  return previous;
}
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}
// The same into L2 only: for data read soon but not next (a whole adapter site, tens of KB, would flush L1).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
}

// What every block matmul needs of its activations x [M, *] and outputs y [M, *].
void check_operands(const at::Tensor& y, const at::Tensor& x) {
  check(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x and y must be [M, *] with the same M");
  check(x.size(0) <= 64, "block matmuls take at most 64 activation rows; use the dense path for more");
  check(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "x and y must be float32");
  check(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
}

void check_ranges(const at::Tensor& y, const at::Tensor& x, int64_t n_rows, int64_t n_cols, int64_t r0, int64_t r1,
                  int64_t c0, int64_t c1) {
  check(0 <= r0 && r0 <= r1 && r1 <= n_rows, "row range out of bounds");
  check(0 <= c0 && c0 < c1 && c1 <= n_cols, "column range out of bounds or empty");
  check(c0 % kBlock == 0, "column range must start on a 32-column block");
  check_operands(y, x);
  check(x.size(1) == c1 - c0 && y.size(1) == r1 - r0, "x/y widths must match the column/row ranges");
}

// Activations of one matmul call, rounded per 32-value block to int16 fixed point: x ~= scale[b] * q[j].
// Relative error <= 2^-16 of the block's largest |x|; products with 4- or 8-bit weights then sum exactly in int32
// (_mm256_madd_epi16), about twice as fast on AVX2 as converting every weight to float.
struct QuantizedRows {
  std::vector<int16_t> q;    // [M, nb * 32], zero past the last column, so a partial last block adds nothing extra
  std::vector<float> scale;  // [M, nb]
  std::vector<float> sum;    // [M, nb]: exact fp32 sum of each block (for the Q4 min term)
  int64_t m, nb;
};

QuantizedRows quantize_rows(const float* x, int64_t x_stride, int64_t M, int64_t cols) {
  QuantizedRows out;
  out.m = M;
  out.nb = (cols + kBlock - 1) / kBlock;
  out.q.assign(M * out.nb * kBlock, 0);
  out.scale.assign(M * out.nb, 0.0f);
  out.sum.assign(M * out.nb, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * x_stride;
    for (int64_t b = 0; b < out.nb; ++b) {
      const int64_t c0 = b * kBlock, n = std::min(kBlock, cols - c0);
      float amax = 0.0f, sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) { amax = std::max(amax, std::fabs(xr[c0 + j])); sum += xr[c0 + j]; }
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int16_t* q = out.q.data() + (m * out.nb + b) * kBlock;
      for (int64_t j = 0; j < n; ++j) q[j] = static_cast<int16_t>(std::lrintf(xr[c0 + j] * inv));
      out.scale[m * out.nb + b] = amax / 32767.0f;
      out.sum[m * out.nb + b] = sum;
    }
  }
  return out;
}

// int32 dot products (8 lanes to be summed) of one 32-weight block with 32 int16 activations.
inline __m256i dot_block(const uint8_t* q4, const int16_t* x) {  // Q4: 16 bytes, element j low / j + 16 high
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q4));
  const __m256i w_lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low_mask));
  const __m256i w_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low_mask));
  return _mm256_add_epi32(_mm256_madd_epi16(w_lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                          _mm256_madd_epi16(w_hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
}
inline __m256i dot_block(const int8_t* q8, const int16_t* x) {  // Q8: 32 signed bytes
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
  const __m256i w_lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
  const __m256i w_hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
  return _mm256_add_epi32(_mm256_madd_epi16(w_lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                          _mm256_madd_epi16(w_hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
}
constexpr int64_t block_bytes(const uint8_t*) { return 16; }
constexpr int64_t block_bytes(const int8_t*) { return 32; }

// [sum(p0), ..., sum(p7)]: the lane sums of eight int32 vectors, in one vector.
inline __m256i lane_sums(const __m256i* p) {
  const __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}
// Eight consecutive values as fp32, from fp32 or fp16 storage.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One output: sum over blocks b of scale[b] * xscale[b] * <q_b, xq_b> (+ min[b] * xsum[b] for Q4, mins != null).
// Eight blocks at a time, so the per-block scaling is one vector multiply per eight blocks instead of scalar work
// in every block (measured 18% faster than per-block scaling on Zen 3).
template <typename W, typename S>
float row_dot(const W* q, const S* scales, const S* mins, const int16_t* x, const float* xscale, const float* xsum,
              int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256i p[8];
    for (int j = 0; j < 8; ++j) p[j] = dot_block(q + (b + j) * block_bytes(q), x + (b + j) * kBlock);
    const __m256 sums = _mm256_cvtepi32_ps(lane_sums(p));
    acc = _mm256_fmadd_ps(sums, _mm256_mul_ps(load8(scales + b), _mm256_loadu_ps(xscale + b)), acc);
    if (mins != nullptr) acc = _mm256_fmadd_ps(load8(mins + b), _mm256_loadu_ps(xsum + b), acc);
  }
  // The last nb % 8 blocks (all of them for a sub-model's few-head column ranges) scale lane-wise into the same
  // accumulator, so the row still ends in one horizontal sum.
  float mins_total = 0.0f;
  for (; b < nb; ++b) {
    const __m256 dot = _mm256_cvtepi32_ps(dot_block(q + b * block_bytes(q), x + b * kBlock));
    acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(load_scale(scales + b) * xscale[b]), acc);
    if (mins != nullptr) mins_total += load_scale(mins + b) * xsum[b];
  }
  return hsum(acc) + mins_total;
}

struct MatmulArgs {
  float* y;
  int64_t y_stride, r0, b0, nb, K;
  bool accumulate;
};

// y[m, r - r0] (+)= row r of W (blocks b0 .. b0 + nb) . x[m] for weight rows [r0, r1) split over threads; the
// activation rows loop inside, so a weight row is read from memory once and reused from L1.
template <typename W, typename S>
void matmul_rows(const MatmulArgs& a, const QuantizedRows& xq, const W* qs, const S* scales, const S* mins,
                 int64_t r0, int64_t r1) {
  const int64_t row_bytes = a.K / kBlock * block_bytes(qs), KB = a.K / kBlock;
  const int64_t span = a.nb * block_bytes(qs), ahead = g_prefetch_bytes > 0 ? std::max<int64_t>(1, g_prefetch_bytes / span) : 1 << 30;
  at::parallel_for(r0, r1, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const W* q = qs + r * row_bytes + a.b0 * block_bytes(qs);
      const S* sc = scales + r * KB + a.b0;
      const S* mn = mins != nullptr ? mins + r * KB + a.b0 : nullptr;
      if (r + ahead < end) {
        prefetch(q + ahead * row_bytes, span);
        prefetch(sc + ahead * KB, a.nb * sizeof(S));
        if (mn != nullptr) prefetch(mn + ahead * KB, a.nb * sizeof(S));
      }
      for (int64_t m = 0; m < xq.m; ++m) {
        const int64_t xb = m * xq.nb;
        const float total = row_dot(q, sc, mn, xq.q.data() + xb * kBlock, xq.scale.data() + xb, xq.sum.data() + xb,
                                    a.nb);
        float* out = a.y + m * a.y_stride + (r - a.r0);
        *out = a.accumulate ? *out + total : total;
      }
    }
  });
}

// Several row ranges and column ranges of one weight matrix in one call: y[m, r] (+)= sum over the column ranges of
// x[m, c] * W[r, c], for every r in the row ranges. y [M, N] and x [M, K] are the full-width buffers, indexed by
// absolute row and column. A sub-model's active units are several ranges (each KV group's kept query heads; the
// kept gate and up neurons): one call per range cost more than the arithmetic it skipped at decode.
struct RangeArgs {
  std::vector<int64_t> rows;                 // flat (start, end) output row ranges
  std::vector<int64_t> row_offsets;          // index of each row range's first row among all rows, then the total
  std::vector<QuantizedRows> xq;             // one per column range
  std::vector<int64_t> b0;                   // first weight block of each column range
  float* y;
  int64_t y_stride, K;
  bool accumulate;
};

// Checked flat (start, end) ranges within [0, limit), sorted and disjoint; returns their total length.
int64_t ranges_length(const std::vector<int64_t>& r, int64_t limit, const char* what) {
  check(r.size() % 2 == 0, "ranges are flat (start, end) pairs");
  int64_t total = 0;
  for (size_t i = 0; i < r.size(); i += 2) {
    check(0 <= r[i] && r[i] <= r[i + 1] && r[i + 1] <= limit && (i == 0 || r[i] >= r[i - 1]), what);
    total += r[i + 1] - r[i];
  }
  return total;
}

// The range arguments over raw buffers; the ranges are checked by the caller (the *_ranges calls, or a decode
// plan once when it is built).
RangeArgs make_ranges(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t M, int64_t K,
                      const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, bool accumulate) {
  RangeArgs a{rows, {0}, {}, {}, y, ldy, K, accumulate};
  for (size_t i = 0; i < a.rows.size(); i += 2) a.row_offsets.push_back(a.row_offsets.back() + a.rows[i + 1] - a.rows[i]);
  for (size_t i = 0; i < cols.size(); i += 2) {
    a.xq.push_back(quantize_rows(x + cols[i], ldx, M, cols[i + 1] - cols[i]));
    a.b0.push_back(cols[i] / kBlock);
  }
  return a;
}

void check_range_lists(int64_t N, int64_t K, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols) {
  check(rows.size() % 2 == 0 && cols.size() % 2 == 0 && !cols.empty(), "ranges are flat (start, end) pairs");
  ranges_length(rows, N, "row ranges out of bounds, unsorted or overlapping");
  for (size_t i = 0; i < cols.size(); i += 2) {
    check(0 <= cols[i] && cols[i] < cols[i + 1] && cols[i + 1] <= K, "column range out of bounds or empty");
    check(cols[i] % kBlock == 0, "column ranges must start on a 32-column block");
    // a range ending inside a block reads that whole weight block (its activations are zero past the end), so the
    // next range must start on a later block
    check(i == 0 || cols[i] >= (cols[i - 1] + kBlock - 1) / kBlock * kBlock, "column ranges must not share a block");
  }
}

template <typename W, typename S>
void matmul_ranges(const RangeArgs& a, const W* qs, const S* scales, const S* mins) {
  const int64_t row_bytes = a.K / kBlock * block_bytes(qs), KB = a.K / kBlock;
  const int64_t M = a.xq.front().m;
  at::parallel_for(0, a.row_offsets.back(), kRowGrain, [&](int64_t begin, int64_t end) {
    // the range holding row index `begin`, then rows in order (no per-row table: it cost as much as a small call)
    size_t k = std::upper_bound(a.row_offsets.begin(), a.row_offsets.end(), begin) - a.row_offsets.begin() - 1;
    int64_t r = a.rows[2 * k] + (begin - a.row_offsets[k]);
    for (int64_t i = begin; i < end; ++i, ++r) {
      while (r == a.rows[2 * k + 1]) r = a.rows[2 * ++k];  // past this range's end (or an empty one)
      for (int64_t m = 0; m < M; ++m) {
        float total = 0.0f;
        for (size_t c = 0; c < a.xq.size(); ++c) {
          const QuantizedRows& xq = a.xq[c];
          const int64_t xb = m * xq.nb, b0 = a.b0[c];
          total += row_dot(qs + r * row_bytes + b0 * block_bytes(qs), scales + r * KB + b0,
                           mins != nullptr ? mins + r * KB + b0 : nullptr, xq.q.data() + xb * kBlock,
                           xq.scale.data() + xb, xq.sum.data() + xb, xq.nb);
        }
        float* out = a.y + m * a.y_stride + r;
        *out = a.accumulate ? *out + total : total;
      }
    }
  });
}

// Expansion of blocks to fp32, for the GEMM path (prefill): w = scale * q (+ min),
// multiplied and added as two roundings, exactly as weights.py's dequantize() does, so the values are the same bits.
// The multiply and the add are kept apart on purpose: fused into one FMA they would round once and differ.
inline __m256 mul_add_unfused(__m256 q, __m256 s, __m256 m) {
  __m256 p = _mm256_mul_ps(q, s);
  __asm__("" : "+x"(p));  // an opaque step between the two, so the compiler cannot contract them into an FMA
  return _mm256_add_ps(p, m);
}

inline void expand_block(float* out, const uint8_t* q4, float scale, float min) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q4));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, low_mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
  const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
    _mm256_storeu_ps(out + 8 * i, mul_add_unfused(q, s, m));
  }
}

inline void expand_block(float* out, const int8_t* q8, float scale, float) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int i = 0; i < 4; ++i) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q8 + 8 * i));
    _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s));
  }
}

// out[i, :] = W[r0 + i, c0:c1] for i in [0, n), or, with `col_ids`, out[i, j] = W[r0 + i, col_ids[j]] for j in
// [0, n_ids): a column order that splits blocks (reordered FFN neurons) read from the blocks in their stored order,
// each row expanded whole into a small buffer and then gathered.
// Rows [begin, end) of an expansion, on the calling thread (`whole`: a K-value buffer when col_ids is set).
template <typename W, typename S>
void expand_rows_serial(float* out, int64_t out_stride, int64_t r0, int64_t n, const W* qs, const S* scales,
                        const S* mins, int64_t K, int64_t c0, int64_t c1, const int64_t* col_ids, int64_t n_ids) {
  const int64_t row_bytes = K / kBlock * block_bytes(qs), KB = K / kBlock;
  const int64_t b0 = col_ids != nullptr ? 0 : c0 / kBlock, b1 = col_ids != nullptr ? KB : c1 / kBlock;
  std::vector<float> whole(col_ids != nullptr ? K : 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i;
    float* o = col_ids != nullptr ? whole.data() : out + i * out_stride;
    for (int64_t b = b0; b < b1; ++b) {
      expand_block(o + (b - b0) * kBlock, qs + r * row_bytes + b * block_bytes(qs), load_scale(scales + r * KB + b),
                   mins != nullptr ? load_scale(mins + r * KB + b) : 0.0f);
    }
    if (col_ids != nullptr) {
      float* dst = out + i * out_stride;
      for (int64_t j = 0; j < n_ids; ++j) dst[j] = o[col_ids[j]];
    }
  }
}

// out[i, :] = W[r0 + i, c0:c1] for i in [0, n), or, with `col_ids`, out[i, j] = W[r0 + i, col_ids[j]] for j in
// [0, n_ids): a column order that splits blocks (reordered FFN neurons) read from the blocks in their stored order,
// each row expanded whole into a small buffer and then gathered. Rows in parallel.
template <typename W, typename S>
void expand_rows(float* out, int64_t out_stride, int64_t r0, int64_t n, const W* qs, const S* scales, const S* mins,
                 int64_t K, int64_t c0, int64_t c1, const int64_t* col_ids, int64_t n_ids) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    expand_rows_serial(out + begin * out_stride, out_stride, r0 + begin, end - begin, qs, scales, mins, K, c0, c1,
                       col_ids, n_ids);
  });
}

// ---- bf16 GEMM for the prefill path, on CPUs with AVX-512 BF16 (chosen at run time: the rest of this file is AVX2) ----
// y[M, rows] (+)= x[M, K] @ W[rows, K]^T with bf16 inputs and fp32 products and sums (vdpbf16ps): activations and
// weights are rounded to bf16 (8-bit mantissa), outputs stay fp32. Each output row is computed the same way whatever
// M is and however many threads run (K is summed in one fixed order per output), so chunked prefill equals one-shot
// and recompute equals the original within this path. Weights are expanded from their blocks a panel of kPanel rows at
// a time into a thread-local VNNI buffer [K/2][kPanel][2] that stays in L1/L2.
constexpr int64_t kPanel = 32;
constexpr int kMR = 8;

#define LLMAAS_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int MR>
LLMAAS_BF16 void bf16_tile(const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t kp, float* y, int64_t ldy,
                           int64_t nn, bool accumulate) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + k * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + k * 2 * kPanel + 32);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * k, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = nn >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nn) - 1);
  const __mmask16 m1 = nn >= 32 ? 0xFFFF : nn <= 16 ? 0 : static_cast<__mmask16>((1u << (nn - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    float* out = y + r * ldy;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, out));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, out + 16));
    }
    _mm512_mask_storeu_ps(out, m0, v0);
    _mm512_mask_storeu_ps(out + 16, m1, v1);
  }
}

// One row of x, fp32 [cols] -> bf16 [kpad], the columns placed from `shift` on, zeros elsewhere.
LLMAAS_BF16 void to_bf16_row(const float* xr, int64_t cols, int64_t shift, int64_t kpad, uint16_t* o) {
  std::memset(o, 0, kpad * sizeof(uint16_t));
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + shift + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + j)));
  }
  if (j < cols) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (cols - j)) - 1);
    _mm256_mask_storeu_epi16(o + shift + j, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, xr + j)));
  }
}

// x [M, cols] fp32 (row stride ldx) -> bf16 [M, kpad] (see to_bf16_row); rows in parallel. (Lambdas do not inherit
// a function's target attribute, so the AVX-512 work sits in the named functions they call.)
void to_bf16_rows(const float* x, int64_t ldx, int64_t M, int64_t cols, int64_t shift, int64_t kpad, uint16_t* out) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) to_bf16_row(x + m * ldx, cols, shift, kpad, out + m * kpad);
  });
}

// fp32 rows [nn][kpad] -> bf16 VNNI panel [kpad/2][kPanel][2] (rows past nn zero).
LLMAAS_BF16 void pack_panel(const float* w, int64_t nn, int64_t kpad, uint16_t* panel) {
  for (int64_t k = 0; k < kpad; k += 2) {
    uint16_t* dst = panel + k * kPanel;
    for (int64_t n = 0; n < kPanel; ++n) {
      if (n < nn) {
        const __m128bh pair = _mm_cvtneps_pbh(_mm_setr_ps(w[n * kpad + k], w[n * kpad + k + 1], 0.0f, 0.0f));
        std::memcpy(dst + 2 * n, &pair, 4);
      } else {
        dst[2 * n] = dst[2 * n + 1] = 0;
      }
    }
  }
}

template <typename Expand>
void gemm_bf16(float* y, int64_t ldy, const uint16_t* xb, int64_t M, int64_t kpad, int64_t n_rows,
                           Expand expand, bool accumulate) {
  const int64_t panels = (n_rows + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kPanel * kpad);
    std::vector<uint16_t> panel(kPanel * kpad);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, nn = std::min(kPanel, n_rows - n0);
      expand(rows.data(), n0, nn);
      pack_panel(rows.data(), nn, kpad, panel.data());
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR) {
        bf16_tile<kMR>(xb + m * kpad, kpad, panel.data(), kpad / 2, y + m * ldy + n0, ldy, nn, accumulate);
      }
      for (; m < M; ++m) bf16_tile<1>(xb + m * kpad, kpad, panel.data(), kpad / 2, y + m * ldy + n0, ldy, nn, accumulate);
    }
  });
}

void check_columns(int64_t K, int64_t c0, int64_t c1) {
  check(0 <= c0 && c0 < c1 && c1 <= K && c0 % kBlock == 0 && c1 % kBlock == 0,
        "columns must be a non-empty range of whole 32-column blocks");
}

// One block-stored weight matrix (model/linear.py: Linear.blocks): Q4 (uint8 codes, scales and mins fp16 or fp32) or
// Q8 (int8 codes, fp16 scales).
struct BlockMat {
  at::Tensor qs, d, mn;
  int64_t N = 0, K = 0;
};

BlockMat block_mat(const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& mn) {
  check(qs.dim() == 2 && qs.is_contiguous() && d.is_contiguous(), "weight blocks must be contiguous [N, *]");
  const bool q4 = qs.scalar_type() == at::kByte;
  if (q4) {
    check(mn.has_value() && mn->scalar_type() == d.scalar_type() && mn->is_contiguous(),
          "Q4 blocks need contiguous mins of the scales' dtype");
    check(d.scalar_type() == at::kHalf || d.scalar_type() == at::kFloat, "Q4 scales must be float16 or float32");
  } else {
    check(qs.scalar_type() == at::kChar && d.scalar_type() == at::kHalf, "Q8 blocks: int8 codes and float16 scales");
  }
  const int64_t K = q4 ? qs.size(1) * 2 : qs.size(1);
  check(d.dim() == 2 && d.size(0) == qs.size(0) && d.size(1) * kBlock == K, "one scale per 32-weight block");
  return BlockMat{qs, d, q4 ? *mn : at::Tensor(), qs.size(0), K};
}

template <typename F>
void with_blocks(const BlockMat& w, F&& f) {
  if (w.qs.scalar_type() == at::kChar) {
    f(w.qs.data_ptr<int8_t>(), w.d.data_ptr<at::Half>(), static_cast<const at::Half*>(nullptr));
  } else if (w.d.scalar_type() == at::kHalf) {
    f(w.qs.data_ptr<uint8_t>(), w.d.data_ptr<at::Half>(), w.mn.data_ptr<at::Half>());
  } else {
    f(w.qs.data_ptr<uint8_t>(), w.d.data_ptr<float>(), w.mn.data_ptr<float>());
  }
}

// y[m, r - r0] (+)= W[r, c0:c1] . x[m, :c1-c0] for r in [r0, r1), over raw buffers checked by the caller.
void mat_rows(const BlockMat& w, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t M, int64_t r0,
              int64_t r1, int64_t c0, int64_t c1, bool accumulate) {
  const MatmulArgs a{y, ldy, r0, c0 / kBlock, (c1 - c0 + kBlock - 1) / kBlock, w.K, accumulate};
  const QuantizedRows xq = quantize_rows(x, ldx, M, c1 - c0);
  with_blocks(w, [&](auto* q, auto* sc, auto* mn) { matmul_rows(a, xq, q, sc, mn, r0, r1); });
}

// The row and column ranges of W (see RangeArgs) over raw full-width buffers checked by the caller.
void mat_ranges(const BlockMat& w, float* y, int64_t ldy, const float* x, int64_t ldx, int64_t M,
                const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, bool accumulate) {
  const RangeArgs a = make_ranges(y, ldy, x, ldx, M, w.K, rows, cols, accumulate);
  with_blocks(w, [&](auto* q, auto* sc, auto* mn) { matmul_ranges(a, q, sc, mn); });
}

}  // namespace

// y[M, r1-r0] (+)= x[M, c1-c0] @ W[r0:r1, c0:c1]^T, W stored as Q4 blocks: w = d * q + m, q in 0..15.
// qs: [N, K/2] uint8 (GGUF nibble order: byte j holds element j low, element j+16 high); d/mn: [N, K/32] fp16 or
// fp32 (one dtype).
void q4_matmul(at::Tensor y, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& mn,
               int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool accumulate) {
  check(qs.scalar_type() == at::kByte, "Q4 codes must be uint8");
  const BlockMat w = block_mat(qs, d, mn);
  check_ranges(y, x, w.N, w.K, r0, r1, c0, c1);
  mat_rows(w, y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0), x.size(0), r0, r1, c0, c1,
           accumulate);
}

// y[M, r1-r0] (+)= x[M, c1-c0] @ W[r0:r1, c0:c1]^T, W stored as Q8 blocks: w = d * q, q int8.
// qs: [N, K] int8, d: [N, K/32] fp16.
void q8_matmul(at::Tensor y, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t r0, int64_t r1,
               int64_t c0, int64_t c1, bool accumulate) {
  check(qs.scalar_type() == at::kChar, "Q8 codes must be int8");
  const BlockMat w = block_mat(qs, d, c10::nullopt);
  check_ranges(y, x, w.N, w.K, r0, r1, c0, c1);
  mat_rows(w, y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0), x.size(0), r0, r1, c0, c1,
           accumulate);
}

namespace {

void checked_ranges(const BlockMat& w, at::Tensor& y, const at::Tensor& x, const std::vector<int64_t>& rows,
                    const std::vector<int64_t>& cols, bool accumulate) {
  check_operands(y, x);
  check(y.size(1) == w.N && x.size(1) == w.K, "x and y must be the full-width [M, K] and [M, N] buffers");
  check_range_lists(w.N, w.K, rows, cols);
  mat_ranges(w, y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0), x.size(0), rows, cols,
             accumulate);
}

}  // namespace

void q4_matmul_ranges(at::Tensor y, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                      const at::Tensor& mn, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                      bool accumulate) {
  check(qs.scalar_type() == at::kByte, "Q4 codes must be uint8");
  checked_ranges(block_mat(qs, d, mn), y, x, rows, cols, accumulate);
}

void q8_matmul_ranges(at::Tensor y, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                      const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, bool accumulate) {
  check(qs.scalar_type() == at::kChar, "Q8 codes must be int8");
  checked_ranges(block_mat(qs, d, c10::nullopt), y, x, rows, cols, accumulate);
}

namespace {

// <a, b> for n values, a stored as fp32 or fp16 (an adapter's weights), b fp32.
template <typename T>
inline float dot(const T* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(load8(a + j), _mm256_loadu_ps(b + j), acc);
  float total = hsum(acc);
  for (; j < n; ++j) total += static_cast<float>(a[j]) * b[j];
  return total;
}

inline __m256 lane_sums(const __m256* p) {  // [sum(p0), ..., sum(p7)] in one vector
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// The dot products of u (R floats, R a multiple of 8) with eight consecutive rows of b (R values each), as one
// vector: one horizontal-add tree for the eight instead of a horizontal sum each (a LoRA B row is one vector at
// rank 8, so the per-row sums were most of the adapters' decode time).
template <typename T>
inline __m256 dots8(const T* b, const float* u, int64_t R) {
  __m256 p[8];
  for (int i = 0; i < 8; ++i) {
    __m256 acc = _mm256_mul_ps(load8(b + i * R), _mm256_loadu_ps(u));
    for (int64_t k = 8; k < R; k += 8) acc = _mm256_fmadd_ps(load8(b + i * R + k), _mm256_loadu_ps(u + k), acc);
    p[i] = acc;
  }
  return lane_sums(p);
}

// u[r] = scale * <a_r, x> for the R rows of a [R, n]: eight rows at a time, each on its own accumulator, so the eight
// FMA chains overlap (an adapter's A row is a long dot product; one chain at a time was latency-bound).
template <typename T>
void a_products(const T* a, const float* x, int64_t R, int64_t n, float scale, float* u) {
  int64_t r = 0;
  for (; r + 8 <= R; r += 8) {
    __m256 p[8];
    for (int i = 0; i < 8; ++i) p[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < 8; ++i) p[i] = _mm256_fmadd_ps(load8(a + (r + i) * n + k), xv, p[i]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, lane_sums(p));
    for (int i = 0; i < 8; ++i) {
      for (int64_t j = k; j < n; ++j) sums[i] += static_cast<float>(a[(r + i) * n + j]) * x[j];
      u[r + i] = scale * sums[i];
    }
  }
  for (; r < R; ++r) u[r] = scale * dot(a + r * n, x, n);
}

// Adapters that read one input at one point of a layer, checked once (lora_add: per call; a decode plan: when built).
struct LoraSet {
  std::vector<at::Tensor> a, b;
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> cols;
  int64_t n_cols = 0;
};

LoraSet make_lora_set(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                      const std::vector<std::vector<int64_t>>& rows, const std::vector<int64_t>& cols,
                      int64_t in_width, int64_t out_width) {
  check(a.size() == b.size() && a.size() == rows.size(), "one A, one B and one row-range list per adapter");
  LoraSet s{a, b, rows, cols, ranges_length(cols, in_width, "column ranges out of bounds, unsorted or overlapping")};
  for (size_t i = 0; i < a.size(); ++i) {
    const int64_t n_rows = ranges_length(rows[i], out_width, "row ranges out of bounds, unsorted or overlapping");
    check((a[i].scalar_type() == at::kFloat || a[i].scalar_type() == at::kHalf) &&
              a[i].scalar_type() == a.front().scalar_type() && b[i].scalar_type() == a.front().scalar_type() &&
              a[i].is_contiguous() && b[i].is_contiguous() && a[i].dim() == 2 && b[i].dim() == 2,
          "A and B must be contiguous 2-D tensors, all float32 or all float16");
    check(a[i].size(1) == s.n_cols && b[i].size(0) == n_rows && b[i].size(1) == a[i].size(0),
          "A must be [R, total column-range length] and B [total row-range length, R]");
  }
  return s;
}

// out[m, rows_i] += scale * B_i @ (A_i @ x[m, cols]) over raw row-major buffers (see lora_add), the adapters stored
// as T (fp32, or fp16 as served). At decode their weights come from memory, in many short runs that the hardware
// prefetcher barely follows: the whole site is requested into L2 first (fp32 at level 0.2: 0.98 -> 0.70 ms a token,
// Zen 4). Splitting the products over the threads gained nothing measurable, so they stay on this one.
template <typename T>
void lora_apply_as(const LoraSet& s, float* op, int64_t ldo, const float* xp, int64_t ldx, int64_t M, float scale) {
  for (size_t i = 0; i < s.a.size(); ++i) {
    prefetch_l2(s.a[i].data_ptr(), s.a[i].nbytes());
    prefetch_l2(s.b[i].data_ptr(), s.b[i].nbytes());
  }
  std::vector<float> xg(s.n_cols), u;
  for (int64_t m = 0; m < M; ++m) {
    int64_t k = 0;
    for (size_t c = 0; c < s.cols.size(); c += 2) {  // gather the active inputs once, shared by every adapter
      std::memcpy(xg.data() + k, xp + m * ldx + s.cols[c], (s.cols[c + 1] - s.cols[c]) * sizeof(float));
      k += s.cols[c + 1] - s.cols[c];
    }
    for (size_t i = 0; i < s.a.size(); ++i) {
      const int64_t R = s.a[i].size(0);
      const T* bp = s.b[i].data_ptr<T>();
      u.resize(R);
      a_products(s.a[i].data_ptr<T>(), xg.data(), R, s.n_cols, scale, u.data());
      float* o = op + m * ldo;
      int64_t j = 0;
      const std::vector<int64_t>& rows = s.rows[i];
      for (size_t c = 0; c < rows.size(); c += 2) {
        int64_t row = rows[c];
        for (; R % 8 == 0 && row + 8 <= rows[c + 1]; row += 8, j += 8) {
          _mm256_storeu_ps(o + row, _mm256_add_ps(_mm256_loadu_ps(o + row), dots8(bp + j * R, u.data(), R)));
        }
        for (; row < rows[c + 1]; ++row, ++j) o[row] += dot(bp + j * R, u.data(), R);
      }
    }
  }
}

void lora_apply(const LoraSet& s, float* op, int64_t ldo, const float* xp, int64_t ldx, int64_t M, float scale) {
  if (s.a.empty()) return;
  if (s.a.front().scalar_type() == at::kHalf) {
    lora_apply_as<at::Half>(s, op, ldo, xp, ldx, M, scale);
  } else {
    lora_apply_as<float>(s, op, ldo, xp, ldx, M, scale);
  }
}

// y[m] = x[m] / rms(x[m]) * w for M rows of C values (row strides ldx, ldy).
void rms_norm_rows(float* yp, int64_t ldy, const float* xp, int64_t ldx, int64_t M, int64_t C, const float* wp,
                   double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * ldx;
    float* yr = yp + m * ldy;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / C + eps));
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * inv * wp[c];
  }
}

// Interleaved RoPE in place on H heads of D values per row (strides ls between rows, hs between heads).
void rope_rows(float* xp, int64_t ls, int64_t hs, int64_t M, int64_t H, int64_t D, const int64_t* pos,
               const float* cp, const float* sp, int64_t P) {
  const int64_t half = D / 2;
  for (int64_t m = 0; m < M; ++m) {
    check(0 <= pos[m] && pos[m] < P, "position beyond the RoPE table");
    const float* c = cp + pos[m] * half;
    const float* s = sp + pos[m] * half;
    for (int64_t h = 0; h < H; ++h) {
      float* v = xp + m * ls + h * hs;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c[i] - b * s[i];
        v[2 * i + 1] = a * s[i] + b * c[i];
      }
    }
  }
}

// out = silu(gate) * up over M rows of F values (out may be gate).
void silu_mul_rows(float* o, int64_t ldo, const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t M,
                   int64_t F) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) o[m * ldo + f] = g[m * ldg + f] / (1.0f + std::exp(-g[m * ldg + f])) * u[m * ldu + f];
}

}  // namespace

// Unmerged LoRA deltas for a few activation rows, several adapters reading the same input in one call:
// out[m, rows_i] += scale * B_i @ (A_i @ x[m, cols]) for each adapter i. x [M, *] and out [M, *] are full-width fp32
// buffers (contiguous columns) indexed by absolute column and row; A_i's inputs are the concatenation of the column
// ranges, B_i's outputs that of its row ranges, in order. a_i [R_i, n_cols], b_i [n_rows_i, R_i]: contiguous, all
// fp32 or all fp16 (the served adapters: half the bytes to stream at decode).
// At decode PyTorch spent most of an adapter's time dispatching its half-dozen tiny GEMMs; here it is arithmetic.
void lora_add(at::Tensor out, const at::Tensor& x, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
              const std::vector<std::vector<int64_t>>& rows, const std::vector<int64_t>& cols, double scale) {
  check_operands(out, x);
  const LoraSet s = make_lora_set(a, b, rows, cols, x.size(1), out.size(1));
  lora_apply(s, out.data_ptr<float>(), out.stride(0), x.data_ptr<float>(), x.stride(0), x.size(0),
             static_cast<float>(scale));
}

// y[m] = x[m] / rms(x[m]) * w ; rows of x and y may be strided, columns contiguous.
void rms_norm(at::Tensor y, const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x.dim() == 2 && y.sizes() == x.sizes() && x.stride(1) == 1 && y.stride(1) == 1, "rms_norm shapes");
  rms_norm_rows(y.data_ptr<float>(), y.stride(0), x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1),
                w.data_ptr<float>(), eps);
}

// In-place interleaved RoPE on x[M, H, D] (pairs 2i, 2i+1) at the given absolute positions; cos/sin: [P, D/2].
void rope_(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  check(x.dim() == 3 && x.stride(2) == 1, "rope expects x [M, H, D] with contiguous D");
  rope_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), x.size(0), x.size(1), x.size(2),
            positions.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(0));
}

// out[M, F] = silu(gate) * up, all fp32 with contiguous columns; out may be gate itself.
void silu_mul(at::Tensor out, const at::Tensor& gate, const at::Tensor& up) {
  check(gate.sizes() == up.sizes() && out.sizes() == gate.sizes(), "silu_mul shapes");
  silu_mul_rows(out.data_ptr<float>(), out.stride(0), gate.data_ptr<float>(), gate.stride(0), up.data_ptr<float>(),
                up.stride(0), gate.size(0), gate.size(1));
}

namespace {

// Softmax(q k^T * scale + mask) v for one query row and one head over keys [0, T); mask[t] is 0 or -inf (a key
// after the query). probs: scratch of T floats, left holding the probabilities.
template <typename KV>
void attend_row(float* out, const float* qv, const KV* k, int64_t ks, const KV* v, int64_t vs, int64_t T, int64_t D,
                const float* mask, float scale, float* probs) {
  // Four keys at a time with independent accumulators: one key's 8-FMA chain alone is latency-bound.
  const __m128 vscale = _mm_set1_ps(scale);
  __m128 vmax4 = _mm_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    const KV* k0 = k + t * ks;
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 qi = _mm256_loadu_ps(qv + i);
      s0 = _mm256_fmadd_ps(qi, load8(k0 + i), s0);
      s1 = _mm256_fmadd_ps(qi, load8(k0 + ks + i), s1);
      s2 = _mm256_fmadd_ps(qi, load8(k0 + 2 * ks + i), s2);
      s3 = _mm256_fmadd_ps(qi, load8(k0 + 3 * ks + i), s3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));  // [s0 s1 s2 s3] x 2 lanes
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 scores = _mm_add_ps(_mm_mul_ps(sums, vscale), _mm_loadu_ps(mask + t));
    _mm_storeu_ps(probs + t, scores);
    vmax4 = _mm_max_ps(vmax4, scores);
  }
  vmax4 = _mm_max_ps(vmax4, _mm_movehl_ps(vmax4, vmax4));
  float mx = _mm_cvtss_f32(_mm_max_ss(vmax4, _mm_shuffle_ps(vmax4, vmax4, 0x55)));
  for (; t < T; ++t) {
    const KV* kr = k + t * ks;
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), load8(kr + i), s);
    probs[t] = hsum(s) * scale + mask[t];
    mx = std::max(mx, probs[t]);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  t = 0;
  for (; t + 8 <= T; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(probs + t), vmx));
    _mm256_storeu_ps(probs + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < T; ++t) { probs[t] = std::exp(probs[t] - mx); sum += probs[t]; }
  const float inv = 1.0f / sum;
  __m256 acc[16];
  const int64_t nv = D / 8;
  for (int64_t i = 0; i < nv; ++i) acc[i] = _mm256_setzero_ps();
  for (t = 0; t < T; ++t) {
    const float p = probs[t] * inv;
    probs[t] = p;
    const __m256 pv = _mm256_set1_ps(p);
    const KV* vr = v + t * vs;
    for (int64_t i = 0; i < nv; ++i) acc[i] = _mm256_fmadd_ps(pv, load8(vr + 8 * i), acc[i]);
  }
  for (int64_t i = 0; i < nv; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

// A few query rows' grouped-query attention over raw buffers (see attend): q and out [M, H, D] with row strides
// qs / os and head strides qh / oh; k and v of G_kv heads (head stride kh, token stride kt; v likewise) over T keys.
struct AttendArgs {
  float* out;
  int64_t os, oh;
  const float* q;
  int64_t qs, qh;
  const void* k;
  int64_t kh, kt;
  const void* v;
  int64_t vh, vt;
  int64_t M, H, D, T, n_kv;
  const int64_t* q_pos;
  const int64_t* k_pos;
  float scale;
};

template <typename KV>
void attend_impl(const AttendArgs& a, const std::vector<int64_t>& active, float* prob_sum, float* row_count) {
  const int64_t M = a.M, T = a.T, G = a.H / a.n_kv;
  const KV* k = static_cast<const KV*>(a.k);
  const KV* v = static_cast<const KV*>(a.v);
  // One task per (row, active head): 9 tasks for a SmolLM2 decode step keep both cores busy.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < a.n_kv; ++g)
      for (int64_t j = 0; j < active[g]; ++j) tasks.emplace_back(m, g * G + j);
  std::vector<float> probs(tasks.size() * T);
  std::vector<float> masks(M * T);  // per query row: 0 for a visible key, -inf for one after the query
  for (int64_t m = 0; m < M; ++m)
    for (int64_t t = 0; t < T; ++t) masks[m * T + t] = a.k_pos[t] > a.q_pos[m] ? -INFINITY : 0.0f;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [m, h] = tasks[i];
      const int64_t g = h / G;
      attend_row<KV>(a.out + m * a.os + h * a.oh, a.q + m * a.qs + h * a.qh, k + g * a.kh, a.kt, v + g * a.vh, a.vt,
                     T, a.D, masks.data() + m * T, a.scale, probs.data() + i * T);
    }
  });
  if (prob_sum == nullptr) return;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const float* pr = probs.data() + i * T;
    const int64_t qpos = a.q_pos[tasks[i].first];
    for (int64_t t = 0; t < T; ++t) {
      if (a.k_pos[t] > qpos) continue;
      prob_sum[t] += pr[t];
      row_count[t] += 1.0f;
    }
  }
}

}  // namespace

// Grouped-query attention of a few query rows: out[m, h] = softmax(q[m, h] k_g^T * scale) v_g for the first
// active[g] query heads h = g*G + j of each KV group g (G = H / n_kv_heads); other heads of out are left untouched.
// q, out: [M, H, D] fp32; kv: [2, n_kv_heads, T, D] keys then values, fp32 or fp16 (any strides, contiguous D);
// q_pos [M], k_pos [T] int64: a query sees keys at positions <= its own. If prob_sum/row_count ([T] fp32) are given, each key's received
// probability and the number of (row, head) pairs that could see it are added to them.
void attend(at::Tensor out, const at::Tensor& q, const at::Tensor& kv, const std::vector<int64_t>& active,
            const at::Tensor& q_pos, const at::Tensor& k_pos, double scale, c10::optional<at::Tensor> prob_sum,
            c10::optional<at::Tensor> row_count) {
  check(kv.dim() == 4 && kv.size(0) == 2, "kv must be [2, n_kv_heads, T, head_dim]");
  const at::Tensor k = kv.select(0, 0), v = kv.select(0, 1);
  check(q.dim() == 3 && out.sizes() == q.sizes(), "attend shapes");
  check(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "q and out must be float32");
  check(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && out.stride(2) == 1, "attend needs contiguous D");
  check(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "k and v must match");
  check(q.size(2) == k.size(2) && q.size(2) % 8 == 0 && q.size(2) <= 128, "head_dim must match, be 8k and <= 128");
  check(q.size(1) % k.size(0) == 0, "query heads must split evenly over KV heads");
  check(static_cast<int64_t>(active.size()) == k.size(0), "one active-head count per KV head");
  for (int64_t a : active) check(0 <= a && a <= q.size(1) / k.size(0), "active head count out of range");
  check(q_pos.numel() == q.size(0) && k_pos.numel() == k.size(1), "one position per query row and per key");
  check(q_pos.scalar_type() == at::kLong && k_pos.scalar_type() == at::kLong && q_pos.is_contiguous() &&
            k_pos.is_contiguous(), "positions must be contiguous int64");
  check(prob_sum.has_value() == row_count.has_value(), "prob_sum and row_count go together");
  float* ps = nullptr;
  float* rc = nullptr;
  if (prob_sum.has_value()) {
    check(prob_sum->numel() == k.size(1) && row_count->numel() == k.size(1) && prob_sum->is_contiguous() &&
              row_count->is_contiguous() && prob_sum->scalar_type() == at::kFloat &&
              row_count->scalar_type() == at::kFloat, "stats must be contiguous float32 [T]");
    ps = prob_sum->data_ptr<float>();
    rc = row_count->data_ptr<float>();
  }
  const AttendArgs args{out.data_ptr<float>(), out.stride(0), out.stride(1), q.data_ptr<float>(), q.stride(0),
                        q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                        q.size(0), q.size(1), q.size(2), k.size(1), k.size(0), q_pos.data_ptr<int64_t>(),
                        k_pos.data_ptr<int64_t>(), static_cast<float>(scale)};
  if (k.scalar_type() == at::kFloat) {
    attend_impl<float>(args, active, ps, rc);
  } else {
    check(k.scalar_type() == at::kHalf, "k and v must be float32 or float16");
    attend_impl<at::Half>(args, active, ps, rc);
  }
}

// ---- The decode step: a few rows through every layer in one call -----------------------------------------------
//
// The same kernels as the calls above, in the order of model/transformer.py's Transformer._layer, with no Python
// between them. Called one by one, the ~15 kernels of a layer cost about as much again in Python, argument
// conversion and thread hand-off as in arithmetic at decode (1.3-1.6 ms of a 6 ms token, Zen 4), and a sub-model's
// adapters added four calls a layer more. Bit-identical to the per-kernel path (tests/test_decode_step.py).

namespace {

// One layer of a (sub-)model as the decode step runs it, checked once when built (the transformer caches one per
// layer, width and adapter).
struct LayerStep {
  int64_t d_model, n_heads, n_kv_heads, head_dim, ffn_dim;
  at::Tensor attn_norm, ffn_norm;
  BlockMat qkv, o, gate_up, down;
  bool sliced;                    // some query heads are inactive: qkv and o run on ranges
  std::vector<int64_t> qkv_rows;  // if sliced, rows of qkv: the active heads' q rows, then k and v (flat, joined)
  std::vector<int64_t> heads;     // if sliced, columns of o (the active heads' outputs; may be none), flat
  std::vector<int64_t> active;    // active query heads per KV group
  int64_t kept;                   // FFN neurons kept (a prefix)
  std::vector<LoraSet> lora;      // the adapter sites qkv, o, gate_up, down (a site may hold no adapter)
  float lora_scale;
};

using LoraSiteArgs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<std::vector<int64_t>>,
                                std::vector<int64_t>>;

std::shared_ptr<LayerStep> make_layer_step(
    std::vector<int64_t> dims, const at::Tensor& attn_norm, const at::Tensor& ffn_norm,
    const std::vector<std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>>& mats,
    bool sliced, std::vector<int64_t> qkv_rows, std::vector<int64_t> heads, std::vector<int64_t> active, int64_t kept,
    const std::vector<LoraSiteArgs>& lora, double lora_scale) {
  check(dims.size() == 5, "dims: d_model, n_heads, n_kv_heads, head_dim, ffn_dim");
  auto s = std::make_shared<LayerStep>();
  s->d_model = dims[0], s->n_heads = dims[1], s->n_kv_heads = dims[2], s->head_dim = dims[3], s->ffn_dim = dims[4];
  const int64_t d = s->d_model, q_dim = s->n_heads * s->head_dim, kv_dim = s->n_kv_heads * s->head_dim,
                F = s->ffn_dim;
  check(s->n_kv_heads > 0 && s->n_heads % s->n_kv_heads == 0, "query heads must split evenly over KV heads");
  check(s->head_dim % 8 == 0 && s->head_dim <= 128 && d % kBlock == 0, "head_dim must be 8k <= 128, d_model 32k");
  for (const at::Tensor* w : {&attn_norm, &ffn_norm})
    check(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == d, "norm weights: float32 [d_model]");
  s->attn_norm = attn_norm, s->ffn_norm = ffn_norm;
  check(mats.size() == 4, "four matrices: qkv, o, gate_up, down");
  BlockMat* out[4] = {&s->qkv, &s->o, &s->gate_up, &s->down};
  const int64_t shapes[4][2] = {{q_dim + 2 * kv_dim, d}, {d, q_dim}, {2 * F, d}, {d, F}};
  for (int i = 0; i < 4; ++i) {
    *out[i] = block_mat(std::get<0>(mats[i]), std::get<1>(mats[i]), std::get<2>(mats[i]));
    check(out[i]->N == shapes[i][0] && out[i]->K == shapes[i][1], "a weight matrix has the wrong shape");
  }
  if (sliced) {
    check_range_lists(q_dim + 2 * kv_dim, d, qkv_rows, {0, d});
    if (!heads.empty()) check_range_lists(d, q_dim, {0, d}, heads);
  }
  check(static_cast<int64_t>(active.size()) == s->n_kv_heads, "one active-head count per KV head");
  for (int64_t a : active) check(0 <= a && a <= s->n_heads / s->n_kv_heads, "active head count out of range");
  check(0 <= kept && kept <= F, "kept FFN neurons out of range");
  s->sliced = sliced, s->qkv_rows = std::move(qkv_rows), s->heads = std::move(heads), s->active = std::move(active), s->kept = kept;
  check(lora.empty() || lora.size() == 4, "adapter sites: none, or qkv, o, gate_up and down");
  const int64_t site_io[4][2] = {{d, q_dim + 2 * kv_dim}, {q_dim, d}, {d, 2 * F}, {F, d}};  // (input, output) widths
  for (size_t i = 0; i < lora.size(); ++i) {
    const auto& [a, b, rows, cols] = lora[i];
    s->lora.push_back(make_lora_set(a, b, rows, cols, site_io[i][0], site_io[i][1]));
  }
  s->lora_scale = static_cast<float>(lora_scale);
  return s;
}

}  // namespace

// Layers steps[0..L) of a forward over M <= 8 rows: h [M, d_model] fp32, updated in place; positions [M] and
// key_positions [T] int64; stores[l] the layer's KV [2, n_kv_heads, capacity, head_dim] (fp16 or fp32, contiguous),
// the new rows written at slots [start, start + M) and attention over slots [0, T) (a dense cache's slot order);
// cos / sin the RoPE tables [P, head_dim / 2]; prob_sum / row_count ([T] fp32) accumulate attention statistics.
void decode_layers(const std::vector<std::shared_ptr<LayerStep>>& steps, at::Tensor h, const at::Tensor& positions,
                   const at::Tensor& key_positions, const std::vector<at::Tensor>& stores, int64_t start,
                   const at::Tensor& cos, const at::Tensor& sin, double scale, double eps,
                   c10::optional<at::Tensor> prob_sum, c10::optional<at::Tensor> row_count) {
  check(steps.size() == stores.size(), "one KV store per layer step");
  if (steps.empty()) return;
  const LayerStep& s0 = *steps[0];
  const int64_t d = s0.d_model, H = s0.n_heads, Hkv = s0.n_kv_heads, D = s0.head_dim, F = s0.ffn_dim;
  const int64_t q_dim = H * D, kv_dim = Hkv * D, QKV = q_dim + 2 * kv_dim;
  check(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(1) == d && h.is_contiguous(),
        "h must be contiguous float32 [M, d_model]");
  const int64_t M = h.size(0), T = key_positions.numel();
  check(M >= 1 && M <= 8, "the decode step takes 1 to 8 rows");
  check(positions.scalar_type() == at::kLong && key_positions.scalar_type() == at::kLong &&
            positions.is_contiguous() && key_positions.is_contiguous() && positions.numel() == M,
        "positions must be contiguous int64, one per row");
  check(0 <= start && start + M <= T, "the new rows' slots must lie among the attended ones");
  check(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
            sin.is_contiguous() && cos.size(1) == D / 2 && sin.sizes() == cos.sizes(), "RoPE tables [P, D/2] float32");
  check(prob_sum.has_value() == row_count.has_value(), "prob_sum and row_count go together");
  float* ps = nullptr;
  float* rc = nullptr;
  if (prob_sum.has_value()) {
    check(prob_sum->numel() == T && row_count->numel() == T && prob_sum->is_contiguous() && row_count->is_contiguous() &&
              prob_sum->scalar_type() == at::kFloat && row_count->scalar_type() == at::kFloat,
          "stats must be contiguous float32 [T]");
    ps = prob_sum->data_ptr<float>();
    rc = row_count->data_ptr<float>();
  }
  for (size_t l = 0; l < steps.size(); ++l) {
    const LayerStep& st = *steps[l];
    check(st.d_model == d && st.n_heads == H && st.n_kv_heads == Hkv && st.head_dim == D && st.ffn_dim == F,
          "every layer step must have the same shape");
    const at::Tensor& kv = stores[l];
    check(kv.dim() == 4 && kv.size(0) == 2 && kv.size(1) == Hkv && kv.size(3) == D && kv.size(2) >= T &&
              kv.is_contiguous() && (kv.scalar_type() == at::kHalf || kv.scalar_type() == at::kFloat),
          "a KV store must be contiguous [2, n_kv_heads, capacity >= T, head_dim], float16 or float32");
  }
  std::vector<float> x(M * d), qkv(M * QKV), attn(M * q_dim), gu(M * 2 * F);
  float* hp = h.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* kpos = key_positions.data_ptr<int64_t>();
  const std::vector<int64_t> all_cols{0, d};
  const auto adapt = [&](const LayerStep& st, int site, float* out, int64_t ldo, const float* in, int64_t ldi) {
    if (site < static_cast<int>(st.lora.size()) && !st.lora[site].a.empty())
      lora_apply(st.lora[site], out, ldo, in, ldi, M, st.lora_scale);
  };
  for (size_t l = 0; l < steps.size(); ++l) {
    const LayerStep& st = *steps[l];
    rms_norm_rows(x.data(), d, hp, d, M, d, st.attn_norm.data_ptr<float>(), eps);
    if (!st.sliced) {
      mat_rows(st.qkv, qkv.data(), QKV, x.data(), d, M, 0, QKV, 0, d, false);
    } else {
      mat_ranges(st.qkv, qkv.data(), QKV, x.data(), d, M, st.qkv_rows, all_cols, false);
    }
    adapt(st, 0, qkv.data(), QKV, x.data(), d);
    rope_rows(qkv.data(), QKV, D, M, H, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(0));
    rope_rows(qkv.data() + q_dim, QKV, D, M, Hkv, D, pos, cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(0));
    const at::Tensor& store = stores[l];
    const int64_t cap = store.size(2);
    for (int64_t part = 0; part < 2; ++part) {  // keys, then values, into slots [start, start + M)
      for (int64_t g = 0; g < Hkv; ++g) {
        for (int64_t m = 0; m < M; ++m) {
          const float* src = qkv.data() + m * QKV + q_dim + part * kv_dim + g * D;
          const int64_t off = ((part * Hkv + g) * cap + start + m) * D;
          if (store.scalar_type() == at::kHalf) {
            at::Half* dst = store.data_ptr<at::Half>() + off;
            for (int64_t i = 0; i < D; ++i) dst[i] = at::Half(src[i]);
          } else {
            std::memcpy(store.data_ptr<float>() + off, src, D * sizeof(float));
          }
        }
      }
    }
    const int64_t vs = Hkv * cap * D;  // values follow keys
    const AttendArgs args{attn.data(), q_dim, D, qkv.data(), QKV, D, nullptr, cap * D, D, nullptr, cap * D, D,
                          M, H, D, T, Hkv, pos, kpos, static_cast<float>(scale)};
    AttendArgs a = args;
    if (store.scalar_type() == at::kHalf) {
      a.k = store.data_ptr<at::Half>(), a.v = store.data_ptr<at::Half>() + vs;
      attend_impl<at::Half>(a, st.active, ps, rc);
    } else {
      a.k = store.data_ptr<float>(), a.v = store.data_ptr<float>() + vs;
      attend_impl<float>(a, st.active, ps, rc);
    }
    if (!st.sliced) {
      mat_rows(st.o, hp, d, attn.data(), q_dim, M, 0, d, 0, q_dim, true);
    } else if (!st.heads.empty()) {
      mat_ranges(st.o, hp, d, attn.data(), q_dim, M, all_cols, st.heads, true);
    }
    adapt(st, 1, hp, d, attn.data(), q_dim);
    rms_norm_rows(x.data(), d, hp, d, M, d, st.ffn_norm.data_ptr<float>(), eps);
    if (st.kept == 0) continue;
    if (st.kept == F) {
      mat_rows(st.gate_up, gu.data(), 2 * F, x.data(), d, M, 0, 2 * F, 0, d, false);
    } else {
      mat_ranges(st.gate_up, gu.data(), 2 * F, x.data(), d, M, {0, st.kept, F, F + st.kept}, all_cols, false);
    }
    adapt(st, 2, gu.data(), 2 * F, x.data(), d);
    silu_mul_rows(gu.data(), 2 * F, gu.data(), 2 * F, gu.data() + F, 2 * F, M, st.kept);
    mat_rows(st.down, hp, d, gu.data(), 2 * F, M, 0, d, 0, st.kept, true);
    adapt(st, 3, hp, d, gu.data(), 2 * F);
  }
}

// ---- KV chunk decode (llmaas.kv.codec): chunk payloads -> the engine's fp16 per-layer KV ----------------------
//
// One layer section of a chunk (H KV heads, C tokens, D head_dim; fp16 metadata):
//   K codes [H, C, D*b/8] | K scales [H, D] (+ zeros [H, D]) | V codes [H, C, D*b/8] | V scales [H, C] (+ zeros)
// b = 8: int8 codes, x = q * scale. b = 4 / 2: unsigned codes packed along D (byte j holds values j + i*D/per at
// bits b*i, per = 8/b), x = q * scale + zero. b = 16: raw fp16 K then V, no metadata.
// q * scale is exact in fp32 (a code of <= 8 bits times an 11-bit mantissa), so whether or not the compiler fuses
// the multiply-add, the result has the bits of llmaas.kv.codec.decode's torch reference, rounded once to fp16.

namespace {

struct KVSection {
  int64_t k_codes, k_meta, v_codes, v_meta, bytes;
};

KVSection kv_section(int64_t bits, int64_t H, int64_t C, int64_t D) {
  const int64_t n = H * C * D;
  if (bits == 16) return {0, 2 * n, 2 * n, 4 * n, 4 * n};
  const int64_t codes = n * bits / 8, fields = bits == 8 ? 1 : 2;
  const int64_t k_meta = 2 * fields * H * D, v_meta = 2 * fields * H * C;
  return {0, codes, codes + k_meta, 2 * codes + k_meta, 2 * codes + k_meta + v_meta};
}

// Codes of values d .. d+7 of one row (d a multiple of 8, D a multiple of 32) as floats.
template <int BITS>
inline __m256 kv_codes8(const uint8_t* row, int64_t d, int64_t D) {
  if constexpr (BITS == 8) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  } else {
    constexpr int64_t per = 8 / BITS;
    const int64_t seg = D / per, part = d / seg;
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (d - part * seg)));
    const __m256i wide = _mm256_cvtepu8_epi32(raw);
    const __m256i q = _mm256_and_si256(_mm256_srl_epi32(wide, _mm_cvtsi32_si128(static_cast<int>(BITS * part))),
                                       _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(q);
  }
}

inline __m256 kv_half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <bool STREAM>
inline void kv_store8(at::Half* out, __m256 x) {
  const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
  if constexpr (STREAM) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(out), h);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
  }
}

// One tensor (K or V) of one layer section: rows t < fill of each head, to out + h * hs + t * ts.
// Per channel (K): scale/zero [H, D]; per token (V): scale/zero [H, C].
template <int BITS, bool PER_CHANNEL, bool STREAM>
void kv_decode_tensor(const uint8_t* codes, const uint8_t* meta, int64_t H, int64_t C, int64_t D, int64_t fill,
                      at::Half* out, int64_t hs, int64_t ts) {
  const int64_t row_bytes = D * BITS / 8, n_meta = PER_CHANNEL ? H * D : H * C;
  const uint8_t* scales = meta;
  const uint8_t* zeros = meta + 2 * n_meta;  // only read below INT8
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t t = 0; t < fill; ++t) {
      const uint8_t* row = codes + (h * C + t) * row_bytes;
      at::Half* o = out + h * hs + t * ts;
      __m256 s = _mm256_setzero_ps(), z = _mm256_setzero_ps();
      if constexpr (!PER_CHANNEL) {
        s = _mm256_set1_ps(half_to_float(*reinterpret_cast<const uint16_t*>(scales + 2 * (h * C + t))));
        if constexpr (BITS != 8) z = _mm256_set1_ps(half_to_float(*reinterpret_cast<const uint16_t*>(
                                      zeros + 2 * (h * C + t))));
      }
      for (int64_t d = 0; d < D; d += 8) {
        if constexpr (PER_CHANNEL) {
          s = kv_half8(scales + 2 * (h * D + d));
          if constexpr (BITS != 8) z = kv_half8(zeros + 2 * (h * D + d));
        }
        __m256 x = _mm256_mul_ps(kv_codes8<BITS>(row, d, D), s);
        if constexpr (BITS != 8) x = _mm256_add_ps(x, z);
        kv_store8<STREAM>(o + d, x);
      }
    }
  }
}

template <int BITS, bool STREAM>
void kv_decode_section(const uint8_t* sec, const KVSection& lay, int64_t H, int64_t C, int64_t D, int64_t fill,
                       at::Half* k_out, at::Half* v_out, int64_t hs, int64_t ts) {
  kv_decode_tensor<BITS, true, STREAM>(sec + lay.k_codes, sec + lay.k_meta, H, C, D, fill, k_out, hs, ts);
  kv_decode_tensor<BITS, false, STREAM>(sec + lay.v_codes, sec + lay.v_meta, H, C, D, fill, v_out, hs, ts);
}

// The same decode 16 values at a time, for CPUs with AVX-512 (F, BW, VL). Same arithmetic, same bits: a code times
// its scale is exact in fp32, so the fused multiply-add rounds once, as the AVX2 path's multiply then add does.
// Needs D a multiple of 64 (an INT2 row's four 2-bit planes are D/4 bytes each: whole 16-value groups). A second
// loop rather than a vector-width parameter of kv_decode_tensor: AVX-512 intrinsics inline only into a function that
// carries the target attribute itself, and an attribute cannot depend on a template argument.
#define LLMAAS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

template <int BITS>
LLMAAS_AVX512 inline __m512 kv_codes16(const uint8_t* row, int64_t d, int64_t D) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
  } else {
    constexpr int64_t per = 8 / BITS;
    const int64_t seg = D / per, part = d / seg;
    const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (d - part * seg))));
    const __m512i q = _mm512_and_si512(_mm512_srl_epi32(wide, _mm_cvtsi32_si128(static_cast<int>(BITS * part))),
                                       _mm512_set1_epi32((1 << BITS) - 1));
    return _mm512_cvtepi32_ps(q);
  }
}

template <int BITS, bool PER_CHANNEL, bool STREAM>
LLMAAS_AVX512 void kv_decode_tensor16(const uint8_t* codes, const uint8_t* meta, int64_t H, int64_t C, int64_t D,
                                      int64_t fill, at::Half* out, int64_t hs, int64_t ts) {
  const int64_t row_bytes = D * BITS / 8, n_meta = PER_CHANNEL ? H * D : H * C;
  const uint8_t* scales = meta;
  const uint8_t* zeros = meta + 2 * n_meta;  // only read below INT8
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t t = 0; t < fill; ++t) {
      const uint8_t* row = codes + (h * C + t) * row_bytes;
      at::Half* o = out + h * hs + t * ts;
      __m512 s = _mm512_setzero_ps(), z = _mm512_setzero_ps();
      if constexpr (!PER_CHANNEL) {
        s = _mm512_set1_ps(half_to_float(*reinterpret_cast<const uint16_t*>(scales + 2 * (h * C + t))));
        if constexpr (BITS != 8) z = _mm512_set1_ps(half_to_float(*reinterpret_cast<const uint16_t*>(
                                      zeros + 2 * (h * C + t))));
      }
      for (int64_t d = 0; d < D; d += 16) {
        if constexpr (PER_CHANNEL) {
          s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 2 * (h * D + d))));
          if constexpr (BITS != 8) {
            z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zeros + 2 * (h * D + d))));
          }
        }
        const __m512 q = kv_codes16<BITS>(row, d, D);
        const __m512 x = BITS == 8 ? _mm512_mul_ps(q, s) : _mm512_fmadd_ps(q, s, z);
        const __m256i half = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
        if constexpr (STREAM) {
          _mm256_stream_si256(reinterpret_cast<__m256i*>(o + d), half);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), half);
        }
      }
    }
  }
}

template <int BITS, bool STREAM>
LLMAAS_AVX512 void kv_decode_section16(const uint8_t* sec, const KVSection& lay, int64_t H, int64_t C, int64_t D,
                                       int64_t fill, at::Half* k_out, at::Half* v_out, int64_t hs, int64_t ts) {
  kv_decode_tensor16<BITS, true, STREAM>(sec + lay.k_codes, sec + lay.k_meta, H, C, D, fill, k_out, hs, ts);
  kv_decode_tensor16<BITS, false, STREAM>(sec + lay.v_codes, sec + lay.v_meta, H, C, D, fill, v_out, hs, ts);
}

void kv_copy_fp16(const uint8_t* sec, int64_t H, int64_t C, int64_t D, int64_t fill, at::Half* out, int64_t hs,
                  int64_t ts) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < fill; ++t)
      std::memcpy(out + h * hs + t * ts, sec + 2 * ((h * C + t) * D), 2 * D);
}

// (chunk, layer) tasks per thread: one task is about 1.3 us of work, so a single layer of a 2,048-token context
// (128 tasks) runs on the calling thread. Splitting it measured 60x slower on a loaded 2-core machine, where the
// OpenMP worker waits for a core; a whole context (3,840 tasks) is memory-bound and gains little from a split.
constexpr int64_t kDecodeGrain = 512;

// Outputs at least this large are written with streaming (non-temporal) stores: they pass the caches they would
// not stay in anyway. A restore's batch of 6 layers of a 2,048-token context (9.4 MB) decoded in 3.25 ms against
// 3.9 ms with plain stores (AMD EPYC Zen 4, 2 threads); a single chunk's decode for a call stays cached.
constexpr int64_t kStreamBytes = 8 << 20;

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The KV decode's instruction set: 512 (AVX-512) or 256 (AVX2), chosen once from the CPU, overridable for tests and
// benchmarks (set_kv_decode_isa).
std::atomic<int> g_kv_isa{cpu_has_avx512() ? 512 : 256};

}  // namespace

// "avx512" or "avx2": the path decode_kv_chunks takes (for head_dim a multiple of 64; AVX2 otherwise).
std::string kv_decode_isa() { return g_kv_isa.load() == 512 ? "avx512" : "avx2"; }

// Force a path ("avx2", "avx512") or restore the CPU's best ("auto"). AVX-512 is refused on a CPU without it.
void set_kv_decode_isa(const std::string& isa) {
  check(isa == "auto" || isa == "avx2" || isa == "avx512", "KV decode path must be auto, avx2 or avx512");
  check(isa != "avx512" || cpu_has_avx512(), "this CPU has no AVX-512 (F, BW, VL, DQ)");
  g_kv_isa = isa == "avx2" ? 256 : isa == "avx512" ? 512 : (cpu_has_avx512() ? 512 : 256);
}

// Decode chunk i's layer sections (payloads[i]: payload_layers uint8 sections of levels[i] bits; after the first
// skip_layers of them, layer j for out[j], j < num_layers = out.size()) into out[j][:, :, token_starts[i] :
// + fills[i]]; out[j]: [2, H, cap, D] fp16, contiguous D, D a multiple of 32. skip_layers lets a restore decode a
// batch of layers straight from whole payloads. Tasks are (chunk, layer) pairs: 3,840 for a 2,048-token context.
void decode_kv_chunks(const std::vector<at::Tensor>& payloads, const std::vector<int64_t>& levels,
                      const std::vector<int64_t>& token_starts, const std::vector<int64_t>& fills,
                      const std::vector<at::Tensor>& out, int64_t chunk_tokens, int64_t skip_layers,
                      int64_t payload_layers) {
  const int64_t n = static_cast<int64_t>(payloads.size()), L = static_cast<int64_t>(out.size());
  check(levels.size() == payloads.size() && token_starts.size() == payloads.size() &&
            fills.size() == payloads.size(), "one level, start and fill per payload");
  if (n == 0 || L == 0) return;
  const at::Tensor& o0 = out[0];
  check(o0.dim() == 4 && o0.size(0) == 2, "out tensors must be [2, n_kv_heads, capacity, head_dim]");
  const int64_t H = o0.size(1), cap = o0.size(2), D = o0.size(3), C = chunk_tokens;
  check(D % 32 == 0, "head_dim must be a multiple of 32");
  std::vector<at::Half*> outs(L);
  for (int64_t j = 0; j < L; ++j) {
    const at::Tensor& o = out[j];
    check(o.scalar_type() == at::kHalf && o.sizes() == o0.sizes() && o.strides() == o0.strides() &&
              o.stride(3) == 1, "out tensors must be fp16 of one shape and strides, contiguous head_dim");
    outs[j] = o.data_ptr<at::Half>();
  }
  const int64_t s0 = o0.stride(0), hs = o0.stride(1), ts = o0.stride(2);
  std::vector<const uint8_t*> srcs(n);
  std::vector<KVSection> lays(n);
  int64_t out_bytes = 0;
  for (int64_t i = 0; i < n; ++i) out_bytes += 2 * 2 * H * fills[i] * D * L;
  // Streaming stores need aligned rows (16 bytes for AVX2's, 32 for AVX-512's); PyTorch's allocations are 64-byte
  // aligned, a view into one may not be.
  const bool wide = g_kv_isa.load() == 512 && D % 64 == 0;
  bool aligned = (2 * hs) % 32 == 0 && (2 * ts) % 32 == 0 && (2 * s0) % 32 == 0;
  for (int64_t j = 0; j < L; ++j) aligned = aligned && reinterpret_cast<uintptr_t>(outs[j]) % 32 == 0;
  const bool stream = out_bytes >= kStreamBytes && aligned;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bits = levels[i];
    check(bits == 2 || bits == 4 || bits == 8 || bits == 16, "level must be 2, 4, 8 or 16 bits");
    lays[i] = kv_section(bits, H, C, D);
    check(skip_layers >= 0 && skip_layers + L <= payload_layers && payloads[i].scalar_type() == at::kByte &&
              payloads[i].is_contiguous() && payloads[i].numel() == payload_layers * lays[i].bytes,
          "payload must be contiguous uint8 of payload_layers sections, the decoded ones after skip_layers");
    check(1 <= fills[i] && fills[i] <= C && 0 <= token_starts[i] && token_starts[i] + fills[i] <= cap,
          "token range outside the chunk or the cache");
    srcs[i] = payloads[i].data_ptr<uint8_t>() + skip_layers * lays[i].bytes;
  }
  at::parallel_for(0, n * L, kDecodeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / L, j = task % L, fill = fills[i];
      const uint8_t* sec = srcs[i] + j * lays[i].bytes;
      at::Half* k_out = outs[j] + token_starts[i] * ts;
      at::Half* v_out = k_out + s0;
      switch (levels[i] * 2 + (stream ? 1 : 0) + (wide ? 100 : 0)) {
        case 117: kv_decode_section16<8, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 116: kv_decode_section16<8, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 109: kv_decode_section16<4, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 108: kv_decode_section16<4, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 105: kv_decode_section16<2, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 104: kv_decode_section16<2, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 17: kv_decode_section<8, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 16: kv_decode_section<8, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 9: kv_decode_section<4, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 8: kv_decode_section<4, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 5: kv_decode_section<2, true>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        case 4: kv_decode_section<2, false>(sec, lays[i], H, C, D, fill, k_out, v_out, hs, ts); break;
        default:  // FP16: a copy on either path
          kv_copy_fp16(sec, H, C, D, fill, k_out, hs, ts);
          kv_copy_fp16(sec + lays[i].v_codes, H, C, D, fill, v_out, hs, ts);
      }
    }
    if (stream) _mm_sfence();  // streamed stores are weakly ordered: make them visible before the task ends
  });
}

// Optional column ids of an expansion (an empty tensor: none), checked against the matrix width K.
const int64_t* column_ids(const at::Tensor& ids, int64_t K) {
  if (ids.numel() == 0) return nullptr;
  check(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "column ids must be int64 [n]");
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t j = 0; j < ids.numel(); ++j) check(0 <= p[j] && p[j] < K, "column id out of bounds");
  return p;
}

void check_expand_out(const at::Tensor& out, int64_t rows, int64_t cols) {
  check(out.scalar_type() == at::kFloat && out.dim() == 2 && out.stride(1) == 1, "out must be fp32 [rows, cols]");
  check(out.size(0) == rows && out.size(1) == cols, "out has the wrong shape for the rows and columns asked");
}

// out = W[r0:r1, c0:c1] (or W[r0:r1, col_ids] when col_ids is not empty) as fp32, W as Q4 blocks (see q4_matmul);
// bit-identical to Q4Blocks.dequantize. c0 and c1 lie on 32-column blocks.
void q4_expand(at::Tensor out, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& mn, int64_t r0, int64_t r1,
               int64_t c0, int64_t c1, const at::Tensor& col_ids) {
  check(qs.scalar_type() == at::kByte && qs.is_contiguous(), "qs must be contiguous uint8");
  check(d.scalar_type() == mn.scalar_type() && d.is_contiguous() && mn.is_contiguous(),
        "scales and mins must be contiguous and of one dtype");
  const int64_t K = qs.size(1) * 2;
  check(0 <= r0 && r0 <= r1 && r1 <= qs.size(0), "rows out of bounds");
  const int64_t* ids = column_ids(col_ids, K);
  if (ids == nullptr) check_columns(K, c0, c1);
  check_expand_out(out, r1 - r0, ids != nullptr ? col_ids.numel() : c1 - c0);
  if (d.scalar_type() == at::kHalf) {
    expand_rows(out.data_ptr<float>(), out.stride(0), r0, r1 - r0, qs.data_ptr<uint8_t>(), d.data_ptr<at::Half>(),
                mn.data_ptr<at::Half>(), K, c0, c1, ids, col_ids.numel());
  } else {
    check(d.scalar_type() == at::kFloat, "scales must be float16 or float32");
    expand_rows(out.data_ptr<float>(), out.stride(0), r0, r1 - r0, qs.data_ptr<uint8_t>(), d.data_ptr<float>(),
                mn.data_ptr<float>(), K, c0, c1, ids, col_ids.numel());
  }
}

// As q4_expand, for Q8 blocks (see q8_matmul).
void q8_expand(at::Tensor out, const at::Tensor& qs, const at::Tensor& d, int64_t r0, int64_t r1, int64_t c0,
               int64_t c1, const at::Tensor& col_ids) {
  check(qs.scalar_type() == at::kChar && qs.is_contiguous(), "qs must be contiguous int8");
  check(d.scalar_type() == at::kHalf && d.is_contiguous(), "scales must be contiguous float16");
  const int64_t K = qs.size(1);
  check(0 <= r0 && r0 <= r1 && r1 <= qs.size(0), "rows out of bounds");
  const int64_t* ids = column_ids(col_ids, K);
  if (ids == nullptr) check_columns(K, c0, c1);
  check_expand_out(out, r1 - r0, ids != nullptr ? col_ids.numel() : c1 - c0);
  expand_rows<int8_t, at::Half>(out.data_ptr<float>(), out.stride(0), r0, r1 - r0, qs.data_ptr<int8_t>(),
                                d.data_ptr<at::Half>(), nullptr, K, c0, c1, ids, col_ids.numel());
}

bool has_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// y[M, r1-r0] (+)= x[M, c1-c0] @ W[r0:r1, c0:c1]^T in bf16 (see gemm_bf16), W as Q4 or Q8 blocks; with `col_ids`,
// W's columns are read through them (as in q4_expand). Needs AVX-512 BF16 (has_bf16()).
void blocks_gemm_bf16(at::Tensor y, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                      const at::Tensor& mn, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                      const at::Tensor& col_ids, bool accumulate) {
  check(has_bf16(), "this CPU has no AVX-512 BF16");
  check(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, "x must be fp32 [M, cols] rows");
  check(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1, "y must be fp32 [M, rows] rows");
  const bool q4 = qs.scalar_type() == at::kByte;
  const int64_t K = q4 ? qs.size(1) * 2 : qs.size(1), M = x.size(0);
  check(0 <= r0 && r0 <= r1 && r1 <= qs.size(0) && y.size(0) == M && y.size(1) == r1 - r0, "rows out of bounds");
  const int64_t* ids = column_ids(col_ids, K);
  const int64_t b0 = ids != nullptr ? 0 : c0 / kBlock * kBlock;
  const int64_t b1 = ids != nullptr ? col_ids.numel() : (c1 + kBlock - 1) / kBlock * kBlock;
  check(ids != nullptr || (0 <= c0 && c0 < c1 && c1 <= K), "columns out of bounds");
  check(x.size(1) == (ids != nullptr ? col_ids.numel() : c1 - c0), "x must have one column per weight column");
  const int64_t kpad = (b1 - b0 + 1) / 2 * 2;
  std::vector<uint16_t> xb(M * kpad);
  to_bf16_rows(x.data_ptr<float>(), x.stride(0), M, x.size(1), ids != nullptr ? 0 : c0 - b0, kpad, xb.data());
  const auto run = [&](auto* qp, auto* sp, auto* mp) {
    const auto expand = [&](float* out, int64_t n0, int64_t nn) {
      if (kpad != b1 - b0) std::fill(out, out + nn * kpad, 0.0f);
      expand_rows_serial(out, kpad, r0 + n0, nn, qp, sp, mp, K, b0, b1, ids, ids != nullptr ? b1 : 0);
    };
    gemm_bf16(y.data_ptr<float>(), y.stride(0), xb.data(), M, kpad, r1 - r0, expand, accumulate);
  };
  if (!q4) {
    check(d.scalar_type() == at::kHalf, "Q8 scales must be float16");
    run(qs.data_ptr<int8_t>(), d.data_ptr<at::Half>(), static_cast<const at::Half*>(nullptr));
  } else if (d.scalar_type() == at::kHalf) {
    run(qs.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), mn.data_ptr<at::Half>());
  } else {
    run(qs.data_ptr<uint8_t>(), d.data_ptr<float>(), mn.data_ptr<float>());
  }
}

// What one read request does with the pieces it brought in, on its IO thread while they are still in the CPU's
// cache (the chunk log: a direct read lands in one aligned buffer, and each chunk's layer sections go to its own
// payload): for piece k, table[2][k] bytes at address table[0][k], when table[5][k] >= 0 check its XXH3-64 with
// seed table[3][k] against table[4][k] and set state[table[5][k]] to 1 (good) or 2 (bad); then, when the
// destination table[1][k] differs from the source, copy it there. int64 [6, m]; the caller keeps every address
// alive and no two pieces overlap. ~250 pieces per request: one call instead of a Python loop over them.
void land_pieces(const at::Tensor& table, at::Tensor state) {
  check(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == 6 && table.is_contiguous(),
        "table must be a contiguous int64 [6, m] tensor of (source, destination, length, seed, checksum, state)");
  check(state.scalar_type() == at::kByte && state.is_contiguous(), "state must be contiguous uint8");
  const int64_t m = table.size(1), n_state = state.numel();
  const int64_t* src = table.data_ptr<int64_t>();
  const int64_t *dst = src + m, *len = dst + m, *seed = len + m, *want = seed + m, *slot = want + m;
  for (int64_t k = 0; k < m; ++k)
    check(len[k] >= 0 && src[k] != 0 && dst[k] != 0 && slot[k] < n_state, "a piece needs two addresses and a slot");
  uint8_t* out = state.data_ptr<uint8_t>();
  for (int64_t k = 0; k < m; ++k) {
    const void* from = reinterpret_cast<const void*>(src[k]);
    if (slot[k] >= 0) {
      const XXH64_hash_t got = XXH3_64bits_withSeed(from, static_cast<size_t>(len[k]),
                                                    static_cast<XXH64_hash_t>(seed[k]));
      out[slot[k]] = got == static_cast<XXH64_hash_t>(want[k]) ? 1 : 2;
    }
    if (dst[k] != src[k]) std::memcpy(reinterpret_cast<void*>(dst[k]), from, static_cast<size_t>(len[k]));
  }
}

// The GIL is released while a kernel runs (as PyTorch's own ops do): the service's HTTP thread keeps serving while
// the compute thread multiplies. Kernels touch only tensor memory, never Python objects.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("q4_matmul", &q4_matmul, release());
  m.def("q8_matmul", &q8_matmul, release());
  m.def("q4_matmul_ranges", &q4_matmul_ranges, release());
  m.def("q8_matmul_ranges", &q8_matmul_ranges, release());
  m.def("q4_expand", &q4_expand, release());
  m.def("q8_expand", &q8_expand, release());
  m.def("has_bf16", &has_bf16);
  m.def("blocks_gemm_bf16", &blocks_gemm_bf16, release());
  m.def("lora_add", &lora_add, release());
  m.def("set_prefetch_bytes", &set_prefetch_bytes);
  m.def("rms_norm", &rms_norm, release());
  m.def("rope_", &rope_, release());
  m.def("silu_mul", &silu_mul, release());
  m.def("attend", &attend, release());
  m.def("decode_kv_chunks", &decode_kv_chunks, release());
  m.def("kv_decode_isa", &kv_decode_isa);
  m.def("set_kv_decode_isa", &set_kv_decode_isa);
  m.def("land_pieces", &land_pieces, release());
  pybind11::class_<LayerStep, std::shared_ptr<LayerStep>>(m, "LayerStep");
  m.def("make_layer_step", &make_layer_step);
  m.def("decode_layers", &decode_layers, release());
}
