// One decoding step of attention for every layer kind: rope on q and k, the cache write, scores,
// soft-cap, mask, softmax and the weighted sum of values in one call. Queries, scores and sums are
// float32; the cache is float32, float16 or bfloat16 (half the bytes to read a cached token at
// long contexts), rounded once when a key or value is written and widened as it is read.
//
// As separate torch ops this step was about 25 calls a layer (rope's cat/neg/mul/add on q and k,
// two index_puts, two bmm, the soft-cap's div/tanh/mul, masked_fill, softmax, views and casts),
// roughly 1.5 ms a layer on the 2B shape, more than the layer's quantised matmuls take on the 270M.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../isa/select.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace GEMMARUN_NS {

namespace {

using gemmarun_isa::Isa;

// The ISA layer's view of a cache element: the same 16 bits, without PyTorch's types.
template <typename T> struct Bits { using type = T; };
template <> struct Bits<c10::Half> { using type = gemmarun_isa::half; };
template <> struct Bits<c10::BFloat16> { using type = gemmarun_isa::bfloat16; };
static_assert(sizeof(c10::Half) == 2 && sizeof(c10::BFloat16) == 2, "16-bit cache types");

template <typename T>
float dot(const float* a, const T* b, int64_t D) {
  return Isa::dot(a, reinterpret_cast<const typename Bits<T>::type*>(b), D);
}

template <typename T>
void axpy(float a, const T* x, float* y, int64_t D) {
  Isa::axpy(a, reinterpret_cast<const typename Bits<T>::type*>(x), y, D);
}

// Rotary embedding, half-split layout: out[i] = x[i] cos[i] - x[i + h] sin[i], out[i + h] = x[i + h] cos[i + h] + x[i] sin[i + h].
// Computed in float32, then rounded (to nearest even) to the output's type.
template <typename T>
void rope(const float* x, const float* cos, const float* sin, T* out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    out[i] = static_cast<T>(x[i] * cos[i] - x[i + h] * sin[i]);
    out[i + h] = static_cast<T>(x[i + h] * cos[i + h] + x[i] * sin[i + h]);
  }
}

constexpr int64_t MIN_SPAN = 64;  // keys a task takes at least: fewer and the merge costs more than it spreads

