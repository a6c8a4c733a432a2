// The ARM NEON layer (AArch64 Advanced SIMD): 4 float32 lanes, int16 products widened and summed
// by vmlal into int32. dotprod's sdot multiplies int8 by int8, and the activations here are int16
// (int8 costs up to ~0.7 in the 270M's logits, see qlinear.cpp), so it has no part in this layer.
// Values are in natural order. The int4 search (a once-per-quantisation pass) is Generic's.
#pragma once
#include <arm_neon.h>

#include "common.h"
#include "generic.h"

namespace gemmarun_isa {

namespace neon_detail {
// For value v of a q6 block: the byte of the top-bit word holding its two bits, and minus their
// bit offset (vshlq shifts right by a negative count).
struct HighBits {
  uint8_t byte[QK];
  int8_t shift[QK];
};
constexpr HighBits high_bits() {
  HighBits t{};
  for (int v = 0; v < QK; ++v) {
    t.byte[v] = static_cast<uint8_t>(high_bit(v) / 8);
    t.shift[v] = static_cast<int8_t>(-(high_bit(v) % 8));
  }
  return t;
}
constexpr HighBits kHighBits = high_bits();
}  // namespace neon_detail

struct Neon : Generic {
  static constexpr const char* name = "neon";

  using FAcc = float32x4_t;
  struct WBlock {
    int16x8_t w[4];  // values 0-7, 8-15, 16-23, 24-31
  };
  struct XBlock {
    int16x8_t x[4];
  };
  struct IDot {
    int32x4_t lo, hi;  // values 0-15, 16-31
  };

  static float32x4_t load4(const float* p) { return vld1q_f32(p); }
  static float32x4_t load4(const half* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
  }
  static float32x4_t load4(const bfloat16* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
  }

  static FAcc facc_zero() { return vdupq_n_f32(0.f); }
  static FAcc facc_add(FAcc a, FAcc b) { return vaddq_f32(a, b); }
  static float facc_sum(FAcc a) { return vaddvq_f32(a); }

  static float quantise_block(const float* src, int16_t* dst, float* s) {
    float32x4_t v[8];
    float32x4_t amax = vdupq_n_f32(0.f);
    for (int j = 0; j < 8; ++j) {
      v[j] = vld1q_f32(src + 4 * j);
      amax = vmaxq_f32(amax, vabsq_f32(v[j]));
    }
    const float a = vmaxvq_f32(amax);
    const float inv = a > 0.f ? 32767.f / a : 0.f;
    int32x4_t sum = vdupq_n_s32(0);
    for (int j = 0; j < 8; j += 2) {
      const int32x4_t i0 = vcvtnq_s32_f32(vmulq_n_f32(v[j], inv)), i1 = vcvtnq_s32_f32(vmulq_n_f32(v[j + 1], inv));  // to nearest even
      sum = vaddq_s32(sum, vaddq_s32(i0, i1));
      vst1q_s16(dst + 4 * j, vcombine_s16(vqmovn_s32(i0), vqmovn_s32(i1)));
    }
    const float d = a / 32767.f;
    *s = d * static_cast<float>(vaddvq_s32(sum));
    return d;
  }

  static XBlock load_x(const int16_t* xq) { return XBlock{{vld1q_s16(xq), vld1q_s16(xq + 8), vld1q_s16(xq + 16), vld1q_s16(xq + 24)}}; }

