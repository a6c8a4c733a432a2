// The Python module: the one translation unit that includes pybind11 (slow to compile).
#include <torch/extension.h>

#include "kernels.h"

namespace py = pybind11;
using namespace GEMMARUN_NS;

namespace {

QuantMatrices matrices(py::sequence args) {  // [(q, scales, mins, group, zero, bits), ...]
  QuantMatrices m;
  for (auto a : args) {
    auto t = a.cast<py::tuple>();
    m.q.push_back(t[0].cast<at::Tensor>());
    m.scales.push_back(t[1].cast<at::Tensor>());
    m.mins.push_back(t[2].cast<c10::optional<at::Tensor>>());
    m.groups.push_back(t[3].cast<int64_t>());
    m.zeros.push_back(t[4].cast<double>());
    m.bits.push_back(t[5].cast<int64_t>());
  }
  return m;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("variant", &variant, "the ISA layer this build was compiled for");
  m.def("qlinear", &qlinear, "quantised linears sharing one input, int16 activations");
  m.def("decode_attention", &decode_attention, "one decoding step of attention with rope and cache write (float32, float16 or bfloat16 cache)");
  m.def("rms_norm", &rms_norm, "Gemma RMSNorm with the (1 + w) scale, plus an optional residual, float32",
        py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("geglu", &geglu, "gelu_tanh(gate) * up, float32");
  m.def("int4_search", &int4_search, "int4 group scales and mins minimising the weighted rounding error",
        py::arg("w"), py::arg("importance"), py::arg("group"));
  // module_local: each variant registers its own class (pybind11 keeps one registry per process)
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init([](py::list layers, double eps) {
             std::vector<DecodeLayer> ls;
             for (auto item : layers) {
               auto d = item.cast<py::dict>();
               DecodeLayer L;
               L.input_norm = d["input_norm"].cast<at::Tensor>();
               L.post_attention_norm = d["post_attention_norm"].cast<at::Tensor>();
               L.pre_feedforward_norm = d["pre_feedforward_norm"].cast<at::Tensor>();
               L.post_feedforward_norm = d["post_feedforward_norm"].cast<at::Tensor>();
               L.q_norm = d["q_norm"].cast<c10::optional<at::Tensor>>();
               L.k_norm = d["k_norm"].cast<c10::optional<at::Tensor>>();
               L.qkv = matrices(d["qkv"]);
               L.o = matrices(d["o"]);
               L.gate_up = matrices(d["gate_up"]);
               L.down = matrices(d["down"]);
               L.sliding = d["sliding"].cast<bool>();
               L.heads = d["heads"].cast<int64_t>();
               L.kv_heads = d["kv_heads"].cast<int64_t>();
               L.head_dim = d["head_dim"].cast<int64_t>();
               L.scale = d["scale"].cast<double>();
               L.softcap = d["softcap"].cast<double>();
               ls.push_back(std::move(L));
             }
             return DecodeStack(std::move(ls), eps);
           }),
           "layers: one dict of weights and shapes per decoder layer (see gemmarun/model.py)")
      .def("forward", &DecodeStack::forward, "every layer for one token per row");
}
