// Quantised matrix products: int16 activations against 8-, 6- or 4-bit weights (the math in
// qdot.h, over this build's ISA layer); here the threads, the scratch buffers and the checks.
//
// q8: q is int8, row-major (N, K).
// q4: q is 4-bit, 16 bytes per 32 values: byte j holds value j in its low nibble and value j + 16
//     in its high nibble (ggml's Q4_0 order).
// q6: q is signed 6-bit, 24 bytes per 32 values: the low nibbles of q + 32 as q4, then a 64-bit
//     word of their top two bits (layout in isa/common.h; quant.py's HIGH_BITS writes it).
// group: a multiple of 32, or 16 without mins or zero (Q6_K's sub-blocks; 8- or 6-bit q).
// Scales and mins are float32 or float16 (N, K / group).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../isa/select.h"
#include "kernels.h"
#include "qdot.h"
#include "tiles.h"

namespace GEMMARUN_NS {

using namespace gemmarun_isa;

namespace {

constexpr int64_t WEIGHT_TILE = 16;  // weight rows kept hot in L1/L2 while all activation rows pass
constexpr int64_t TILES_TAKEN = 4;  // weight tiles a thread claims at a time

// Into the calling thread's buffers, which keep their capacity: decoding steps allocate nothing.
const QuantisedRows& quantise_rows(const float* x, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  thread_local QuantisedRows buffers;
  QuantisedRows& r = buffers;  // a local name: the workers below must see this thread's buffers, not their own
  r.q.resize(M * K);
  r.d.resize(M * nb);
  r.s.resize(M * nb);
  at::parallel_for(0, M * nb, 256, [&](int64_t b0, int64_t b1) { quantise_blocks<Isa>(x, b0, b1, r); });
  return r;
}

// Every matrix against the same x, quantised once, in one parallel region: q, k and v (or gate
// and up) cost one call, one activation rounding and one thread wake-up instead of three.
void run(const float* x, int64_t M, int64_t K, std::vector<Weight>& ws) {
  const QuantisedRows& xq = quantise_rows(x, M, K);
  const int64_t n = static_cast<int64_t>(ws.size());
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
  sums.resize(total);
  for (int64_t i = 0, at = 0; i < n; ++i) {
    Weight& w = ws[i];
    if (w.zero == 0.f && !w.mins) continue;
    float* xg = sums.data() + at;
    group_sums(xq, M, K, w.group, xg);
    w.xg = xg;
    at += M * (K / w.group);
  }
  // Tiles numbered across the matrices, shared out by for_each_tile (tiles.h).
  const int64_t* starts = first.data();  // a local name for the workers, as in quantise_rows
  for_each_tile(first[n], TILES_TAKEN, [&](int64_t t) {
    int64_t i = 0;
    while (t >= starts[i + 1]) ++i;  // a handful of matrices: a scan beats a search
    const Weight& w = ws[i];
    const int64_t r = (t - starts[i]) * WEIGHT_TILE;
    matrix_rows<Isa>(w, xq, M, K, r, std::min(r + WEIGHT_TILE, w.N));
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


}  // namespace GEMMARUN_NS
