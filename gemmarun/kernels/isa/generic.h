// The scalar reference layer: plain C++ that compiles anywhere, the one every other layer is
// tested against (tests/native/, tests/test_kernel_variants.py). Values in natural order.
#pragma once
#include "common.h"

namespace gemmarun_isa {

struct Generic {
  static constexpr const char* name = "generic";

  using FAcc = float;
  struct WBlock {
    int16_t v[QK];
  };
  struct XBlock {
    const int16_t* v;
  };
  struct IDot {
    int32_t lo, hi;  // the products of values 0-15 and 16-31 (Q6_K's two scales per block)
  };

  static FAcc facc_zero() { return 0.f; }
  static FAcc facc_add(FAcc a, FAcc b) { return a + b; }
  static float facc_sum(FAcc a) { return a; }

  static float quantise_block(const float* src, int16_t* dst, float* s) {
    float a = 0.f;
    for (int64_t j = 0; j < QK; ++j) a = std::max(a, std::fabs(src[j]));
    const float inv = a > 0.f ? 32767.f / a : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < QK; ++j) {
      dst[j] = static_cast<int16_t>(std::nearbyint(src[j] * inv));  // to nearest even, as cvtps does
      sum += dst[j];
    }
    const float d = a / 32767.f;
    *s = d * static_cast<float>(sum);
    return d;
  }

  static XBlock load_x(const int16_t* xq) { return XBlock{xq}; }

  template <int BITS>
  static WBlock load_block(const uint8_t* wrow, int64_t b) {
    WBlock w;
    const uint8_t* blk = wrow + b * (QK * BITS / 8);
    if (BITS == 8) {
      for (int j = 0; j < QK; ++j) w.v[j] = static_cast<int8_t>(blk[j]);
    } else {
      for (int j = 0; j < 16; ++j) {
        w.v[j] = blk[j] & 0x0F;
        w.v[j + 16] = blk[j] >> 4;
      }
      if (BITS == 6) {
        uint64_t top;
        std::memcpy(&top, blk + 16, sizeof top);
        for (int v = 0; v < QK; ++v) w.v[v] = static_cast<int16_t>(w.v[v] | (((top >> high_bit(v)) & 3) << 4));
      }
    }
    return w;
  }

  static void to_signed6(WBlock& w) {
    for (int j = 0; j < QK; ++j) w.v[j] = static_cast<int16_t>(w.v[j] - 32);
  }

  static IDot block_dot(const WBlock& w, const XBlock& x) {
    IDot d{0, 0};
    for (int j = 0; j < 16; ++j) d.lo += int32_t(w.v[j]) * x.v[j];
    for (int j = 16; j < QK; ++j) d.hi += int32_t(w.v[j]) * x.v[j];
    return d;
  }

  static FAcc fma_dot(FAcc acc, IDot d, float f) { return acc + static_cast<float>(d.lo + d.hi) * f; }
  static FAcc fma_dot_at(FAcc acc, IDot d, const float* f) { return fma_dot(acc, d, *f); }
  static FAcc fma_dot_halves(FAcc acc, IDot d, float s0, float s1, float xd) {
    return acc + (static_cast<float>(d.lo) * s0 + static_cast<float>(d.hi) * s1) * xd;
  }

  template <typename S>
  static float scale_at(const S* s, int64_t i) { return to_float(s[i]); }

  template <typename S>
  static void scale_products8(const S* sc, const float* xd, float* f) {
    for (int j = 0; j < 8; ++j) f[j] = to_float(sc[j]) * xd[j];
  }

  template <typename S>
  static float offset_dot(const S* scales, const S* mins, float zero, const float* xg, int64_t ng) {
    float s = 0.f;
    for (int64_t g = 0; g < ng; ++g) s += ((mins ? to_float(mins[g]) : 0.f) - to_float(scales[g]) * zero) * xg[g];
    return s;
  }

  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  }

  template <int Q, typename T>
  static void dots(const float* a, const T* const* b, int64_t n, float* out) {
    for (int j = 0; j < Q; ++j) out[j] = dot(a, b[j], n);
  }

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
    for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
  }

  template <typename T>
  static void axpys(const float* p, const T* const* x, int64_t m, float* y, int64_t n) {
    for (int64_t s = 0; s < m; ++s) axpy(p[s], x[s], y, n);
  }

  static float sum_squares(const float* x, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
  }

  static void norm_row(const float* x, float inv, const float* w, const float* res, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = (res ? res[i] : 0.f) + x[i] * inv * (1.f + w[i]);
  }

  static void geglu_row(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = gelu1(gate[i]) * up[i];
  }

  // The int4 search over one group of n values: min, max, sum of weights, sum of weights * x.
  static void group_stats(const float* x, const float* wt, int n, float* lo, float* hi, float* sw, float* sx) {
    float l = x[0], h = x[0], a = 0.f, b = 0.f;
    for (int j = 0; j < n; ++j) {
      l = std::min(l, x[j]);
      h = std::max(h, x[j]);
      a += wt[j];
      b += wt[j] * x[j];
    }
    *lo = l, *hi = h, *sw = a, *sx = b;
  }

  // levels = clamp(round((x - lo) * inv), 0, 15) and their weighted sums: w l, w l^2, w l x.
  static void round_levels(const float* x, const float* wt, int n, float lo, float inv, float* levels, float* sl,
                           float* sl2, float* sxl) {
    float a = 0.f, b = 0.f, c = 0.f;
    for (int j = 0; j < n; ++j) {
      const float l = std::min(std::max(std::nearbyint((x[j] - lo) * inv), 0.f), float(kLevels));
      levels[j] = l;
      a += wt[j] * l;
      b += wt[j] * l * l;
      c += wt[j] * l * x[j];
    }
    *sl = a, *sl2 = b, *sxl = c;
  }

  // sum of wt (s levels + m - x)^2
  static float weighted_error(const float* x, const float* wt, const float* levels, int n, float s, float m) {
    float e = 0.f;
    for (int j = 0; j < n; ++j) {
      const float d = s * levels[j] + m - x[j];
      e += wt[j] * d * d;
    }
    return e;
  }
};

}  // namespace gemmarun_isa
