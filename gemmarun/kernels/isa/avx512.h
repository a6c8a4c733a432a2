// The AVX-512 layer (F, BW, VL, VNNI): one 512-bit register holds a whole block of 32 int16
// values, and vpdpwssd multiplies and sums their pairs in one instruction (AVX2's madd + add).
// Values are in natural order. Everything off the quantised matrix product (attention, norms,
// GeGLU, the int4 search) is the AVX2 layer's: memory-bound or minor, and already tested.
#pragma once
#include <immintrin.h>

#include "avx2.h"
#include "common.h"

namespace gemmarun_isa {

namespace avx512_detail {
// For value v of a q6 block: which 16-bit chunk of the high-bit word holds its two bits, and where.
struct HighBits {
  alignas(64) uint16_t chunk[QK];
  alignas(64) uint16_t shift[QK];
};
constexpr HighBits high_bits() {
  HighBits t{};
  for (int v = 0; v < QK; ++v) {
    t.chunk[v] = static_cast<uint16_t>(high_bit(v) / 16);
    t.shift[v] = static_cast<uint16_t>(high_bit(v) % 16);
  }
  return t;
}
constexpr HighBits kHighBits = high_bits();
}  // namespace avx512_detail

struct Avx512 : Avx2 {
  static constexpr const char* name = "avx512";

  using FAcc = __m512;
  using WBlock = __m512i;  // 32 int16
  using XBlock = __m512i;
  using IDot = __m512i;  // 16 int32 lanes of two products: lanes 0-7 values 0-15, lanes 8-15 values 16-31

  static FAcc facc_zero() { return _mm512_setzero_ps(); }
  static FAcc facc_add(FAcc a, FAcc b) { return _mm512_add_ps(a, b); }
  static float facc_sum(FAcc a) { return _mm512_reduce_add_ps(a); }

  static float quantise_block(const float* src, int16_t* dst, float* s) {
    const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
    const float a = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 32767.f / a : 0.f);
    const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtsepi32_epi16(i0));  // |code| <= 32767: no saturation
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm512_cvtsepi32_epi16(i1));
    const float d = a / 32767.f;
    *s = d * static_cast<float>(sum);
    return d;
  }

  static XBlock load_x(const int16_t* xq) { return _mm512_loadu_si512(xq); }

  template <int BITS>
  static WBlock load_block(const uint8_t* wrow, int64_t b) {
    constexpr int64_t bytes = QK * BITS / 8;
    const uint8_t* blk = wrow + b * bytes;
    if (BITS == 6 || (b * bytes) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH), _MM_HINT_T0);
    if (BITS == 8) return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
    // byte j: value j in the low nibble, value j + 16 in the high one
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)), nibble = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
    __m512i w = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
    if (BITS == 6) {
      // every value's 16-bit chunk of the top-bit word gathered to its lane, shifted down, masked
      int64_t bits;
      std::memcpy(&bits, blk + 16, sizeof bits);
      const __m512i word = _mm512_set1_epi64(bits);
      const __m512i chunk = _mm512_load_si512(avx512_detail::kHighBits.chunk);
      const __m512i shift = _mm512_load_si512(avx512_detail::kHighBits.shift);
      const __m512i top = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(chunk, word), shift), _mm512_set1_epi16(3));
      w = _mm512_or_si512(w, _mm512_slli_epi16(top, 4));
    }
    return w;
  }

  static void to_signed6(WBlock& w) { w = _mm512_sub_epi16(w, _mm512_set1_epi16(32)); }

  // |w| <= 255 and |x| <= 32767: each int32 lane sums two products, far from overflow.
  static IDot block_dot(const WBlock& w, const XBlock& x) { return _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x); }

  static FAcc fma_dot(FAcc acc, IDot d, float f) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(f), acc); }
  static FAcc fma_dot_at(FAcc acc, IDot d, const float* f) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_broadcastss_ps(_mm_load_ss(f)), acc);
  }
  static FAcc fma_dot_halves(FAcc acc, IDot d, float s0, float s1, float xd) {
    const __m512 s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), s), _mm512_set1_ps(xd), acc);
  }
};

}  // namespace gemmarun_isa
