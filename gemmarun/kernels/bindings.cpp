// The Python module: the one translation unit that includes pybind11 (slow to compile).
#include <torch/extension.h>

#include <vector>

// qlinear.cpp
std::vector<at::Tensor> qlinear(at::Tensor x, std::vector<at::Tensor> qs, std::vector<at::Tensor> scales,
                                std::vector<c10::optional<at::Tensor>> mins, std::vector<int64_t> groups,
                                std::vector<double> zeros, std::vector<bool> q4s);
// attention.cpp
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kc, at::Tensor vc, at::Tensor slots,
                            at::Tensor mask, at::Tensor cos, at::Tensor sin, double scale, double softcap);
// elementwise.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps, c10::optional<at::Tensor> residual);
at::Tensor geglu(at::Tensor gate, at::Tensor up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "quantised linears sharing one input, int16 activations (AVX2)");
  m.def("decode_attention", &decode_attention, "one decoding step of attention with rope and cache write, float32");
  m.def("rms_norm", &rms_norm, "Gemma RMSNorm with the (1 + w) scale, plus an optional residual, float32 (AVX2)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("eps"), pybind11::arg("residual") = pybind11::none());
  m.def("geglu", &geglu, "gelu_tanh(gate) * up, float32 (AVX2)");
}
