// The int4 scale and min of each group, chosen by a search that minimises the weighted squared
// error of the rounded weights (llama.cpp's make_qkx2_quants, with optional per-input importance).
// Plain min/max rounding cost the 270M 24% perplexity at g32; this search with importances from
// 2k calibration tokens 6%. In torch the search took 18 s for one 9216 x 2304 matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../isa/select.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace GEMMARUN_NS {

namespace {

using gemmarun_isa::Isa;
using gemmarun_isa::kLevels;

// Candidate inverse scales (15 + rmin + i * rdelta) / (max - min), i = 0..steps: llama.cpp's Q4_K
// settings; finer grids (40 steps of 0.05) moved the 270M's perplexity by 0.1%.
constexpr float kRmin = -1.f, kRdelta = 0.1f;
constexpr int kSteps = 20;

struct Fit {
  float scale, min, err;
};

// Group sizes are multiples of 8 (the vector layers' lanes). Sums are float32 (a group holds at
// most a few hundred terms).
Fit search_group(const float* x, const float* wt, int n, float* levels) {
  float lo, hi, fsw, fsx;
  Isa::group_stats(x, wt, n, &lo, &hi, &fsw, &fsx);
  if (!(hi > lo)) return {0.f, lo, 0.f};  // a constant group is exact at scale 0
  const double sw = fsw, sx = fsx;
  Fit best{(hi - lo) / kLevels, lo, 0.f};
  float sl_, sl2_, sxl_;
  Isa::round_levels(x, wt, n, lo, 1.f / best.scale, levels, &sl_, &sl2_, &sxl_);
  best.err = Isa::weighted_error(x, wt, levels, n, best.scale, best.min);
  for (int i = 0; i <= kSteps; ++i) {
    Isa::round_levels(x, wt, n, lo, (kLevels + kRmin + kRdelta * i) / (hi - lo), levels, &sl_, &sl2_, &sxl_);
    const double sl = sl_, sl2 = sl2_, sxl = sxl_;
    // Least squares for scale and min given the levels: the 2x2 normal equations.
    const double det = sw * sl2 - sl * sl;
    if (!(det > 0)) continue;
    const float s = float((sw * sxl - sx * sl) / det), m = float((sl2 * sx - sl * sxl) / det);
    if (!(s > 0)) continue;
    const float e = Isa::weighted_error(x, wt, levels, n, s, m);
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

}  // namespace GEMMARUN_NS
