// Dense matrix-vector products for decoding and small batches: float32 activations against the
// float32 or bfloat16 weight rows of a dense checkpoint, over this build's ISA layer (dense_order,
// dense_dots); here the threads and the checks. PyTorch's own products for one row stream a
// 9216 x 2304 matrix at 10.5 GB/s in bfloat16 and 14.7 in float32 on 2 threads of the AMD EPYC
// here (family 23), this kernel at 17-18 and 19-22: the matrix-vector product reads every weight
// once, so the bandwidth is what counts.
//
// Each (activation row, weight row) product is one dense_dots sum, whatever the rows of the call:
// a row gets the same bits in a batch as alone.
#include <ATen/ATen.h>
#include <vector>

#include "../isa/select.h"
#include "kernels.h"
#include "tiles.h"

namespace GEMMARUN_NS {

using namespace gemmarun_isa;

namespace {

constexpr int64_t DENSE_ROWS = 4;  // weight rows sharing each load of the activations
constexpr int64_t DENSE_TILE = 64;  // weight rows a thread claims at a time (a multiple of DENSE_ROWS)

// Weight rows [n0, n1) against the M activation rows xp (M, K) as dense_order stored them: each
// tile of DENSE_ROWS rows stays in L1/L2 while every activation row passes, so the weights stream
// from memory once.
template <typename T>
void weight_rows(const float* xp, const T* w, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, float* out) {
  int64_t n = n0;
  for (; n + DENSE_ROWS <= n1; n += DENSE_ROWS) {
    const T* rows[DENSE_ROWS];
    for (int64_t j = 0; j < DENSE_ROWS; ++j) rows[j] = w + (n + j) * K;
    float r[DENSE_ROWS];
    for (int64_t m = 0; m < M; ++m) {
      Isa::dense_dots<DENSE_ROWS>(xp + m * K, rows, K, r);
      std::copy_n(r, DENSE_ROWS, out + m * N + n);
    }
  }
  for (; n < n1; ++n) {
    const T* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) Isa::dense_dots<1>(xp + m * K, &row, K, out + m * N + n);
  }
}

template <typename T>
void run(const float* x, const T* w, int64_t M, int64_t K, int64_t N, float* out) {
  thread_local std::vector<float> buffer;  // keeps its capacity: decoding steps allocate nothing here
  buffer.resize(M * K);
  const float* xp = buffer.data();  // a local name: the workers must see this thread's buffer, not their own
  for (int64_t m = 0; m < M; ++m) Isa::dense_order<T>(x + m * K, K, buffer.data() + m * K);
  // Each thread its own run of tiles, then what the others left (tiles.h, as qlinear shares them).
  // Against a plain equal split it measured level: a decoding step's 9216 x 2304 bf16 calls of the
  // 2B stream at 17-19 GB/s either way, its LM head at 18 (probe 20-22).
  const int64_t tiles = (N + DENSE_TILE - 1) / DENSE_TILE;
  for_each_tile(tiles, 1, [&](int64_t t) { weight_rows(xp, w, M, K, N, t * DENSE_TILE, std::min((t + 1) * DENSE_TILE, N), out); });
}

}  // namespace

// x (..., K) float32 or bfloat16 against w (N, K) float32 or bfloat16 -> (..., N) in x's dtype,
// summed in float32 (as PyTorch's bfloat16 GEMM sums, rounded to bfloat16 once at the end).
void check_dense_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w must be contiguous float32 or bfloat16 (N, K)");
}

at::Tensor dense_linear(at::Tensor x, at::Tensor w) {
  check_dense_weight(w);
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "x must be float32 or bfloat16 (..., K)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K > 0 && x.size(-1) == K, "x (..., K) and w (N, K) must share K > 0");
  const int64_t M = x.numel() / K;
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // bfloat16 widens exactly
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, xf.options());
  if (w.scalar_type() == at::kBFloat16)
    run(xf.data_ptr<float>(), reinterpret_cast<const bfloat16*>(w.data_ptr()), M, K, N, out.data_ptr<float>());
  else
    run(xf.data_ptr<float>(), w.data_ptr<float>(), M, K, N, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

}  // namespace GEMMARUN_NS
