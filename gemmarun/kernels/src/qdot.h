// The quantised matrix product's ISA-free core: activation rows against tiles of weight rows,
// written once over an ISA layer I (isa/*.h). No PyTorch here: qlinear.cpp adds the threads and
// the tensor checks, and tests/native/ runs this core on every layer against Generic.
//
// y[m, n] = sum_k x[m, k] * w[n, k], with w[n, k] = scale[n, g] * (q[n, k] - zero) + min[n, g],
// g = k / group. Decoding reads every weight once per token; converting each weight to float32
// and multiplying with FMA is compute-bound at about 1.5 weights per cycle (AVX2), below what
// memory delivers. So x is quantised to int16 in blocks of 32 (one float32 scale each) and each
// block of 32 weights costs a couple of integer multiply-adds per activation row.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../isa/common.h"

namespace gemmarun_isa {

constexpr int64_t ROWS = 4;  // activation rows sharing each weight load

// Activations as int16 blocks: q (M, K) in the layer's order, d (M, K / 32) scales, s (M, K / 32)
// = d * sum(q), the block sums the zero and min terms need (taken from q, so they cancel its
// rounding). int16 keeps the relative error near 1e-5 where int8 (ggml's Q8_0) costs up to ~0.7
// in the 270M's logits, for one more widening per weight block.
struct QuantisedRows {
  std::vector<int16_t> q;
  std::vector<float> d, s;
};

// Blocks [b0, b1) of x (M * K / 32 blocks, row-major) into r, which is sized for them.
template <class I>
void quantise_blocks(const float* x, int64_t b0, int64_t b1, QuantisedRows& r) {
  for (int64_t b = b0; b < b1; ++b) r.d[b] = I::quantise_block(x + b * QK, r.q.data() + b * QK, &r.s[b]);
}

// One weight matrix of a call: its buffers and scheme, and where its (M, N) result goes.
struct Weight {
  const uint8_t* q;
  const void* scales;
  const void* mins;
  bool half;  // scales and mins float16, else float32
  int64_t bits, group, N;
  float zero;
  float* out;
  const float* xg;  // activation sums per weight group (M, K / group), for the zero and min terms; or null
};

// The group sums a matrix with a zero or mins needs, from the block sums: xg (M, K / group).
inline void group_sums(const QuantisedRows& xq, int64_t M, int64_t K, int64_t group, float* xg) {
  const int64_t per = group / QK;
  std::fill_n(xg, M * (K / group), 0.f);
  for (int64_t j = 0; j < M * (K / QK); ++j) xg[j / per] += xq.s[j];
}

// NR weight rows [n0, n0 + NR) against MB activation rows [m0, m0 + MB): template arguments, so
// the accumulators live in registers. Batches share each weight load across MB rows.
//
// Every (weight row, activation row) pair sums its blocks in one fixed order whatever NR and MB
// are: two accumulators, block b of each pair of blocks into the first and b + 1 into the second
// (pairs counted from the start of the row, or of each weight group when a scale spans several
// blocks; a block left over goes to the first), each block added as one FMA of its int32 sum and
// its scale product. So a row's result has the same bits in a batch of any size as alone, which
// makes a speculative verify forward of k + 1 positions give exactly the logits of k + 1 single
// decoding steps. Two chains also keep FMA latency from bounding one row.
// EXTRA: the weights have a zero or mins, added from the block sums.
template <class I, int NR, int MB, int BITS, bool EXTRA, typename S>
void dot_tile(const QuantisedRows& x, const float* xg, int64_t m0, int64_t K, const uint8_t* q, const S* scales,
              const S* mins, int64_t group, float zero, float* out, int64_t N, int64_t n0) {
  using FAcc = typename I::FAcc;
  const int64_t nb = K / QK, ng = K / group, row_bytes = K * BITS / 8;
  FAcc acc[2][NR][MB];
  float extra[NR][MB];
  for (int c = 0; c < 2; ++c)
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MB; ++i) acc[c][r][i] = I::facc_zero();
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) extra[r][i] = 0.f;
  const int16_t* xq = x.q.data() + m0 * K;
  const float* xd = x.d.data() + m0 * nb;
  const uint8_t* w = q + n0 * row_bytes;
  const S* sc = scales + n0 * ng;
  if (group == 16) {  // a scale per half block (Q6_K's sub-blocks); no zero or mins
    for (int64_t b = 0; b < nb; ++b) {
      typename I::XBlock xs[MB];
      for (int i = 0; i < MB; ++i) xs[i] = I::load_x(xq + i * K + b * QK);
      for (int r = 0; r < NR; ++r) {
        auto wb = I::template load_block<BITS>(w + r * row_bytes, b);
        if (BITS == 6) I::to_signed6(wb);  // signed codes: with a scale per 16 values the zero has no block sums to go with
        const float s0 = I::scale_at(sc, r * ng + 2 * b), s1 = I::scale_at(sc, r * ng + 2 * b + 1);
        for (int i = 0; i < MB; ++i) acc[0][r][i] = I::fma_dot_halves(acc[0][r][i], I::block_dot(wb, xs[i]), s0, s1, xd[i * nb + b]);
      }
    }
  } else if (NR * MB == 1) {
    // One row: two blocks a step, one per accumulator, with no per-block branch (the general loop
    // below ran a 128 x 640 group-32 matrix in L2 at half this speed). A scale per block (group
    // 32, most GGUF types) or per `per` blocks.
    const int64_t per = group / QK;
    auto dot = [&](int64_t b) { return I::block_dot(I::template load_block<BITS>(w, b), I::load_x(xq + b * QK)); };
    auto block = [&](FAcc a, int64_t b, float f) { return I::fma_dot(a, dot(b), f); };
    int64_t b = 0;
    if (per == 1) {
      // Eight blocks' scale products at once (weight scale x activation scale), each then
      // broadcast from memory: a scalar float16 conversion and multiply per block cost a fifth of
      // the loop's instructions.
      alignas(32) float f[8];
      for (; b + 8 <= nb; b += 8) {
        I::scale_products8(sc + b, xd + b, f);
        for (int j = 0; j < 8; j += 2) {
          acc[0][0][0] = I::fma_dot_at(acc[0][0][0], dot(b + j), f + j);
          acc[1][0][0] = I::fma_dot_at(acc[1][0][0], dot(b + j + 1), f + j + 1);
        }
      }
      for (; b + 2 <= nb; b += 2) {
        acc[0][0][0] = block(acc[0][0][0], b, I::scale_at(sc, b) * xd[b]);
        acc[1][0][0] = block(acc[1][0][0], b + 1, I::scale_at(sc, b + 1) * xd[b + 1]);
      }
      if (b < nb) acc[0][0][0] = block(acc[0][0][0], b, I::scale_at(sc, b) * xd[b]);
    } else {
      for (int64_t g = 0; g < ng; ++g) {
        const float scale = I::scale_at(sc, g);
        const int64_t end = b + per;
        for (; b + 2 <= end; b += 2) {
          acc[0][0][0] = block(acc[0][0][0], b, scale * xd[b]);
          acc[1][0][0] = block(acc[1][0][0], b + 1, scale * xd[b + 1]);
        }
        if (b < end) acc[0][0][0] = block(acc[0][0][0], b, scale * xd[b]), ++b;
      }
    }
  } else {
    const int64_t per = group / QK;
    // Block b into chain C: one weight load per row r, shared by the MB activation rows, each of
    // which adds it with its scale product (weight scale x activation scale, as the one-row path).
    auto block = [&](auto chain, int64_t b) __attribute__((always_inline)) {
      constexpr int C = decltype(chain)::value;
      for (int r = 0; r < NR; ++r) {
        const auto wb = I::template load_block<BITS>(w + r * row_bytes, b);
        const float ws = I::scale_at(sc, r * ng + b / per);
        for (int i = 0; i < MB; ++i)
          acc[C][r][i] = I::fma_dot(acc[C][r][i], I::block_dot(wb, I::load_x(xq + i * K + b * QK)), ws * xd[i * nb + b]);
      }
    };
    const std::integral_constant<int, 0> first;
    const std::integral_constant<int, 1> second;
    const int64_t span = per == 1 ? nb : per;  // pairs are counted from the start of each span
    for (int64_t s0 = 0; s0 < nb; s0 += span) {
      int64_t b = s0;
      for (; b + 2 <= s0 + span; b += 2) {
        block(first, b);
        block(second, b + 1);
      }
      if (b < s0 + span) block(first, b);
    }
  }
  if (EXTRA)  // sum over groups of (min - scale * zero) * (sum of the group's activations)
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MB; ++i) extra[r][i] = I::offset_dot(sc + r * ng, mins ? mins + (n0 + r) * ng : nullptr, zero, xg + (m0 + i) * ng, ng);
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) out[(m0 + i) * N + n0 + r] = I::facc_sum(I::facc_add(acc[0][r][i], acc[1][r][i])) + extra[r][i];
}

