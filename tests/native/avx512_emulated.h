// The AVX-512 intrinsics that gemmarun/kernels/isa/avx512.h uses, run on a CPU without AVX-512:
// SIMDe's portable implementations (Debian's libsimde-dev), each 512-bit value two AVX2 halves,
// so the AVX-512 layer's logic (lane orders, the q6 high-bit gather, VNNI's pair sums, the
// saturating packs) is checked against the Generic layer on every x86 machine, not only on the
// ones that have the flags. Forced in ahead of the layer by tests/test_kernel_native.py:
//   g++ -mavx2 -mfma -mf16c -DGEMMARUN_ISA_AVX512 -include avx512_emulated.h primitives_test.cpp
// It checks what the code computes, not its speed; where the CPU has AVX-512 the same program is
// built natively too.
#pragma once
#include <immintrin.h>  // first: its own __m512 typedefs come before the names below take them over

#include <simde/x86/avx512.h>

namespace avx512_emulated {
// The few that SIMDe 0.7 (Debian 12) lacks, on the two 256-bit halves.
inline simde__m256i half_of(simde__m512i a, int h) { return simde__m512i_to_private(a).m256i[h]; }
inline simde__m256 half_of(simde__m512 a, int h) { return simde__m512_to_private(a).m256[h]; }
inline simde__m512 join(__m256 lo, __m256 hi) {
  simde__m512_private r;
  r.m256[0] = lo, r.m256[1] = hi;
  return simde__m512_from_private(r);
}
inline simde__m512i join(__m256i lo, __m256i hi) {
  simde__m512i_private r;
  r.m256i[0] = lo, r.m256i[1] = hi;
  return simde__m512i_from_private(r);
}
inline simde__m512 cvtepi32_ps(simde__m512i a) { return join(_mm256_cvtepi32_ps(half_of(a, 0)), _mm256_cvtepi32_ps(half_of(a, 1))); }
// the one rounding avx512.h asks for: to nearest even, as cvtps under the default MXCSR
inline simde__m512i cvt_roundps_epi32(simde__m512 a, int rounding) {
  if (rounding != (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) __builtin_trap();
  return join(_mm256_cvtps_epi32(half_of(a, 0)), _mm256_cvtps_epi32(half_of(a, 1)));
}
inline simde__m512i cvtepu8_epi16(__m256i a) {
  return join(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1)));
}
// Reductions in GCC's order (avx512fintrin.h): halves, then quarters, then pairs, then the two
// lanes left, so a sum has the bits the native build gives it.
inline __m128 reduce4(__m256 v, __m128 (*op)(__m128, __m128)) {
  const __m128 q = op(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  const __m128 p = op(q, _mm_shuffle_ps(q, q, 0x4E));  // lanes 2, 3, 0, 1
  return op(p, _mm_shuffle_ps(p, p, 0xB1));  // lane 0 now op(lane 0, lane 1)
}
inline float reduce_add_ps(simde__m512 a) {
  return _mm_cvtss_f32(reduce4(_mm256_add_ps(half_of(a, 1), half_of(a, 0)), [](__m128 x, __m128 y) { return _mm_add_ps(x, y); }));
}
inline float reduce_max_ps(simde__m512 a) {
  return _mm_cvtss_f32(reduce4(_mm256_max_ps(half_of(a, 1), half_of(a, 0)), [](__m128 x, __m128 y) { return _mm_max_ps(x, y); }));
}
inline int reduce_add_epi32(simde__m512i a) {
  const __m256i s = _mm256_add_epi32(half_of(a, 1), half_of(a, 0));
  __m128i q = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1));
  return _mm_cvtsi128_si32(q);
}
}  // namespace avx512_emulated

#define __m512 simde__m512
#define __m512i simde__m512i
#define _mm512_abs_ps simde_mm512_abs_ps
#define _mm512_add_epi32 simde_mm512_add_epi32
#define _mm512_add_ps simde_mm512_add_ps
#define _mm512_and_si512 simde_mm512_and_si512
#define _mm512_broadcastss_ps simde_mm512_broadcastss_ps
#define _mm512_cvt_roundps_epi32 avx512_emulated::cvt_roundps_epi32
#define _mm512_cvtepi32_ps avx512_emulated::cvtepi32_ps
#define _mm512_cvtepi8_epi16 simde_mm512_cvtepi8_epi16
#define _mm512_cvtepu8_epi16 avx512_emulated::cvtepu8_epi16
#define _mm512_cvtsepi32_epi16 simde_mm512_cvtsepi32_epi16
#define _mm512_dpwssd_epi32 simde_mm512_dpwssd_epi32
#define _mm512_fmadd_ps simde_mm512_fmadd_ps
#define _mm512_load_si512 simde_mm512_load_si512
#define _mm512_loadu_ps simde_mm512_loadu_ps
#define _mm512_loadu_si512 simde_mm512_loadu_si512
#define _mm512_mask_blend_ps simde_mm512_mask_blend_ps
#define _mm512_max_ps simde_mm512_max_ps
#define _mm512_mul_ps simde_mm512_mul_ps
#define _mm512_or_si512 simde_mm512_or_si512
#define _mm512_permutexvar_epi16 simde_mm512_permutexvar_epi16
#define _mm512_reduce_add_epi32 avx512_emulated::reduce_add_epi32
#define _mm512_reduce_add_ps avx512_emulated::reduce_add_ps
#define _mm512_reduce_max_ps avx512_emulated::reduce_max_ps
#define _mm512_set1_epi16 simde_mm512_set1_epi16
#define _mm512_set1_epi64 simde_mm512_set1_epi64
#define _mm512_set1_ps simde_mm512_set1_ps
#define _mm512_setzero_ps simde_mm512_setzero_ps
#define _mm512_setzero_si512 simde_mm512_setzero_si512
#define _mm512_slli_epi16 simde_mm512_slli_epi16
#define _mm512_srlv_epi16 simde_mm512_srlv_epi16
#define _mm512_sub_epi16 simde_mm512_sub_epi16
