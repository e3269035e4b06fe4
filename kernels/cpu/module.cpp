// pybind11 entry point of cfgswitch._kernels.
//
// Every op takes raw addresses (integers), element counts and per-image
// parameters, never framework tensors, so torch tensors, TensorRT device
// buffers and ONNX Runtime IO bindings can all call it.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cfgswitch_kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address, const char* name) {
  if (address == 0) {
    throw std::invalid_argument(std::string(name) + ": expected a non-null address, got 0");
  }
  return reinterpret_cast<T*>(address);
}

void cfg_combine_f32_py(std::uintptr_t uncond, std::uintptr_t cond, std::uintptr_t weights,
                        std::uintptr_t out, std::int64_t batch, std::int64_t per_image) {
  if (batch < 1 || per_image < 1) {
    throw std::invalid_argument("cfg_combine: expected batch >= 1 and per_image >= 1, got " +
                                std::to_string(batch) + " and " + std::to_string(per_image));
  }
  py::gil_scoped_release release;
  cfgswitch::cfg_combine_f32(as_ptr<const float>(uncond, "uncond"), as_ptr<const float>(cond, "cond"),
                             as_ptr<const float>(weights, "weights"), as_ptr<float>(out, "out"), batch,
                             per_image);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "cfgswitch fused elementwise ops (CPU; CUDA when built with CFGSWITCH_CUDA)";
  m.def("cfg_combine_f32", &cfg_combine_f32_py, py::arg("uncond"), py::arg("cond"), py::arg("weights"),
        py::arg("out"), py::arg("batch"), py::arg("per_image"),
        "out[b, i] = uncond[b, i] + weights[b] * (cond[b, i] - uncond[b, i]) for float32 CPU buffers.");
#ifdef CFGSWITCH_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
