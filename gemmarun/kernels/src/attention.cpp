// One decoding step of attention for every layer kind (or the few positions a speculative verify
// forward checks): rope on q and k, the cache write, scores, soft-cap, mask, softmax and the
// weighted sum of values in one call. Queries, scores and sums are
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

// out[j] = dot(a, keys[j], D) for j < Q, the same bits as one at a time
template <int Q, typename T>
void dots(const float* a, const T* const* keys, int64_t D, float* out) {
  Isa::dots<Q>(a, reinterpret_cast<const typename Bits<T>::type* const*>(keys), D, out);
}

// y += p[0] x[0] + p[1] x[1] + ... (m terms, in that order), the same bits as m axpy calls
template <typename T>
void axpys(const float* p, const T* const* x, int64_t m, float* y, int64_t D) {
  Isa::axpys(p, reinterpret_cast<const typename Bits<T>::type* const*>(x), m, y, D);
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

constexpr int64_t SPAN = 64;  // keys a task reads; fixed, so a query's partials and their merge never depend on E, T or the threads

// Writes this call's keys and values (after rope) at their slots, then attends; see decode_attention.
template <typename T>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc,
                  const at::Tensor& slots, const at::Tensor& mask, const at::Tensor& cos, const at::Tensor& sin, double scale,
                  double softcap) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), B = kc.size(0), S = kc.size(2);
  const int64_t Tq = N / B, E = mask.size(-1), g = H / Hkv, G = Tq * g;  // G: the queries of a (row, kv head) group
  auto slot = slots.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>();
  // Every key first: a query of this call may read the keys of the row's earlier positions in it.
  for (int64_t n = 0; n < N; ++n) {  // n = b * Tq + t
    TORCH_CHECK(sp[n] >= 0 && sp[n] < S, "slot outside the cache");
    for (int64_t j = 0; j < Hkv; ++j) {
      const int64_t row = (((n / Tq) * Hkv + j) * S + sp[n]) * D;
      rope(k.data_ptr<float>() + (n * Hkv + j) * D, cp + n * D, snp + n * D, kcp + row, D);
      const float* src = v.data_ptr<float>() + (n * Hkv + j) * D;
      for (int64_t d = 0; d < D; ++d) vcp[row + d] = static_cast<T>(src[d]);
    }
  }
  // Queries after rope, grouped (B, Hkv, Tq, g, D) so a group's G queries are consecutive, and the
  // partial results of every task; thread_local so that decoding steps reuse them.
  thread_local std::vector<float> qr, part;
  qr.resize(N * H * D);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t u = (((n / Tq) * Hkv + h / g) * Tq + n % Tq) * g + h % g;
      rope(q.data_ptr<float>() + (n * H + h) * D, cp + n * D, snp + n * D, qr.data() + u * D, D);
    }
  // Tasks are (row, key/value head, span of SPAN keys): the g heads x Tq positions of a group share
  // each key and value read, and a long cache is many spans, so both threads stream it (one task
  // per kv head would leave the 270M's single kv head to one thread). Each task keeps a softmax of
  // its own per query (max, sum, weighted values), merged below in ascending span order. A span
  // holds the same keys whatever E, Tq or the thread count, and a query's operations in it are the
  // same sequence, so a query gets the same bits in any call (given the same cache).
  const int64_t groups = B * Hkv, spans = (E + SPAN - 1) / SPAN, P = D + 2;  // a partial: D weighted values, max, sum
  part.resize(groups * spans * G * P);
  const bool* mp = mask.data_ptr<bool>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  float* pp = part.data();
  const float* qp = qr.data();
  at::parallel_for(0, groups * spans, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scores;
    scores.resize(G * SPAN);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bj = task / spans, b = bj / Hkv, s0 = (task % spans) * SPAN, s1 = std::min(E, s0 + SPAN);
      const T* keys = kcp + bj * S * D;
      const T* values = vcp + bj * S * D;
      const float* qg = qp + bj * G * D;  // u = t * g + i reads head j * g + i at position t
      const bool* visible = mp + b * Tq * E;  // (Tq, E): each position's own mask row
      float* out = pp + task * G * P;
      for (int64_t u = 0; u < G; ++u) {
        std::fill_n(out + u * P, D, 0.f);
        out[u * P + D] = -INFINITY;
        out[u * P + D + 1] = 0.f;
      }
      // Per position, the span's keys it sees; per query, their scores four keys at a time (four
      // dot chains in flight: one at a time left each score to FMA latency), then the weighted sum
      // of their values kept in registers across keys (axpy per key loaded and stored the sum each
      // time). Each score and each sum element is the same sequence of operations as key by key.
      for (int64_t t = 0; t < Tq; ++t) {
        const T* kp[SPAN];
        const T* vp[SPAN];
        int64_t nv = 0;
        for (int64_t s = s0; s < s1; ++s)
          if (visible[t * E + s]) {
            kp[nv] = keys + s * D;
            vp[nv++] = values + s * D;
          }
        for (int64_t u = t * g; u < (t + 1) * g; ++u) {
          const float* qu = qg + u * D;
          float* score = scores.data() + u * SPAN;  // score[c]: the c-th key it sees
          int64_t c = 0;
          for (; c + 4 <= nv; c += 4) dots<4>(qu, kp + c, D, score + c);
          for (; c < nv; ++c) dots<1>(qu, kp + c, D, score + c);
          float top = -INFINITY;
          for (c = 0; c < nv; ++c) {
            float x = score[c] * sc;
            if (cap > 0.f) x = std::tanh(x / cap) * cap;  // Gemma 2's attention soft-cap, before the mask
            score[c] = x;
            top = std::max(top, x);
          }
          float sum = 0.f;
          for (c = 0; c < nv; ++c) {
            score[c] = std::exp(score[c] - top);
            sum += score[c];
          }
          axpys(score, vp, nv, out + u * P, D);
          out[u * P + D] = top;
          out[u * P + D + 1] = sum;
        }
      }
    }
  });
  auto result = at::empty({N, H * D}, q.options());
  float* rp = result.data_ptr<float>();
  // a thread merges at least ~256 partials: a long cache's merge is split, a short one stays serial
  at::parallel_for(0, N * H, std::max<int64_t>(1, 256 / spans), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = n * H + h
      const int64_t n = r / H, h = r % H, bj = (n / Tq) * Hkv + h / g, u = (n % Tq) * g + h % g;
      float top = -INFINITY;
      for (int64_t c = 0; c < spans; ++c) top = std::max(top, pp[((bj * spans + c) * G + u) * P + D]);
      float* o = rp + r * D;
      std::fill_n(o, D, 0.f);
      if (top == -INFINITY) continue;  // a padding position sees no key; its output is never read
      float total = 0.f;
      for (int64_t c = 0; c < spans; ++c) {
        const float* pc = pp + ((bj * spans + c) * G + u) * P;
        if (pc[D] == -INFINITY) continue;
        const float w = std::exp(pc[D] - top);
        total += w * pc[D + 1];
        axpy(w, pc, o, D);
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return result;
}

}  // namespace

