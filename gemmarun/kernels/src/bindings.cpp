// The Python module: the one translation unit that includes pybind11 (slow to compile).
#include <torch/extension.h>

#include "kernels.h"

namespace py = pybind11;
using namespace GEMMARUN_NS;

namespace {

Matrices matrices(py::sequence args) {  // [(q, scales, mins, group, zero, bits), ...] or [weight, ...]
  Matrices m;
  for (auto a : args) {
    if (!py::isinstance<py::tuple>(a)) {
      at::Tensor w = a.cast<at::Tensor>();
      check_dense_weight(w);  // at construction, not at the first step
      m.dense.push_back(w);
      continue;
    }
    auto t = a.cast<py::tuple>();
    TORCH_CHECK(t.size() == 6, "each matrix is (q, scales, mins, group, zero, bits)");
    m.q.push_back(t[0].cast<at::Tensor>());
    m.scales.push_back(t[1].cast<at::Tensor>());
    m.mins.push_back(t[2].cast<c10::optional<at::Tensor>>());
    m.groups.push_back(t[3].cast<int64_t>());
    m.zeros.push_back(t[4].cast<double>());
    m.bits.push_back(t[5].cast<int64_t>());
  }
  TORCH_CHECK(m.q.empty() || m.dense.empty(), "matrices sharing an input are all packed or all dense");
  return m;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("variant", &variant, "the ISA layer this build was compiled for");
  m.def("qlinear", &qlinear, "quantised linears sharing one input, int16 activations");
  m.def("dense_linear", &dense_linear, "x against dense float32 or bfloat16 weights, float32 sums, in x's dtype");
  m.def("decode_attention", &decode_attention, "attention for T positions per cache row with rope and cache write (float32, float16 or bfloat16 cache)");
  m.def("rms_norm", &rms_norm, "Gemma RMSNorm with the (1 + w) scale, plus an optional residual, float32",
        py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("geglu", &geglu, "gelu_tanh(gate) * up, float32");
  m.def("int4_search", &int4_search, "int4 group scales and mins minimising the weighted rounding error",
        py::arg("w"), py::arg("importance"), py::arg("group"));
  // module_local: each variant registers its own classes (pybind11 keeps one registry per process).
  // The decode stack's contract with Python (gemmarun/backend.py builds it): typed classes with named
  // fields, so a missing, misspelt or mistyped field fails at construction, not as a wrong layer.
  py::class_<Matrices>(m, "Matrices", py::module_local())
      .def(py::init(&matrices), py::arg("args"),
           "matrices sharing an input: the qlinear arguments (q, scales, mins, group, zero, bits) of each, or each dense weight")
      .def_property_readonly("count", &Matrices::count);
  py::class_<DecodeLayer>(m, "DecodeLayer", py::module_local())
      .def(py::init([](at::Tensor input_norm, at::Tensor post_attention_norm, at::Tensor pre_feedforward_norm,
                       at::Tensor post_feedforward_norm, c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm,
                       Matrices qkv, Matrices o, Matrices gate_up, Matrices down, bool sliding,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, double softcap) {
             TORCH_CHECK(qkv.count() == 3 && o.count() == 1 && gate_up.count() == 2 && down.count() == 1,
                         "a decoder layer has q, k, v; o; gate, up; down");
             TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm come together (Gemma 3)");
             return DecodeLayer{input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm, q_norm, k_norm,
                                qkv, o, gate_up, down, sliding, heads, kv_heads, head_dim, scale, softcap};
           }),
           py::kw_only(), py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("pre_feedforward_norm"),
           py::arg("post_feedforward_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("sliding"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"),
           py::arg("softcap"), "one decoder layer's float32 norm weights, packed or dense matrices and attention shape (softcap 0: none)")
      .def_readonly("sliding", &DecodeLayer::sliding)
      .def_readonly("heads", &DecodeLayer::heads)
      .def_readonly("kv_heads", &DecodeLayer::kv_heads)
      .def_readonly("head_dim", &DecodeLayer::head_dim);
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init<std::vector<DecodeLayer>, double>(), py::arg("layers"), py::arg("eps"), "every decoder layer, in order")
      .def("forward", &DecodeStack::forward, "every layer for T tokens per row");
}
