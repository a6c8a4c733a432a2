// Weight-only quantised matrix-vector kernels for AVX2/FMA CPUs.
//
// y[m, n] = sum_k x[m, k] * w[n, k], with w[n, k] = scale[n, g] * (q[n, k] - zero) + min[n, g],
// g = k / group. Decoding reads every weight once per token, so these kernels exist to stream
// 8-bit or 4-bit weights at memory speed instead of expanding them to float32 first.
//
// q8: q is int8, row-major (N, K); group a multiple of 8.
// q4: q is 4-bit, 16 bytes per 32 values: byte j holds value j in its low nibble and value j + 16
//     in its high nibble (ggml's Q4_0 order), which unpacks with one mask and one shift; group a
//     multiple of 32.
// Scales and mins are float32 or float16 (N, K / group).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float load_scale(const float* s, int64_t i) { return s[i]; }
inline float load_scale(const at::Half* s, int64_t i) { return _cvtsh_ss(reinterpret_cast<const uint16_t*>(s)[i]); }

// Per-row sums of x over each group: the `zero` and `min` terms need sum_k x[m, k] per group.
std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t group) {
  int64_t ng = K / group;
  std::vector<float> s(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) acc += x[m * K + k];
      s[m * ng + g] = acc;
    }
  return s;
}

// MB rows of x at once (templated so the accumulators live in registers).
template <int MB, bool Q4, typename S>
void row_block(const float* x, int64_t K, const uint8_t* wrow, const S* scales, const S* mins, int64_t group,
               float zero, const float* xsum, int64_t ng, float* out, int64_t N, int64_t n, int64_t srow) {
  __m256 acc[MB];
  float extra[MB];
  for (int i = 0; i < MB; ++i) { acc[i] = _mm256_setzero_ps(); extra[i] = 0.f; }
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < ng; ++g) {
    // Four independent accumulators per row hide the FMA latency.
    __m256 gacc[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4; ++j) gacc[i][j] = _mm256_setzero_ps();
    if (Q4) {
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k / 2));
        __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        __m256 w[4];
        w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int i = 0; i < MB; ++i) {
          const float* xr = x + i * K + k;
          for (int j = 0; j < 4; ++j) gacc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), gacc[i][j]);
        }
      }
    } else {
      int64_t k = g * group, end = (g + 1) * group;
      for (; k + 32 <= end; k += 32) {
        __m256 w[4];
        for (int j = 0; j < 4; ++j)
          w[j] = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + k + 8 * j))));
        for (int i = 0; i < MB; ++i) {
          const float* xr = x + i * K + k;
          for (int j = 0; j < 4; ++j) gacc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), gacc[i][j]);
        }
      }
      for (; k < end; k += 8) {
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + k))));
        for (int i = 0; i < MB; ++i) gacc[i][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * K + k), gacc[i][0]);
      }
    }
    __m256 s = _mm256_set1_ps(load_scale(scales, srow + g));
    for (int i = 0; i < MB; ++i) {
      __m256 t = _mm256_add_ps(_mm256_add_ps(gacc[i][0], gacc[i][1]), _mm256_add_ps(gacc[i][2], gacc[i][3]));
      acc[i] = _mm256_fmadd_ps(t, s, acc[i]);
    }
    if (zero != 0.f || mins) {
      float sc = load_scale(scales, srow + g), mn = mins ? load_scale(mins, srow + g) : 0.f;
      for (int i = 0; i < MB; ++i) extra[i] += (mn - sc * zero) * xsum[i * ng + g];
    }
  }
  for (int i = 0; i < MB; ++i) out[i * N + n] = hsum(acc[i]) + extra[i];
}

template <bool Q4, typename S>
void run(const float* x, int64_t M, int64_t K, const uint8_t* q, const S* scales, const S* mins, int64_t group,
         float zero, float* out, int64_t N) {
  int64_t ng = K / group;
  std::vector<float> xsum = (zero != 0.f || mins) ? group_sums(x, M, K, group) : std::vector<float>(M * ng, 0.f);
  int64_t row_bytes = Q4 ? K / 2 : K;
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wrow = q + n * row_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mb = std::min<int64_t>(4, M - m0);
        const float* xb = x + m0 * K;
        const float* xs = xsum.data() + m0 * ng;
        float* ob = out + m0 * N;
        switch (mb) {
          case 4: row_block<4, Q4>(xb, K, wrow, scales, mins, group, zero, xs, ng, ob, N, n, n * ng); break;
          case 3: row_block<3, Q4>(xb, K, wrow, scales, mins, group, zero, xs, ng, ob, N, n, n * ng); break;
          case 2: row_block<2, Q4>(xb, K, wrow, scales, mins, group, zero, xs, ng, ob, N, n, n * ng); break;
          default: row_block<1, Q4>(xb, K, wrow, scales, mins, group, zero, xs, ng, ob, N, n, n * ng); break;
        }
      }
    }
  });
}

}  // namespace

// x: (M, K) float32; q: (N, K) int8 or (N, K / 2) uint8; scales, mins: (N, K / group); returns (M, N).
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                      int64_t group, double zero, bool q4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), "q and scales must be contiguous");
  int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(group % (q4 ? 32 : 8) == 0 && K % group == 0, "group must be a multiple of 32 (q4) or 8 (q8) dividing K");
  TORCH_CHECK(q.size(1) == (q4 ? K / 2 : K), "q has the wrong row length");
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == K / group, "scales must be (N, K / group)");
  auto out = torch::empty({M, N}, x.options());
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  bool has_min = mins.has_value() && mins->defined();
  if (has_min) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(), "mins like scales");
  float z = static_cast<float>(zero);
  if (scales.scalar_type() == at::kHalf) {
    const at::Half* mp = has_min ? mins->data_ptr<at::Half>() : nullptr;
    if (q4) run<true>(x.data_ptr<float>(), M, K, qp, scales.data_ptr<at::Half>(), mp, group, z, out.data_ptr<float>(), N);
    else run<false>(x.data_ptr<float>(), M, K, qp, scales.data_ptr<at::Half>(), mp, group, z, out.data_ptr<float>(), N);
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32 or float16");
    const float* mp = has_min ? mins->data_ptr<float>() : nullptr;
    if (q4) run<true>(x.data_ptr<float>(), M, K, qp, scales.data_ptr<float>(), mp, group, z, out.data_ptr<float>(), N);
    else run<false>(x.data_ptr<float>(), M, K, qp, scales.data_ptr<float>(), mp, group, z, out.data_ptr<float>(), N);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("qlinear", &qlinear, "weight-only quantised linear (AVX2)"); }
