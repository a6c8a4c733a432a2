// Quantised matrix products for AVX2 CPUs: int16 activations against 8-bit or 4-bit weights.
//
// y[m, n] = sum_k x[m, k] * w[n, k], with w[n, k] = scale[n, g] * (q[n, k] - zero) + min[n, g],
// g = k / group. Decoding reads every weight once per token; converting each weight to float32
// and multiplying with FMA is compute-bound at about 1.5 weights per cycle, below what memory
// delivers. So x is quantised to int16 in blocks of 32 (one float32 scale each) and each block
// of 32 weights costs two integer multiply-adds (madd) per activation row.
//
// q8: q is int8, row-major (N, K).
// q4: q is 4-bit, 16 bytes per 32 values: byte j holds value j in its low nibble and value j + 16
//     in its high nibble (ggml's Q4_0 order).
// q6: q is signed 6-bit, 24 bytes per 32 values: the low nibbles of q + 32 as q4, then a 64-bit
//     word of their top two bits (layout in load_block; quant.py's HIGH_BITS writes it).
// group: a multiple of 32, or 16 without mins or zero (Q6_K's sub-blocks; 8- or 6-bit q).
// Scales and mins are float32 or float16 (N, K / group).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cstring>

#include "kernels.h"
#include "simd.h"

namespace {

constexpr int64_t QK = 32;       // activation block
constexpr int64_t ROWS = 4;      // activation rows sharing each weight load
constexpr int64_t WEIGHT_TILE = 16;  // weight rows kept hot in L1/L2 while all activation rows pass
// Weights are fetched this many bytes ahead of use: one thread alone keeps too few cache misses in
// flight to stream (a 262k x 640 int8 GEMV: 10.0 -> 12.6 GB/s at 2 threads, 5.8 -> 7.4 at one).
constexpr int64_t PREFETCH = 1024;
constexpr int64_t TILES_TAKEN = 4;  // weight tiles a thread claims at a time

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float load_scale(const float* s, int64_t i) { return s[i]; }
inline float load_scale(const at::Half* s, int64_t i) { return _cvtsh_ss(reinterpret_cast<const uint16_t*>(s)[i]); }

// Activations as int16 blocks: xq (M, K), d (M, K / 32) scales, s (M, K / 32) = d * sum(xq), the
// block sums the zero and min terms need (taken from xq, so they cancel its rounding). int16 keeps
// the relative error near 1e-5 where int8 (ggml's Q8_0) costs up to ~0.7 in the 270M's logits,
// for one more widening per weight block: the products are summed by madd in int32 either way.
struct QuantisedRows {
  std::vector<int16_t> q;
  std::vector<float> d, s;
};

// Into the calling thread's buffers, which keep their capacity: decoding steps allocate nothing.
const QuantisedRows& quantise_rows(const float* x, int64_t M, int64_t K) {
  int64_t nb = K / QK;
  thread_local QuantisedRows buffers;
  QuantisedRows& r = buffers;  // a local name: the workers below must see this thread's buffers, not their own
  r.q.resize(M * K);
  r.d.resize(M * nb);
  r.s.resize(M * nb);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, M * nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* src = x + b * QK;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(src + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      float a = _mm_cvtss_f32(m);
      __m256 inv = _mm256_set1_ps(a > 0.f ? 32767.f / a : 0.f);
      __m256i i[4];
      for (int j = 0; j < 4; ++j)
        i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
      // packs works within 128-bit lanes; 0xD8 puts the four 64-bit quarters back in order.
      alignas(32) int16_t vals[QK];
      _mm256_store_si256(reinterpret_cast<__m256i*>(vals), _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0xD8));
      _mm256_store_si256(reinterpret_cast<__m256i*>(vals + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2], i[3]), 0xD8));
      int16_t* dst = r.q.data() + b * QK;  // the order load_block unpacks weights in (see there)
      for (int j = 0; j < 8; ++j) {
        dst[j] = vals[2 * j];
        dst[8 + j] = vals[16 + 2 * j];
        dst[16 + j] = vals[2 * j + 1];
        dst[24 + j] = vals[17 + 2 * j];
      }
      float d = a / 32767.f;
      r.d[b] = d;
      r.s[b] = d * static_cast<float>(sum);
    }
  });
  return r;
}