// All weight rows [t0, t1) against activation rows [m0, m0 + MB): NR rows at a time, then singly.
template <class I, int NR, int MB, int BITS, typename S>
void rows(const Weight& w, const QuantisedRows& x, int64_t m0, int64_t K, int64_t t0, int64_t t1) {
  const S* scales = static_cast<const S*>(w.scales);
  const S* mins = static_cast<const S*>(w.mins);
  int64_t n = t0;
  if (w.xg) {
    for (; n + NR <= t1; n += NR) dot_tile<I, NR, MB, BITS, true>(x, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, n);
    for (; n < t1; ++n) dot_tile<I, 1, MB, BITS, true>(x, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, n);
  } else {
    for (; n + NR <= t1; n += NR) dot_tile<I, NR, MB, BITS, false>(x, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, n);
    for (; n < t1; ++n) dot_tile<I, 1, MB, BITS, false>(x, w.xg, m0, K, w.q, scales, mins, w.group, w.zero, w.out, w.N, n);
  }
}

template <class I, int BITS, typename S>
void weight_rows(const Weight& w, const QuantisedRows& xq, int64_t M, int64_t K, int64_t t0, int64_t t1) {
  for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
    switch (std::min(ROWS, M - m0)) {  // accumulators: 4, 4, 3, 4
      case 4: rows<I, 1, 4, BITS, S>(w, xq, m0, K, t0, t1); break;
      case 3: rows<I, 1, 3, BITS, S>(w, xq, m0, K, t0, t1); break;
      case 2: rows<I, 2, 2, BITS, S>(w, xq, m0, K, t0, t1); break;
      default: rows<I, 1, 1, BITS, S>(w, xq, m0, K, t0, t1); break;
    }
  }
}

// Weight rows [t0, t1) of one matrix against every activation row, by its bits and scale type.
template <class I>
void matrix_rows(const Weight& w, const QuantisedRows& xq, int64_t M, int64_t K, int64_t t0, int64_t t1) {
  if (w.half) {
    if (w.bits == 4) weight_rows<I, 4, half>(w, xq, M, K, t0, t1);
    else if (w.bits == 6) weight_rows<I, 6, half>(w, xq, M, K, t0, t1);
    else weight_rows<I, 8, half>(w, xq, M, K, t0, t1);
  } else {
    if (w.bits == 4) weight_rows<I, 4, float>(w, xq, M, K, t0, t1);
    else if (w.bits == 6) weight_rows<I, 6, float>(w, xq, M, K, t0, t1);
    else weight_rows<I, 8, float>(w, xq, M, K, t0, t1);
  }
}

}  // namespace gemmarun_isa
