// Row-wise and element-wise float32 steps of a decoder layer (AVX2), each one pass over its data.
// As separate torch ops each cost several calls of 5-20 us on a few thousand values, and decoding
// runs them ~100 times a token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

#include <cmath>

namespace {

// e^x for float32 lanes, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
// e^r and 2^n built in the exponent bits; within 2 ulp of expf over the clamped range.
inline __m256 exp8(__m256 x) {
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
inline __m256 gelu8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), u));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

inline float gelu1(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + std::tanh(u));
}

}  // namespace

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
      const float* res = add ? rp + r * C : nullptr;
      float* orow = op + r * C;
      __m256 acc = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        __m256 v = _mm256_loadu_ps(xr + c);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum8(acc);
      for (; c < C; ++c) ss += xr[c] * xr[c];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + e);
      const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f);
      for (c = 0; c + 8 <= C; c += 8) {
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + c), vinv), _mm256_add_ps(one, _mm256_loadu_ps(wp + c)));
        _mm256_storeu_ps(orow + c, add ? _mm256_add_ps(_mm256_loadu_ps(res + c), y) : y);
      }
      for (; c < C; ++c) orow[c] = (add ? res[c] : 0.f) + xr[c] * inv * (1.f + wp[c]);
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
  at::parallel_for(0, gate.numel(), 16384, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(op + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(gp + i)), _mm256_loadu_ps(up_ + i)));
    for (; i < i1; ++i) op[i] = gelu1(gp[i]) * up_[i];
  });
  return out;
}