// 32 weights widened to int16 without crossing 128-bit lanes: w0 holds values 0, 2, .., 14 then
// 16, 18, .., 30, and w1 the odd ones, the order quantise_rows stores activations in. Both lanes
// of a register then hold the values of one half block (which Q6_K's two scales need). A 16-bit
// word of the weights holds two consecutive int8 values, or four 4-bit ones (values 2j, 2j + 16,
// 2j + 1, 2j + 17 from the low nibble up): shifts and a mask pick each out in place, where
// sign- or zero-extending half a register (vpmovsxbw) is a lane-crossing instruction.
//
// q6 codes (q + 32) take their top two bits from one 64-bit word broadcast to all four 64-bit
// quarters: quarter Q of w0 finds its four words' bits at bit 4 + 2 Q of each 16-bit field, so a
// shift by 2 Q and a mask put them at bits 4-5 above the nibble. w1's quarters 0-1 find them at
// bits 12 and 14, quarters 2-3 at bits 0 and 2, read from a copy shifted left by 4 (a right shift
// cannot reach them there). The codes come back unsigned (0..63): callers count the 32 in the zero.
template <int BITS>
inline void load_block(const uint8_t* wrow, int64_t b, __m256i& w0, __m256i& w1) {
  constexpr int64_t bytes = QK * BITS / 8;
  // 24-byte q6 blocks do not tile cache lines: every block prefetches (one more instruction).
  if (BITS == 6 || (b * bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + b * bytes + PREFETCH), _MM_HINT_T0);
  if (BITS != 8) {
    const __m256i nibble = _mm256_set1_epi16(0x000F);
    const uint8_t* blk = wrow + b * bytes;
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    w0 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), nibble);
    w1 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(8, 8, 12, 12)), nibble);
    if (BITS == 6) {
      const __m256i top = _mm256_set1_epi16(0x0030);
      int64_t bits;
      std::memcpy(&bits, blk + 16, sizeof bits);  // an unaligned 8-byte load, without type punning
      __m256i h = _mm256_set1_epi64x(bits);
      __m256i h1 = _mm256_blend_epi32(h, _mm256_slli_epi64(h, 4), 0xF0);
      w0 = _mm256_or_si256(w0, _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 2, 4, 6)), top));
      w1 = _mm256_or_si256(w1, _mm256_and_si256(_mm256_srlv_epi64(h1, _mm256_setr_epi64x(8, 10, 0, 2)), top));
    }
  } else {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * QK));
    w0 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
    w1 = _mm256_srai_epi16(v, 8);
  }
}

// sum_g (mins[g] - scales[g] * zero) * xg[g]: the weights' offset terms against the group sums.
template <typename S>
inline float offset_dot(const S* scales, const S* mins, float zero, const float* xg, int64_t ng) {
  __m256 acc = _mm256_setzero_ps(), z = _mm256_set1_ps(zero);
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    __m256 off = _mm256_mul_ps(load8(scales + g), z);
    off = mins ? _mm256_sub_ps(load8(mins + g), off) : _mm256_sub_ps(_mm256_setzero_ps(), off);
    acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(xg + g), acc);
  }
  float s = hsum8(acc);
  for (; g < ng; ++g) s += ((mins ? load_scale(mins, g) : 0.f) - load_scale(scales, g) * zero) * xg[g];
  return s;
}

// The int32 sums of one block of 32 weight-activation products (eight lanes of four).
inline __m256i block_dot(__m256i w0, __m256i w1, __m256i x0, __m256i x1) {
  // |w| <= 255 and |x| <= 32767: each int32 lane sums four products, far from overflow.
  return _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
}

// Block b of MB activation rows, in load_block's order: the even values in x0, the odd ones in x1.
template <int MB>
inline void load_x(const int16_t* xq, int64_t K, int64_t b, __m256i* x0, __m256i* x1) {
  for (int i = 0; i < MB; ++i) {
    x0[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * QK));
    x1[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * QK + 16));
  }
}

