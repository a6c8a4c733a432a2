// The int4 scale and min of each group, chosen by a search that minimises the weighted squared
// error of the rounded weights (llama.cpp's make_qkx2_quants, with optional per-input importance).
// Plain min/max rounding cost the 270M 24% perplexity at g32; this search with importances from
// 2k calibration tokens 6%. In torch the search took 18 s for one 9216 x 2304 matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int kLevels = 15;  // 4 bits: levels 0..15
// Candidate inverse scales (15 + rmin + i * rdelta) / (max - min), i = 0..steps: llama.cpp's Q4_K
// settings; finer grids (40 steps of 0.05) moved the 270M's perplexity by 0.1%.
constexpr float kRmin = -1.f, kRdelta = 0.1f;
constexpr int kSteps = 20;

struct Fit {
  float scale, min, err;
};

// Group sizes are multiples of 32: every loop runs over whole 8-lane vectors. Sums are float32
// (a group holds at most a few hundred terms).
inline __m256 round_levels(__m256 x, __m256 lo, __m256 inv) {
  const __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, lo), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(l, _mm256_setzero_ps()), _mm256_set1_ps(float(kLevels)));
}

// Weighted error of x rounded onto `levels` of scale s and offset m.
inline float weighted_error(const float* x, const float* wt, const float* levels, int n, float s, float m) {
  __m256 e = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_loadu_ps(levels + j), _mm256_set1_ps(m)), _mm256_loadu_ps(x + j));
    e = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(wt + j), d), d, e);
  }
  return hsum8(e);
}

Fit search_group(const float* x, const float* wt, int n, float* levels) {
  __m256 vlo = _mm256_loadu_ps(x), vhi = vlo, vsw = _mm256_setzero_ps(), vsx = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j), w = _mm256_loadu_ps(wt + j);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
    vsw = _mm256_add_ps(vsw, w);
    vsx = _mm256_fmadd_ps(w, v, vsx);
  }
  float lanes[8], lo, hi;
  _mm256_storeu_ps(lanes, vlo);
  lo = *std::min_element(lanes, lanes + 8);
  _mm256_storeu_ps(lanes, vhi);
  hi = *std::max_element(lanes, lanes + 8);
  if (!(hi > lo)) return {0.f, lo, 0.f};  // a constant group is exact at scale 0
  const double sw = hsum8(vsw), sx = hsum8(vsx);
  const __m256 vlo1 = _mm256_set1_ps(lo);
  Fit best{(hi - lo) / kLevels, lo, 0.f};
  for (int j = 0; j < n; j += 8) _mm256_storeu_ps(levels + j, round_levels(_mm256_loadu_ps(x + j), vlo1, _mm256_set1_ps(1.f / best.scale)));
  best.err = weighted_error(x, wt, levels, n, best.scale, best.min);
  for (int i = 0; i <= kSteps; ++i) {
    const __m256 inv = _mm256_set1_ps((kLevels + kRmin + kRdelta * i) / (hi - lo));
    __m256 vsl = _mm256_setzero_ps(), vsl2 = _mm256_setzero_ps(), vsxl = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j), w = _mm256_loadu_ps(wt + j), l = round_levels(v, vlo1, inv);
      _mm256_storeu_ps(levels + j, l);
      const __m256 wl = _mm256_mul_ps(w, l);
      vsl = _mm256_add_ps(vsl, wl);
      vsl2 = _mm256_fmadd_ps(wl, l, vsl2);
      vsxl = _mm256_fmadd_ps(wl, v, vsxl);
    }
    const double sl = hsum8(vsl), sl2 = hsum8(vsl2), sxl = hsum8(vsxl);
    // Least squares for scale and min given the levels: the 2x2 normal equations.
    const double det = sw * sl2 - sl * sl;
    if (!(det > 0)) continue;
    const float s = float((sw * sxl - sx * sl) / det), m = float((sl2 * sx - sl * sxl) / det);
    if (!(s > 0)) continue;
    const float e = weighted_error(x, wt, levels, n, s, m);
    if (e < best.err) best = {s, m, e};
  }
  return best;
}

}  // namespace

// w (N, K) float32; importance (K,) float32 or none (all ones). Each value is weighted by
// importance[k] * sqrt(mean(x^2) of its group + x^2), llama.cpp's weighting: large weights and
// inputs that carry energy (mean squared activation from calibration) are kept most exactly.
std::tuple<at::Tensor, at::Tensor> int4_search(at::Tensor w, c10::optional<at::Tensor> importance, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w must be a contiguous float32 matrix");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(group > 0 && group % 8 == 0 && K % group == 0, "the group size must be a multiple of 8 dividing the input size");
  const bool weighted = importance.has_value() && importance->defined();
  if (weighted) TORCH_CHECK(importance->scalar_type() == at::kFloat && importance->is_contiguous() && importance->numel() == K, "importance must be K float32 values");
  auto scales = at::empty({N, K / group}, w.options());
  auto mins = at::empty({N, K / group}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* ip = weighted ? importance->data_ptr<float>() : nullptr;
  float* sp = scales.data_ptr<float>();
  float* mp = mins.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> wt(group), levels(group);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < K / group; ++g) {
        const float* x = wp + r * K + g * group;
        float sigma2 = 0.f;
        for (int64_t j = 0; j < group; ++j) sigma2 += x[j] * x[j];
        sigma2 /= float(group);
        for (int64_t j = 0; j < group; ++j) wt[j] = (ip ? ip[g * group + j] : 1.f) * std::sqrt(sigma2 + x[j] * x[j]);
        const Fit f = search_group(x, wt.data(), int(group), levels.data());
        sp[r * (K / group) + g] = f.scale;
        mp[r * (K / group) + g] = f.min;
      }
    }
  });
  return {scales, mins};
}
