// Row-wise and element-wise float32 steps of a decoder layer, each one pass over its data (the
// vector work in the ISA layer's sum_squares, norm_row and geglu_row). As separate torch ops each
// cost several calls of 5-20 us on a few thousand values, and decoding runs them ~100 times a token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../isa/select.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>

namespace GEMMARUN_NS {

using gemmarun_isa::Isa;

const char* variant() { return Isa::name; }

// Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w) over rows of C values, plus `residual`
// when given (the block's x + norm(sublayer(x))).
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1, "w must be a float32 vector");
  const int64_t C = w.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == C, "the last dimension of x must match w");
  const bool add = residual.has_value() && residual->defined();
  if (add) TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat && residual->is_contiguous(), "residual like x");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rp = add ? residual->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, x.numel() / C, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      const float inv = 1.f / std::sqrt(Isa::sum_squares(xr, C) / static_cast<float>(C) + e);
      Isa::norm_row(xr, inv, wp, add ? rp + r * C : nullptr, op + r * C, C);
    }
  });
  return out;
}

// Gemma's GeGLU: gelu_tanh(gate) * up, float32, same shapes.
at::Tensor geglu(at::Tensor gate, at::Tensor up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.is_contiguous() && up.is_contiguous(),
              "gate and up must be contiguous float32");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up must have the same shape");
  auto out = at::empty_like(gate);
  const float *gp = gate.data_ptr<float>(), *up_ = up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads split at whole blocks of 16 floats (a multiple of every ISA's vector width): the scalar
  // tail's tanh rounds differently, and a chunk ending mid-block would send some elements to it
  // depending on the number of rows. Only the tensor's last n % 16 elements take it, none when the
  // row length is a multiple of 16 (every Gemma's intermediate size), so a row's bits never depend
  // on the batch.
  constexpr int64_t LANES = 16;
  const int64_t n = gate.numel(), blocks = (n + LANES - 1) / LANES;
  at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * LANES, i1 = std::min(n, b1 * LANES);
    Isa::geglu_row(gp + i0, up_ + i0, op + i0, i1 - i0);
  });
  return out;
}

}  // namespace GEMMARUN_NS