// NR weight rows [n0, n0 + NR) against MB activation rows [m0, m0 + MB): template arguments, so
// the NR * MB accumulators live in registers. Batches share each weight load across MB rows. One
// row alone keeps one weight row (several interleaved rows halved the memory streaming rate on the
// 262k-row LM head) and alternates two accumulators, so FMA latency does not bound it.
// EXTRA: the weights have a zero or mins, added from the block sums.
template <int NR, int MB, int BITS, bool EXTRA, typename S>
void dot_tile(const QuantisedRows& x, const float* xg, int64_t m0, int64_t K, const uint8_t* q, const S* scales,
              const S* mins, int64_t group, float zero, float* out, int64_t N, int64_t n0) {
  const int64_t nb = K / QK, ng = K / group, row_bytes = K * BITS / 8;
  __m256 acc[NR][MB];
  float extra[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) { acc[r][i] = _mm256_setzero_ps(); extra[r][i] = 0.f; }
  __m256 odd = _mm256_setzero_ps();  // a second chain for odd blocks when there is one accumulator
  const int16_t* xq = x.q.data() + m0 * K;
  const float* xd = x.d.data() + m0 * nb;
  const uint8_t* w = q + n0 * row_bytes;
  const S* sc = scales + n0 * ng;
  if (group == 16) {  // a scale per half block (Q6_K's sub-blocks); no zero or mins
    for (int64_t b = 0; b < nb; ++b) {
      __m256i x0[MB], x1[MB];
      load_x<MB>(xq, K, b, x0, x1);
      for (int r = 0; r < NR; ++r) {
        __m256i w0, w1;
        load_block<BITS>(w + r * row_bytes, b, w0, w1);
        if (BITS == 6) {  // signed codes: with a scale per 16 values the zero has no block sums to go with
          w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(32));
          w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(32));
        }
        // the low lane sums values 0-15 (first scale), the high lane 16-31 (second scale)
        const __m256 s = _mm256_setr_m128(_mm_set1_ps(load_scale(sc, r * ng + 2 * b)), _mm_set1_ps(load_scale(sc, r * ng + 2 * b + 1)));
        for (int i = 0; i < MB; ++i) {
          __m256i dot = block_dot(w0, w1, x0[i], x1[i]);
          acc[r][i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), s), _mm256_set1_ps(xd[i * nb + b]), acc[r][i]);
        }
      }
    }
  } else if (NR * MB == 1) {
    // One row: two blocks a step, one per accumulator, with no per-block branch (the general loop
    // below ran a 128 x 640 group-32 matrix in L2 at half this speed). A scale per block (group
    // 32, most GGUF types) or per `per` blocks.
    const int64_t per = group / QK;
    auto block = [&](int64_t b) {
      __m256i x0[1], x1[1], w0, w1;
      load_x<1>(xq, K, b, x0, x1);
      load_block<BITS>(w, b, w0, w1);
      return _mm256_cvtepi32_ps(block_dot(w0, w1, x0[0], x1[0]));
    };
    int64_t b = 0;
    if (per == 1) {
      // Eight blocks' scale products at once (weight scale x activation scale), each then
      // broadcast from memory: a scalar float16 conversion, multiply and broadcast per block cost
      // a fifth of the loop's instructions.
      alignas(32) float f[8];
      for (; b + 8 <= nb; b += 8) {
        _mm256_store_ps(f, _mm256_mul_ps(load8(sc + b), _mm256_loadu_ps(xd + b)));
        for (int j = 0; j < 8; j += 2) {
          acc[0][0] = _mm256_fmadd_ps(block(b + j), _mm256_broadcast_ss(f + j), acc[0][0]);
          odd = _mm256_fmadd_ps(block(b + j + 1), _mm256_broadcast_ss(f + j + 1), odd);
        }
      }
      for (; b + 2 <= nb; b += 2) {
        acc[0][0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(load_scale(sc, b) * xd[b]), acc[0][0]);
        odd = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(load_scale(sc, b + 1) * xd[b + 1]), odd);
      }
      if (b < nb) acc[0][0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(load_scale(sc, b) * xd[b]), acc[0][0]);
    } else {
      for (int64_t g = 0; g < ng; ++g) {
        const float scale = load_scale(sc, g);
        const int64_t end = b + per;
        for (; b + 2 <= end; b += 2) {
          acc[0][0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(scale * xd[b]), acc[0][0]);
          odd = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(scale * xd[b + 1]), odd);
        }
        if (b < end) acc[0][0] = _mm256_fmadd_ps(block(b), _mm256_set1_ps(scale * xd[b]), acc[0][0]), ++b;
      }
    }
  } else {
    const int64_t per = group / QK;
    for (int64_t g = 0, b = 0; g < ng; ++g) {
      __m256 ws[NR];
      for (int r = 0; r < NR; ++r) ws[r] = _mm256_set1_ps(load_scale(sc, r * ng + g));
      for (int64_t end = b + per; b < end; ++b) {
        __m256i x0[MB], x1[MB];
        load_x<MB>(xq, K, b, x0, x1);
        for (int r = 0; r < NR; ++r) {
          __m256i w0, w1;
          load_block<BITS>(w + r * row_bytes, b, w0, w1);
          for (int i = 0; i < MB; ++i) {
            __m256i dot = block_dot(w0, w1, x0[i], x1[i]);
            __m256 f = _mm256_mul_ps(ws[r], _mm256_set1_ps(xd[i * nb + b]));
            acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), f, acc[r][i]);
          }
        }
      }
    }
  }
  if (NR * MB == 1) acc[0][0] = _mm256_add_ps(acc[0][0], odd);
  if (EXTRA)  // sum over groups of (min - scale * zero) * (sum of the group's activations), 8 groups at a time
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MB; ++i) extra[r][i] = offset_dot(sc + r * ng, mins ? mins + (n0 + r) * ng : nullptr, zero, xg + (m0 + i) * ng, ng);
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) out[(m0 + i) * N + n0 + r] = hsum8(acc[r][i]) + extra[r][i];
}

