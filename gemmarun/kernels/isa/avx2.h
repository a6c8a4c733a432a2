// The AVX2 layer (AVX2 + FMA + F16C): 8 float32 lanes, int16 products summed by madd.
#pragma once
#include <immintrin.h>

#include "common.h"

namespace gemmarun_isa {

struct Avx2 {
  static constexpr const char* name = "avx2";

  using FAcc = __m256;
  struct WBlock {
    __m256i w0, w1;
  };
  struct XBlock {
    __m256i x0, x1;
  };
  using IDot = __m256i;  // eight int32 lanes of four products: the low 128 bits values 0-15, the high 16-31

  // Sum of the eight float32 lanes.
  static float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }

  static int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }

  // Eight values widened to float32: a bfloat16 is the top half of a float32.
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load8(const half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m256 load8(const bfloat16* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }

  static FAcc facc_zero() { return _mm256_setzero_ps(); }
  static FAcc facc_add(FAcc a, FAcc b) { return _mm256_add_ps(a, b); }
  static float facc_sum(FAcc a) { return hsum8(a); }

  // Codes stored in load_block's order: per 16 values, the even ones of the first eight and of the
  // second eight, then the odd ones (see load_block).
  static float quantise_block(const float* src, int16_t* dst, float* s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
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
    for (int j = 0; j < 8; ++j) {
      dst[j] = vals[2 * j];
      dst[8 + j] = vals[16 + 2 * j];
      dst[16 + j] = vals[2 * j + 1];
      dst[24 + j] = vals[17 + 2 * j];
    }
    float d = a / 32767.f;
    *s = d * static_cast<float>(sum);
    return d;
  }

  // load_block's order: the even values in x0, the odd ones in x1.
  static XBlock load_x(const int16_t* xq) {
    return XBlock{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16))};
  }

  // 32 weights widened to int16 without crossing 128-bit lanes: w0 holds values 0, 2, .., 14 then
  // 16, 18, .., 30, and w1 the odd ones, the order quantise_block stores activations in. Both lanes
  // of a register then hold the values of one half block (which Q6_K's two scales need). A 16-bit
  // word of the weights holds two consecutive int8 values, or four 4-bit ones (values 2j, 2j + 16,
  // 2j + 1, 2j + 17 from the low nibble up): shifts and a mask pick each out in place, where
  // sign- or zero-extending half a register (vpmovsxbw) is a lane-crossing instruction.
  //
  // 4-bit codes: the 16 bytes in the low lane and a copy shifted right by 4 in the high one, so
  // one mask gives w0 (nibble 0 | nibble 1) and a shift by 8 then the mask w1 (nibble 2 | 3).
  // Immediate shifts only: the per-lane variable shifts (vpsrlvq) this replaced cost a fifth of
  // a 4-bit block on the EPYC here.
  // q6 codes (q + 32) take their top two bits from byte i of the 64-bit word for field i of each
  // lane (isa/common.h's high_bit): the bytes widened to 16-bit fields, shifted left by 4 in the
  // low lane and by 2 in the high one, give w0's bits under the mask 0x30 and, shifted right by
  // 4, w1's. The codes come back unsigned (0..63): callers count the 32 in the zero.
  template <int BITS>
  static WBlock load_block(const uint8_t* wrow, int64_t b) {
    constexpr int64_t bytes = QK * BITS / 8;
    WBlock r;
    // 24-byte q6 blocks do not tile cache lines: every block prefetches (one more instruction).
    if (BITS == 6 || (b * bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + b * bytes + PREFETCH), _MM_HINT_T0);
    if (BITS != 8) {
      const __m256i nibble = _mm256_set1_epi16(0x000F);
      const uint8_t* blk = wrow + b * bytes;
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
      const __m256i y = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
      r.w0 = _mm256_and_si256(y, nibble);
      r.w1 = _mm256_and_si256(_mm256_srli_epi16(y, 8), nibble);
      if (BITS == 6) {
        const __m256i top = _mm256_set1_epi16(0x0030);
        const __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 16)));
        const __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_slli_epi16(h, 4)), _mm_slli_epi16(h, 2), 1);
        r.w0 = _mm256_or_si256(r.w0, _mm256_and_si256(t, top));
        r.w1 = _mm256_or_si256(r.w1, _mm256_and_si256(_mm256_srli_epi16(t, 4), top));
      }
    } else {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * QK));
      r.w0 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
      r.w1 = _mm256_srai_epi16(v, 8);
    }
    return r;
  }

  static void to_signed6(WBlock& w) {
    w.w0 = _mm256_sub_epi16(w.w0, _mm256_set1_epi16(32));
    w.w1 = _mm256_sub_epi16(w.w1, _mm256_set1_epi16(32));
  }

  // |w| <= 255 and |x| <= 32767: each int32 lane sums four products, far from overflow.
  static IDot block_dot(const WBlock& w, const XBlock& x) {
    return _mm256_add_epi32(_mm256_madd_epi16(w.w0, x.x0), _mm256_madd_epi16(w.w1, x.x1));
  }

  static FAcc fma_dot(FAcc acc, IDot d, float f) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(f), acc); }
  static FAcc fma_dot_at(FAcc acc, IDot d, const float* f) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(f), acc); }
  // the low lane sums values 0-15 (first scale), the high lane 16-31 (second scale)
  static FAcc fma_dot_halves(FAcc acc, IDot d, float s0, float s1, float xd) {
    const __m256 s = _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
    return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), s), _mm256_set1_ps(xd), acc);
  }

  static float scale_at(const float* s, int64_t i) { return s[i]; }
  static float scale_at(const half* s, int64_t i) { return _cvtsh_ss(s[i].x); }

  template <typename S>
  static void scale_products8(const S* sc, const float* xd, float* f) {
    _mm256_storeu_ps(f, _mm256_mul_ps(load8(sc), _mm256_loadu_ps(xd)));
  }

  // sum_g (mins[g] - scales[g] * zero) * xg[g]: the weights' offset terms against the group sums.
  template <typename S>
  static float offset_dot(const S* scales, const S* mins, float zero, const float* xg, int64_t ng) {
    __m256 acc = _mm256_setzero_ps(), z = _mm256_set1_ps(zero);
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
      __m256 off = _mm256_mul_ps(load8(scales + g), z);
      off = mins ? _mm256_sub_ps(load8(mins + g), off) : _mm256_sub_ps(_mm256_setzero_ps(), off);
      acc = _mm256_fmadd_ps(off, _mm256_loadu_ps(xg + g), acc);
    }
    float s = hsum8(acc);
    for (; g < ng; ++g) s += ((mins ? scale_at(mins, g) : 0.f) - scale_at(scales, g) * zero) * xg[g];
    return s;
  }

  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  }

  // Q dots of a against b[0..Q), each summed as dot() sums it: Q chains hide the FMA latency that
  // bounds one (a 256-wide score was ~160 cycles alone), and a is loaded once for all of them.
  template <int Q, typename T>
  static void dots(const float* a, const T* const* b, int64_t n, float* out) {
    __m256 acc[Q];
    for (int j = 0; j < Q; ++j) acc[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(a + i);
      for (int j = 0; j < Q; ++j) acc[j] = _mm256_fmadd_ps(x, load8(b[j] + i), acc[j]);
    }
    for (int j = 0; j < Q; ++j) {
      float s = hsum8(acc[j]);
      for (int64_t r = i; r < n; ++r) s += a[r] * to_float(b[j][r]);
      out[j] = s;
    }
  }

  // Dense weight rows (src/dense.cpp). bfloat16 weights widen by interleaving with zeros: unpacklo
  // / unpackhi of 16 values give the float32 lanes 0-3, 8-11 and 4-7, 12-15 (in-lane shuffles, one
  // per 8 weights), where load8's zero-extend and shift cost two; x is stored in that order once a
  // call instead of permuted for every row. A 9216 x 2304 bf16 GEMV on 2 threads: 13.2 -> 17.8
  // GB/s (AMD EPYC, family 23). Two chains per row: FMA latency would bound one.
  template <typename T>
  static void dense_order(const float* x, int64_t n, float* xp) {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, bfloat16>)
      for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; ++j) {
          xp[i + j] = x[i + j], xp[i + 4 + j] = x[i + 8 + j];
          xp[i + 8 + j] = x[i + 4 + j], xp[i + 12 + j] = x[i + 12 + j];
        }
    std::copy(x + i, x + n, xp + i);
  }

  template <int Q, typename T>
  static void dense_dots(const float* xp, const T* const* b, int64_t n, float* out) {
    if constexpr (!std::is_same_v<T, bfloat16>) {
      dots<Q>(xp, b, n, out);
      return;
    }
    __m256 acc0[Q], acc1[Q];
    for (int j = 0; j < Q; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(xp + i), x1 = _mm256_loadu_ps(xp + i + 8);
      for (int j = 0; j < Q; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[j] + i));
        acc0[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), x0, acc0[j]);
        acc1[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), x1, acc1[j]);
      }
    }
    for (int j = 0; j < Q; ++j) {
      float s = hsum8(_mm256_add_ps(acc0[j], acc1[j]));
      for (int64_t r = i; r < n; ++r) s += xp[r] * to_float(b[j][r]);
      out[j] = s;
    }
  }

  template <typename T>
  static void axpy(float a, const T* x, float* y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * to_float(x[i]);
  }

  // y += p[0] x[0] + .. + p[m - 1] x[m - 1], term by term as m axpy calls add them, with 64
  // elements of y held in registers across the terms instead of loaded and stored for each.
  template <typename T>
  static void axpys(const float* p, const T* const* x, int64_t m, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(y + i + 8 * c);
      for (int64_t s = 0; s < m; ++s) {
        const __m256 va = _mm256_broadcast_ss(p + s);
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(va, load8(x[s] + i + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + i + 8 * c, acc[c]);
    }
    for (; i + 8 <= n; i += 8) {
      __m256 acc = _mm256_loadu_ps(y + i);
      for (int64_t s = 0; s < m; ++s) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + s), load8(x[s] + i), acc);
      _mm256_storeu_ps(y + i, acc);
    }
    for (; i < n; ++i)
      for (int64_t s = 0; s < m; ++s) y[i] += p[s] * to_float(x[s][i]);
  }

  static float sum_squares(const float* x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      __m256 v = _mm256_loadu_ps(x + c);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum8(acc);
    for (; c < n; ++c) ss += x[c] * x[c];
    return ss;
  }

  static void norm_row(const float* x, float inv, const float* w, const float* res, float* out, int64_t n) {
    const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c), vinv), _mm256_add_ps(one, _mm256_loadu_ps(w + c)));
      _mm256_storeu_ps(out + c, res ? _mm256_add_ps(_mm256_loadu_ps(res + c), y) : y);
    }
    for (; c < n; ++c) out[c] = (res ? res[c] : 0.f) + x[c] * inv * (1.f + w[c]);
  }

  // e^x for float32 lanes, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
  // e^r and 2^n built in the exponent bits; within 2 ulp of expf over the clamped range.
  static __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));  // 2^n stays a normal float
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln2 in two parts, so n * ln2 is subtracted without rounding away r's low bits
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
  }

  // GELU, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
  static __m256 gelu8(__m256 x) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), u));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
  }

  static void geglu_row(const float* gate, const float* up, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
    for (; i < n; ++i) out[i] = gelu1(gate[i]) * up[i];
  }

  // The int4 search's passes: n is a multiple of 8 (the search checks), sums in float32 lanes.
  static __m256 round_levels8(__m256 x, __m256 lo, __m256 inv) {
    const __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, lo), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(l, _mm256_setzero_ps()), _mm256_set1_ps(float(kLevels)));
  }

  static void group_stats(const float* x, const float* wt, int n, float* lo, float* hi, float* sw, float* sx) {
    __m256 vlo = _mm256_loadu_ps(x), vhi = vlo, vsw = _mm256_setzero_ps(), vsx = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j), w = _mm256_loadu_ps(wt + j);
      vlo = _mm256_min_ps(vlo, v);
      vhi = _mm256_max_ps(vhi, v);
      vsw = _mm256_add_ps(vsw, w);
      vsx = _mm256_fmadd_ps(w, v, vsx);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vlo);
    *lo = *std::min_element(lanes, lanes + 8);
    _mm256_storeu_ps(lanes, vhi);
    *hi = *std::max_element(lanes, lanes + 8);
    *sw = hsum8(vsw), *sx = hsum8(vsx);
  }

  static void round_levels(const float* x, const float* wt, int n, float lo, float inv, float* levels, float* sl,
                           float* sl2, float* sxl) {
    const __m256 vlo = _mm256_set1_ps(lo), vinv = _mm256_set1_ps(inv);
    __m256 vsl = _mm256_setzero_ps(), vsl2 = _mm256_setzero_ps(), vsxl = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j), w = _mm256_loadu_ps(wt + j), l = round_levels8(v, vlo, vinv);
      _mm256_storeu_ps(levels + j, l);
      const __m256 wl = _mm256_mul_ps(w, l);
      vsl = _mm256_add_ps(vsl, wl);
      vsl2 = _mm256_fmadd_ps(wl, l, vsl2);
      vsxl = _mm256_fmadd_ps(wl, v, vsxl);
    }
    *sl = hsum8(vsl), *sl2 = hsum8(vsl2), *sxl = hsum8(vsxl);
  }

  static float weighted_error(const float* x, const float* wt, const float* levels, int n, float s, float m) {
    __m256 e = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_loadu_ps(levels + j), _mm256_set1_ps(m)), _mm256_loadu_ps(x + j));
      e = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(wt + j), d), d, e);
    }
    return hsum8(e);
  }
};

}  // namespace gemmarun_isa