  template <int BITS>
  static WBlock load_block(const uint8_t* wrow, int64_t b) {
    constexpr int64_t bytes = QK * BITS / 8;
    const uint8_t* blk = wrow + b * bytes;
    if (BITS == 6 || (b * bytes) % 64 == 0) __builtin_prefetch(blk + PREFETCH);
    WBlock r;
    if (BITS == 8) {
      const int8x16_t a = vld1q_s8(reinterpret_cast<const int8_t*>(blk)), c = vld1q_s8(reinterpret_cast<const int8_t*>(blk + 16));
      r.w[0] = vmovl_s8(vget_low_s8(a)), r.w[1] = vmovl_high_s8(a);
      r.w[2] = vmovl_s8(vget_low_s8(c)), r.w[3] = vmovl_high_s8(c);
      return r;
    }
    const uint8x16_t v = vld1q_u8(blk);
    uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(v, 4);  // values 0-15, 16-31
    if (BITS == 6) {
      const uint8x16_t word = vcombine_u8(vld1_u8(blk + 16), vdup_n_u8(0)), three = vdupq_n_u8(3);
      const uint8x16_t b0 = vqtbl1q_u8(word, vld1q_u8(neon_detail::kHighBits.byte));
      const uint8x16_t b1 = vqtbl1q_u8(word, vld1q_u8(neon_detail::kHighBits.byte + 16));
      const uint8x16_t t0 = vandq_u8(vshlq_u8(b0, vld1q_s8(neon_detail::kHighBits.shift)), three);
      const uint8x16_t t1 = vandq_u8(vshlq_u8(b1, vld1q_s8(neon_detail::kHighBits.shift + 16)), three);
      lo = vorrq_u8(lo, vshlq_n_u8(t0, 4));
      hi = vorrq_u8(hi, vshlq_n_u8(t1, 4));
    }
    r.w[0] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))), r.w[1] = vreinterpretq_s16_u16(vmovl_high_u8(lo));
    r.w[2] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))), r.w[3] = vreinterpretq_s16_u16(vmovl_high_u8(hi));
    return r;
  }

  static void to_signed6(WBlock& w) {
    for (auto& v : w.w) v = vsubq_s16(v, vdupq_n_s16(32));
  }

  // |w| <= 255 and |x| <= 32767: each int32 lane sums four products, far from overflow.
  static IDot block_dot(const WBlock& w, const XBlock& x) {
    int32x4_t lo = vmull_s16(vget_low_s16(w.w[0]), vget_low_s16(x.x[0]));
    lo = vmlal_high_s16(lo, w.w[0], x.x[0]);
    lo = vmlal_s16(lo, vget_low_s16(w.w[1]), vget_low_s16(x.x[1]));
    lo = vmlal_high_s16(lo, w.w[1], x.x[1]);
    int32x4_t hi = vmull_s16(vget_low_s16(w.w[2]), vget_low_s16(x.x[2]));
    hi = vmlal_high_s16(hi, w.w[2], x.x[2]);
    hi = vmlal_s16(hi, vget_low_s16(w.w[3]), vget_low_s16(x.x[3]));
    hi = vmlal_high_s16(hi, w.w[3], x.x[3]);
    return IDot{lo, hi};
  }

  static FAcc fma_dot(FAcc acc, IDot d, float f) { return vfmaq_n_f32(acc, vcvtq_f32_s32(vaddq_s32(d.lo, d.hi)), f); }
  static FAcc fma_dot_at(FAcc acc, IDot d, const float* f) { return fma_dot(acc, d, *f); }
  static FAcc fma_dot_halves(FAcc acc, IDot d, float s0, float s1, float xd) {
    const float32x4_t t = vfmaq_n_f32(vmulq_n_f32(vcvtq_f32_s32(d.lo), s0), vcvtq_f32_s32(d.hi), s1);
    return vfmaq_n_f32(acc, t, xd);
  }

  template <typename S>
  static void scale_products8(const S* sc, const float* xd, float* f) {
    vst1q_f32(f, vmulq_f32(load4(sc), vld1q_f32(xd)));
    vst1q_f32(f + 4, vmulq_f32(load4(sc + 4), vld1q_f32(xd + 4)));
  }

  template <typename S>
  static float offset_dot(const S* scales, const S* mins, float zero, const float* xg, int64_t ng) {
    float32x4_t acc = vdupq_n_f32(0.f);
    int64_t g = 0;
    for (; g + 4 <= ng; g += 4) {
      const float32x4_t off = vmulq_n_f32(load4(scales + g), zero);
      acc = vfmaq_f32(acc, mins ? vsubq_f32(load4(mins + g), off) : vnegq_f32(off), vld1q_f32(xg + g));
    }
    float s = vaddvq_f32(acc);
    for (; g < ng; ++g) s += ((mins ? to_float(mins[g]) : 0.f) - to_float(scales[g]) * zero) * xg[g];
    return s;
  }

  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = acc0;  // two chains: FMA latency would bound one
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), load4(b + i));
      acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), load4(b + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  }

  // Q dots of a against b[0..Q), each summed as dot() sums it (see Avx2::dots)
  template <int Q, typename T>
  static void dots(const float* a, const T* const* b, int64_t n, float* out) {
    float32x4_t acc0[Q], acc1[Q];
    for (int j = 0; j < Q; ++j) acc0[j] = acc1[j] = vdupq_n_f32(0.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const float32x4_t x0 = vld1q_f32(a + i), x1 = vld1q_f32(a + i + 4);
      for (int j = 0; j < Q; ++j) {
        acc0[j] = vfmaq_f32(acc0[j], x0, load4(b[j] + i));
        acc1[j] = vfmaq_f32(acc1[j], x1, load4(b[j] + i + 4));
      }
    }
    for (int j = 0; j < Q; ++j) {
      float s = vaddvq_f32(vaddq_f32(acc0[j], acc1[j]));
      for (int64_t r = i; r < n; ++r) s += a[r] * to_float(b[j][r]);
      out[j] = s;
    }
  }

  // Dense rows through dots (the layer's own; Generic's would be scalar): vshll widens bfloat16
  // in order, so x needs no permutation.
  template <typename T>
  static void dense_order(const float* x, int64_t n, float* xp) {
    std::copy_n(x, n, xp);
  }

  template <int Q, typename T>
  static void dense_dots(const float* xp, const T* const* b, int64_t n, float* out) {
    dots<Q>(xp, b, n, out);
  }

  template <typename T>
  static void axpy(float a, const T* x, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), load4(x + i), a));
    for (; i < n; ++i) y[i] += a * to_float(x[i]);
  }

  // y += p[0] x[0] + .. + p[m - 1] x[m - 1], term by term as m axpy calls (see Avx2::axpys)
  template <typename T>
  static void axpys(const float* p, const T* const* x, int64_t m, float* y, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      float32x4_t acc[16];
      for (int c = 0; c < 16; ++c) acc[c] = vld1q_f32(y + i + 4 * c);
      for (int64_t s = 0; s < m; ++s)
        for (int c = 0; c < 16; ++c) acc[c] = vfmaq_n_f32(acc[c], load4(x[s] + i + 4 * c), p[s]);
      for (int c = 0; c < 16; ++c) vst1q_f32(y + i + 4 * c, acc[c]);
    }
    for (; i + 4 <= n; i += 4) {
      float32x4_t acc = vld1q_f32(y + i);
      for (int64_t s = 0; s < m; ++s) acc = vfmaq_n_f32(acc, load4(x[s] + i), p[s]);
      vst1q_f32(y + i, acc);
    }
    for (; i < n; ++i)
      for (int64_t s = 0; s < m; ++s) y[i] += p[s] * to_float(x[s][i]);
  }

  static float sum_squares(const float* x, int64_t n) {
    float32x4_t acc = vdupq_n_f32(0.f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float32x4_t v = vld1q_f32(x + i);
      acc = vfmaq_f32(acc, v, v);
    }
    float s = vaddvq_f32(acc);
    for (; i < n; ++i) s += x[i] * x[i];
    return s;
  }

  static void norm_row(const float* x, float inv, const float* w, const float* res, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float32x4_t y = vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), inv), vaddq_f32(vdupq_n_f32(1.f), vld1q_f32(w + i)));
      vst1q_f32(out + i, res ? vaddq_f32(vld1q_f32(res + i), y) : y);
    }
    for (; i < n; ++i) out[i] = (res ? res[i] : 0.f) + x[i] * inv * (1.f + w[i]);
  }

  // e^x, the AVX2 layer's Cephes polynomial (see exp8 there).
  static float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    x = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
    y = vaddq_f32(vfmaq_f32(x, y, vmulq_f32(x, x)), vdupq_n_f32(1.f));
    const int32x4_t pow2 = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(pow2));
  }

  static void geglu_row(const float* gate, const float* up, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float32x4_t x = vld1q_f32(gate + i);
      const float32x4_t u = vmulq_n_f32(vfmaq_f32(x, vdupq_n_f32(0.044715f), vmulq_f32(vmulq_f32(x, x), x)), 0.7978845608028654f);
      const float32x4_t g = vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.f), exp4(vmulq_n_f32(u, -2.f))));
      vst1q_f32(out + i, vmulq_f32(g, vld1q_f32(up + i)));
    }
    for (; i < n; ++i) out[i] = gelu1(gate[i]) * up[i];
  }
};

}  // namespace gemmarun_isa