template <int NR, int MB, int BITS, typename S>
inline void tile(bool extra, const QuantisedRows& x, const float* xg, int64_t m0, int64_t K, const uint8_t* q, const S* scales,
                 const S* mins, int64_t group, float zero, float* out, int64_t N, int64_t n0) {
  if (extra) dot_tile<NR, MB, BITS, true>(x, xg, m0, K, q, scales, mins, group, zero, out, N, n0);
  else dot_tile<NR, MB, BITS, false>(x, xg, m0, K, q, scales, mins, group, zero, out, N, n0);
}

// All weight rows [t0, t1) against activation rows [m0, m0 + MB): NR rows at a time, then singly.
template <int NR, int MB, int BITS, typename S>
void rows(bool extra, const QuantisedRows& x, const float* xg, int64_t m0, int64_t K, const uint8_t* q, const S* scales, const S* mins,
          int64_t group, float zero, float* out, int64_t N, int64_t t0, int64_t t1) {
  int64_t n = t0;
  for (; n + NR <= t1; n += NR) tile<NR, MB, BITS>(extra, x, xg, m0, K, q, scales, mins, group, zero, out, N, n);
  for (; n < t1; ++n) tile<1, MB, BITS>(extra, x, xg, m0, K, q, scales, mins, group, zero, out, N, n);
}

// One weight matrix of a call: its buffers and scheme, and where its (M, N) result goes.
struct Weight {
  const uint8_t* q;
  const void* scales;
  const void* mins;
  bool half;
  int64_t bits, group, N;
  float zero;
  float* out;
  const float* xg;  // activation sums per weight group (M, K / group), for the zero and min terms; or null
};

template <int BITS, typename S>
void weight_rows(const Weight& w, const QuantisedRows& xq, int64_t M, int64_t K, int64_t t0, int64_t t1) {
  const S* scales = static_cast<const S*>(w.scales);
  const S* mins = static_cast<const S*>(w.mins);
  const bool extra = w.xg != nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
    switch (std::min(ROWS, M - m0)) {  // accumulators: 4, 4, 3, 4
      case 4: rows<1, 4, BITS>(extra, xq, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, t0, t1); break;
      case 3: rows<1, 3, BITS>(extra, xq, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, t0, t1); break;
      case 2: rows<2, 2, BITS>(extra, xq, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, t0, t1); break;
      default: rows<1, 1, BITS>(extra, xq, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, t0, t1); break;
    }
  }
}