// Writes this step's keys and values (after rope) at their slots, then attends; see decode_attention.
template <typename T>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc,
                  const at::Tensor& slots, const at::Tensor& mask, const at::Tensor& cos, const at::Tensor& sin, double scale,
                  double softcap) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = kc.size(2);
  const int64_t E = mask.size(1), g = H / Hkv;
  auto slot = slots.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "slot outside the cache");
    for (int64_t j = 0; j < Hkv; ++j) {
      const int64_t row = ((b * Hkv + j) * S + sp[b]) * D;
      rope(k.data_ptr<float>() + (b * Hkv + j) * D, cp + b * D, snp + b * D, kcp + row, D);
      const float* src = v.data_ptr<float>() + (b * Hkv + j) * D;
      for (int64_t d = 0; d < D; ++d) vcp[row + d] = static_cast<T>(src[d]);
    }
  }
  // Queries after rope, (B, H, D), and the partial results of every task; thread_local so that
  // decoding steps reuse them instead of allocating.
  thread_local std::vector<float> qr, part;
  qr.resize(B * H * D);
  for (int64_t t = 0; t < B * H; ++t) rope(q.data_ptr<float>() + t * D, cp + (t / H) * D, snp + (t / H) * D, qr.data() + t * D, D);
  // Tasks are (row, key/value head, span of keys): the g query heads of a group share each key and
  // value read, and a long cache is split so both threads stream it (one task per kv head would
  // leave the 270M's single kv head to one thread and read it four times over). Each task keeps a
  // softmax of its own (max, sum, weighted values), merged below.
  const int64_t groups = B * Hkv;
  const int64_t want = (2 * at::get_num_threads() + groups - 1) / groups;
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>(want, (E + MIN_SPAN - 1) / MIN_SPAN));
  const int64_t span = (E + spans - 1) / spans, P = D + 2;  // a partial: D weighted values, max, sum
  part.resize(groups * spans * g * P);
  const bool* mp = mask.data_ptr<bool>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  float* pp = part.data();
  const float* qp = qr.data();
  at::parallel_for(0, groups * spans, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores;
    scores.resize(g * span);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bj = t / spans, b = bj / Hkv, s0 = (t % spans) * span, s1 = std::min(E, s0 + span);
      const T* keys = kcp + bj * S * D;
      const T* values = vcp + bj * S * D;
      const float* qh = qp + bj * g * D;  // the group's g heads are consecutive: h = j * g + i
      const bool* visible = mp + b * E;
      float* out = pp + t * g * P;
      for (int64_t i = 0; i < g; ++i) {
        std::fill_n(out + i * P, D, 0.f);
        out[i * P + D] = -INFINITY;
        out[i * P + D + 1] = 0.f;
      }
      for (int64_t s = s0; s < s1; ++s) {
        if (!visible[s]) continue;
        for (int64_t i = 0; i < g; ++i) {
          float x = dot(qh + i * D, keys + s * D, D) * sc;
          if (cap > 0.f) x = std::tanh(x / cap) * cap;  // Gemma 2's attention soft-cap, before the mask
          scores[i * span + s - s0] = x;
          out[i * P + D] = std::max(out[i * P + D], x);
        }
      }
      if (out[D] == -INFINITY) continue;  // no visible key in this span (visibility is per row, so for no head)
      for (int64_t s = s0; s < s1; ++s) {
        if (!visible[s]) continue;
        for (int64_t i = 0; i < g; ++i) {
          const float p = std::exp(scores[i * span + s - s0] - out[i * P + D]);
          out[i * P + D + 1] += p;
          axpy(p, values + s * D, out + i * P, D);
        }
      }
    }
  });
  auto result = at::empty({B, H * D}, q.options());
  float* rp = result.data_ptr<float>();
  for (int64_t t = 0; t < B * H; ++t) {  // t = (b * Hkv + j) * g + i
    const int64_t bj = t / g, i = t % g;
    float top = -INFINITY;
    for (int64_t c = 0; c < spans; ++c) top = std::max(top, pp[((bj * spans + c) * g + i) * P + D]);
    float* o = rp + t * D;
    std::fill_n(o, D, 0.f);
    if (top == -INFINITY) continue;  // a padding row sees no key; its output is never read
    float total = 0.f;
    for (int64_t c = 0; c < spans; ++c) {
      const float* pc = pp + ((bj * spans + c) * g + i) * P;
      if (pc[D] == -INFINITY) continue;
      const float w = std::exp(pc[D] - top);
      total += w * pc[D + 1];
      axpy(w, pc, o, D);
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
  return result;
}

}  // namespace

// q: (B, H, D); k, v: (B, Hkv, D), this step's projections before rope, float32; kc, vc: (B, Hkv,
// S, D) cache buffers (float32, float16 or bfloat16), written at slots (B,); mask: (B, E) keys
// visible in slots [0, E); cos, sin: (B, D). softcap 0 means none. Returns (B, H * D) float32.
// Query head h reads key/value head h / (H / Hkv).
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kc, at::Tensor vc, at::Tensor slots,
                            at::Tensor mask, at::Tensor cos, at::Tensor sin, double scale, double softcap) {
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "decode_attention takes contiguous float32 q, k, v, cos, sin");
  const auto cache = kc.scalar_type();
  TORCH_CHECK(cache == at::kFloat || cache == at::kHalf || cache == at::kBFloat16, "the cache must be float32, float16 or bfloat16");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && vc.scalar_type() == cache, "kc and vc: contiguous, one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && kc.dim() == 4 && k.sizes() == v.sizes() && kc.sizes() == vc.sizes(), "bad shapes");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = kc.size(2);
  TORCH_CHECK(k.size(0) == B && kc.size(0) == B && kc.size(1) == Hkv && kc.size(3) == D && k.size(2) == D && H % Hkv == 0, "bad shapes");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == B && mask.size(1) <= S, "mask must be bool (B, E <= S)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == B, "slots must be int64 (B,)");
  TORCH_CHECK(cos.numel() == B * D && sin.numel() == B * D && D % 2 == 0, "cos and sin must be (B, D)");
  if (cache == at::kFloat) return attend<float>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
  if (cache == at::kHalf) return attend<c10::Half>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
  return attend<c10::BFloat16>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
}

}  // namespace GEMMARUN_NS
