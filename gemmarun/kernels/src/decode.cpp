// The decoder layers of one decoding step (or of a verify forward's few positions per row) in one call. Run layer by layer from Python the same
// kernels paid ~200 us a layer in module calls and attribute lookups on the 270M (18 layers).
#include "kernels.h"

namespace GEMMARUN_NS {

namespace {

std::vector<at::Tensor> project(const at::Tensor& x, const Matrices& m) {
  if (m.dense.empty()) return qlinear(x, m.q, m.scales, m.mins, m.groups, m.zeros, m.bits);
  std::vector<at::Tensor> out;  // float32 x: float32 results, whatever the weights' dtype
  for (const at::Tensor& w : m.dense) out.push_back(dense_linear(x, w));
  return out;
}

}  // namespace

at::Tensor DecodeStack::forward(at::Tensor x, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
                                at::Tensor cos_g, at::Tensor sin_g, at::Tensor slots_g, at::Tensor mask_g,
                                at::Tensor cos_l, at::Tensor sin_l, at::Tensor slots_l, at::Tensor mask_l) const {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 (B * T, C)");
  TORCH_CHECK(k_cache.size() == layers_.size() && v_cache.size() == layers_.size(), "one cache buffer per layer");
  const int64_t N = x.size(0);  // B rows of T positions each; decode_attention reads B from the cache
  x = x.contiguous();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecodeLayer& L = layers_[i];
    auto qkv = project(rms_norm(x, L.input_norm, eps_, c10::nullopt), L.qkv);
    at::Tensor q = qkv[0].view({N, L.heads, L.head_dim}), k = qkv[1].view({N, L.kv_heads, L.head_dim});
    if (L.q_norm) {
      q = rms_norm(q, *L.q_norm, eps_, c10::nullopt);
      k = rms_norm(k, *L.k_norm, eps_, c10::nullopt);
    }
    at::Tensor v = qkv[2].view({N, L.kv_heads, L.head_dim});
    at::Tensor out = L.sliding ? decode_attention(q, k, v, k_cache[i], v_cache[i], slots_l, mask_l, cos_l, sin_l, L.scale, L.softcap)
                               : decode_attention(q, k, v, k_cache[i], v_cache[i], slots_g, mask_g, cos_g, sin_g, L.scale, L.softcap);
    x = rms_norm(project(out, L.o)[0], L.post_attention_norm, eps_, x);
    auto gate_up = project(rms_norm(x, L.pre_feedforward_norm, eps_, c10::nullopt), L.gate_up);
    x = rms_norm(project(geglu(gate_up[0], gate_up[1]), L.down)[0], L.post_feedforward_norm, eps_, x);
  }
  return x;
}

}  // namespace GEMMARUN_NS