// Every matrix against the same x, quantised once, in one parallel region: q, k and v (or gate
// and up) cost one call, one activation rounding and one thread wake-up instead of three.
void run(const float* x, int64_t M, int64_t K, std::vector<Weight>& ws) {
  const QuantisedRows& xq = quantise_rows(x, M, K);
  const int64_t nb = K / QK, n = static_cast<int64_t>(ws.size());
  // Per-call scratch in buffers that keep their capacity: the group sums, and where each matrix's
  // tiles start in the one numbering all threads draw from (first[i] .. first[i + 1]).
  thread_local std::vector<float> sums;
  thread_local std::vector<int64_t> first;
  first.assign(n + 1, 0);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    first[i + 1] = first[i] + (ws[i].N + WEIGHT_TILE - 1) / WEIGHT_TILE;
    if (ws[i].zero != 0.f || ws[i].mins) total += M * (K / ws[i].group);
  }
  sums.assign(total, 0.f);
  for (int64_t i = 0, at = 0; i < n; ++i) {
    Weight& w = ws[i];
    if (w.zero == 0.f && !w.mins) continue;
    const int64_t per = w.group / QK;
    float* xg = sums.data() + at;
    for (int64_t j = 0; j < M * nb; ++j) xg[j / per] += xq.s[j];
    w.xg = xg;
    at += M * (K / w.group);
  }
  // Threads take tiles from a shared counter rather than fixed halves: a thread that starts late
  // or streams slower would otherwise leave the other waiting at the end of every call.
  std::atomic<int64_t> next{0};
  const int64_t ntiles = first[n];
  const int64_t* starts = first.data();  // a local name for the workers, as in quantise_rows
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t t0; (t0 = next.fetch_add(TILES_TAKEN)) < ntiles;) {
      for (int64_t t = t0; t < std::min(t0 + TILES_TAKEN, ntiles); ++t) {
        int64_t i = 0;
        while (t >= starts[i + 1]) ++i;  // a handful of matrices: a scan beats a search
        const Weight& w = ws[i];
        const int64_t t0 = (t - starts[i]) * WEIGHT_TILE, t1 = std::min(t0 + WEIGHT_TILE, w.N);
        if (w.half) {
          if (w.bits == 4) weight_rows<4, at::Half>(w, xq, M, K, t0, t1);
          else if (w.bits == 6) weight_rows<6, at::Half>(w, xq, M, K, t0, t1);
          else weight_rows<8, at::Half>(w, xq, M, K, t0, t1);
        } else {
          if (w.bits == 4) weight_rows<4, float>(w, xq, M, K, t0, t1);
          else if (w.bits == 6) weight_rows<6, float>(w, xq, M, K, t0, t1);
          else weight_rows<8, float>(w, xq, M, K, t0, t1);
        }
      }
    }
  });
}

}  // namespace

// x: (..., K) float32; per matrix: q (N, K * bits / 8) bytes, scales and mins (N, K / group), group,
// zero, bits (8, 6 or 4). Returns one (..., N) float32 result per matrix.
std::vector<at::Tensor> qlinear(at::Tensor x, std::vector<at::Tensor> qs, std::vector<at::Tensor> scales,
                                   std::vector<c10::optional<at::Tensor>> mins, std::vector<int64_t> groups,
                                   std::vector<double> zeros, std::vector<int64_t> bits) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (..., K)");
  const size_t n = qs.size();
  TORCH_CHECK(scales.size() == n && mins.size() == n && groups.size() == n && zeros.size() == n && bits.size() == n, "one scheme per matrix");
  const int64_t K = x.size(-1), M = x.numel() / K;
  std::vector<Weight> ws;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &q = qs[i], &sc = scales[i];
    const int64_t N = q.size(0), group = groups[i];
    const int64_t b = bits[i];
    const bool has_min = mins[i].has_value() && mins[i]->defined();
    TORCH_CHECK(b == 4 || b == 6 || b == 8, "bits must be 4, 6 or 8");
    TORCH_CHECK(q.is_contiguous() && sc.is_contiguous(), "q and scales must be contiguous");
    TORCH_CHECK(K % QK == 0 && K % group == 0, "K must be a multiple of 32 and of the group");
    TORCH_CHECK(group % QK == 0 || (group == 16 && b != 4 && !has_min && zeros[i] == 0.0),
                "group must be a multiple of 32 (or 16 for plain 8- or 6-bit q)");
    TORCH_CHECK(q.size(1) == K * b / 8, "q has the wrong row length");
    TORCH_CHECK(sc.size(0) == N && sc.size(1) == K / group, "scales must be (N, K / group)");
    TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kFloat, "scales must be float32 or float16");
    if (has_min) TORCH_CHECK(mins[i]->sizes() == sc.sizes() && mins[i]->scalar_type() == sc.scalar_type(), "mins like scales");
    auto shape = x.sizes().vec();
    shape.back() = N;
    outs.push_back(at::empty(shape, x.options()));
    // load_block's q6 codes are q + 32: from 32 values a group on, the 32 joins the zero's term.
    const float zero = static_cast<float>(zeros[i]) + (b == 6 && group != 16 ? 32.f : 0.f);
    ws.push_back(Weight{reinterpret_cast<const uint8_t*>(q.data_ptr()), sc.data_ptr(), has_min ? mins[i]->data_ptr() : nullptr,
                        sc.scalar_type() == at::kHalf, b, group, N, zero, outs.back().data_ptr<float>(), nullptr});
  }
  run(x.data_ptr<float>(), M, K, ws);
  return outs;
}