// Tq query positions per cache row (a decoding step: Tq = 1; speculation's verify: the drafts).
// q: (B * Tq, H, D); k, v: (B * Tq, Hkv, D), the projections before rope, float32, row b's
// positions consecutive; kc, vc: (B, Hkv, S, D) cache buffers (float32, float16 or bfloat16),
// written at slots (B, Tq) before any query reads them; mask: (B, Tq, E), the keys in slots [0, E)
// each position sees; cos, sin: (B * Tq, D). A (B,) slots and (B, E) mask mean Tq = 1. softcap 0
// means none. Returns (B * Tq, H * D) float32. Query head h reads key/value head h / (H / Hkv).
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kc, at::Tensor vc, at::Tensor slots,
                            at::Tensor mask, at::Tensor cos, at::Tensor sin, double scale, double softcap) {
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "decode_attention takes contiguous float32 q, k, v, cos, sin");
  const auto cache = kc.scalar_type();
  TORCH_CHECK(cache == at::kFloat || cache == at::kHalf || cache == at::kBFloat16, "the cache must be float32, float16 or bfloat16");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && vc.scalar_type() == cache, "kc and vc: contiguous, one dtype");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && kc.dim() == 4 && k.sizes() == v.sizes() && kc.sizes() == vc.sizes(), "bad shapes");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), B = kc.size(0), S = kc.size(2);
  TORCH_CHECK(B > 0 && N % B == 0, "q must hold the same number of positions for every cache row");
  const int64_t Tq = N / B;
  TORCH_CHECK(k.size(0) == N && kc.size(1) == Hkv && kc.size(3) == D && k.size(2) == D && H % Hkv == 0, "bad shapes");
  const bool flat = mask.dim() == 2 && Tq == 1;  // a decoding step's (B, E) mask
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && (flat || (mask.dim() == 3 && mask.size(1) == Tq)) &&
                  mask.size(0) == B && mask.size(-1) <= S,
              "mask must be bool (B, T, E <= S), or (B, E) for one position per row");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == N && (slots.dim() == 1 ? Tq == 1 : slots.size(0) == B),
              "slots must be int64 (B, T), or (B,) for one position per row");
  TORCH_CHECK(cos.numel() == N * D && sin.numel() == N * D && D % 2 == 0, "cos and sin must be (B * T, D)");
  if (cache == at::kFloat) return attend<float>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
  if (cache == at::kHalf) return attend<c10::Half>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
  return attend<c10::BFloat16>(q, k, v, kc, vc, slots, mask, cos, sin, scale, softcap);
}

}  // namespace GEMMARUN_NS
