// The kernels' tensor API, shared by the bindings and the decode loop.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

// Every variant's code lives in a namespace of its own (kernels/__init__.py passes
// -DGEMMARUN_NS=gemmarun_avx2 and so on), so two variants loaded in one process (the tests compare
// them) never resolve each other's symbols.
#ifndef GEMMARUN_NS
#define GEMMARUN_NS gemmarun_generic
#endif

namespace GEMMARUN_NS {

// The variant this build was compiled for: "generic", "avx2", "avx512" or "neon".
const char* variant();

// qlinear.cpp: x (..., K) against each quantised matrix; one (..., N) result per matrix.
std::vector<at::Tensor> qlinear(at::Tensor x, std::vector<at::Tensor> qs, std::vector<at::Tensor> scales,
                                std::vector<c10::optional<at::Tensor>> mins, std::vector<int64_t> groups,
                                std::vector<double> zeros, std::vector<int64_t> bits);
// dense.cpp: x (..., K) against dense float32 or bfloat16 weights (N, K), for a few rows.
at::Tensor dense_linear(at::Tensor x, at::Tensor w);
void check_dense_weight(const at::Tensor& w);  // what dense_linear takes as w, or a clear error
// attention.cpp: attention for T positions per cache row (a decoding step: T = 1), with rope and the cache write.
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kc, at::Tensor vc, at::Tensor slots,
                            at::Tensor mask, at::Tensor cos, at::Tensor sin, double scale, double softcap);
// elementwise.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps, c10::optional<at::Tensor> residual);
at::Tensor geglu(at::Tensor gate, at::Tensor up);
// quantize.cpp: int4 scales and mins (N, K / group) by a weighted error search.
std::tuple<at::Tensor, at::Tensor> int4_search(at::Tensor w, c10::optional<at::Tensor> importance, int64_t group);

// decode.cpp: a stack of decoder layers run for T tokens per row, with no Python between layers.
struct Matrices {  // matrices that share an input: all packed (qlinear's arguments) or all dense
  std::vector<at::Tensor> q, scales;
  std::vector<c10::optional<at::Tensor>> mins;
  std::vector<int64_t> groups;
  std::vector<double> zeros;
  std::vector<int64_t> bits;
  std::vector<at::Tensor> dense;  // float32 or bfloat16 weights (N, K), for dense_linear
  size_t count() const { return q.size() + dense.size(); }
};

struct DecodeLayer {
  at::Tensor input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm;
  c10::optional<at::Tensor> q_norm, k_norm;  // Gemma 3
  Matrices qkv, o, gate_up, down;
  bool sliding;
  int64_t heads, kv_heads, head_dim;
  double scale, softcap;  // softcap 0: none
};

class DecodeStack {
 public:
  DecodeStack(std::vector<DecodeLayer> layers, double eps) : layers_(std::move(layers)), eps_(eps) {}
  // x (B * T, C) after the embedding, row b's T positions consecutive; per layer kind ("g" global,
  // "l" sliding) the rope tables (B * T, D), the write slots (B, T) and the visible keys (B, T, E)
  // (or (B,) and (B, E) for T = 1), as decode_attention takes them. Returns x (B * T, C) after the
  // last layer.
  at::Tensor forward(at::Tensor x, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache, at::Tensor cos_g,
                     at::Tensor sin_g, at::Tensor slots_g, at::Tensor mask_g, at::Tensor cos_l, at::Tensor sin_l,
                     at::Tensor slots_l, at::Tensor mask_l) const;

 private:
  std::vector<DecodeLayer> layers_;
  double eps_;
};

}  // namespace GEMMARUN_NS
