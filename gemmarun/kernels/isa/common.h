// What every ISA layer shares: the 16-bit float types, scalar conversions, the q6 layout and
// the contract each layer implements. No PyTorch here: the layers build and are tested without it
// (tests/native/), so an ARM layer is checked under qemu on an x86 machine.
//
// An ISA layer is a struct of static functions with the same signatures in every variant:
//   FAcc                      float partial sums (a vector register, or one float in Generic)
//   facc_zero(), facc_add(a, b), facc_sum(a) -> float
//   quantise_block(src, dst, &s) -> d    32 floats -> int16 codes round(src / d), d = amax / 32767,
//                             s = d * sum(codes); dst in the layer's own order (load_x reads it back)
//   XBlock load_x(xq)         32 int16 activation codes as quantise_block stored them
//   WBlock load_block<BITS>(wrow, b)  block b of a weight row, widened to 16 bits in the matching
//                             order (q6 codes unsigned, 0..63); to_signed6(w) subtracts 32
//   IDot block_dot(w, x)      the 32 products, summed in int32 (exact)
//   fma_dot(acc, d, f)        acc + sum(d) * f
//   fma_dot_at(acc, d, p)     acc + sum(d) * *p, the factor broadcast from memory: a factor that
//                             sits in a vector register costs shuffles to broadcast (AVX2: two
//                             a block, 9% of int4 decoding on Zen 3), a load-broadcast none
//   fma_dot_halves(acc, d, s0, s1, xd)  acc + (sum of products 0-15 * s0 + of 16-31 * s1) * xd
//   scale_at(s, i), scale_products8(sc, xd, f): f[j] = sc[j] * xd[j] for j < 8
//   offset_dot(scales, mins, zero, xg, ng) = sum_g (mins[g] - scales[g] * zero) * xg[g]
//   dot(a, b, n), axpy(a, x, y, n)       float32 a, y against float32 / half / bfloat16 b, x
//   dots<Q>(a, b, n, out)     out[j] = dot(a, b[j], n) for j < Q, with dot's bits
//   axpys(p, x, m, y, n)      axpy(p[s], x[s], y, n) for s = 0 .. m - 1, with their bits
//   dense_order<T>(x, n, xp)  float32 x in the order dense_dots<Q, T> reads it (a copy, or a
//                             permutation that spares a shuffle per weight row)
//   dense_dots<Q, T>(xp, b, n, out)  out[j] = x . b[j] for Q dense float32 or bfloat16 weight
//                             rows, each with the bits it gets alone (Q = 1)
//   sum_squares(x, n), norm_row(x, inv, w, res, out, n): out = [res +] x * inv * (1 + w)
//   geglu_row(gate, up, out, n): gelu_tanh(gate) * up
//   group_stats / round_levels / weighted_error: the int4 search's passes over one group
// Results of a layer equal Generic's up to float32 summation order (the int16 codes are
// identical: every layer rounds x * (32767 / amax) to nearest even).
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gemmarun_isa {

constexpr int64_t QK = 32;  // activation and weight block
// Weights are fetched this many bytes ahead of use: one thread alone keeps too few cache misses in
// flight to stream (a 262k x 640 int8 GEMV: 10.0 -> 12.6 GB/s at 2 threads, 5.8 -> 7.4 at one, with
// 1024). 4096 covers more of a miss's latency at a thread's rate: that GEMV 15.7 -> 16.3 GB/s over
// 1024, 9216 x 2304 int8 14.9 -> 16.2, 4- and 6-bit level or better (AMD EPYC, family 23, 2 threads).
constexpr int64_t PREFETCH = 4096;

// IEEE binary16 and bfloat16 as their bits: layout-compatible with c10::Half and c10::BFloat16.
struct half {
  uint16_t x;
};
struct bfloat16 {
  uint16_t x;
};

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }
// a bfloat16 is the top half of a float32
inline float to_float(bfloat16 h) { return bits_float(uint32_t(h.x) << 16); }
// Exact binary16 -> float32 without hardware support (c10's fp16_ieee_to_fp32_value): normal
// numbers by moving the exponent and rescaling by 2^-112, subnormals through a magic bias.
inline float to_float(half h) {
  const uint32_t w = uint32_t(h.x) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(subnormal) : float_bits(normal)));
}

// q6 blocks: 16 bytes of low nibbles as q4 (byte j: value j low, value j + 16 high), then a 64-bit
// word of the codes' top two bits, at bit high_bit(v) for value v (quant/format.py's HIGH_BITS).
// That order follows AVX2's lanes (see isa/avx2.h): value v = 16 lane + 2 i + r keeps its bits in
// byte i, at bit 2 lane + 4 r, so widening the bytes to 16-bit fields puts field i's four values
// in one field. Other layers gather them from this table.
constexpr int high_bit(int v) {
  const int lane = v >> 4, i = (v >> 1) & 7, r = v & 1;
  return 8 * i + 2 * lane + 4 * r;
}

// GELU, tanh form, as x / (1 + e^(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3): 0.5 x (1 + tanh u)
// loses all precision for x below about -5, where 1 + tanh u cancels.
inline float gelu1(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.f + std::exp(-2.f * u));
}

// The int4 search's level count (4 bits: levels 0..15).
constexpr int kLevels = 15;

}  // namespace gemmarun_isa
