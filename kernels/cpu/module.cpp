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

template <typename T>
T* as_optional_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void guide_and_step_f32_py(std::uintptr_t pred, std::uintptr_t rows, std::uintptr_t params, std::uintptr_t sample,
                           std::uintptr_t prev, std::uintptr_t out, std::uintptr_t out_x0, std::uintptr_t cosine,
                           std::int64_t batch, std::int64_t per_image, std::int64_t pred_rows, int num_threads) {
  if (batch < 1 || per_image < 1 || pred_rows < 1) {
    throw std::invalid_argument("guide_and_step: expected batch, per_image and pred_rows >= 1, got " +
                                std::to_string(batch) + ", " + std::to_string(per_image) + " and " +
                                std::to_string(pred_rows));
  }
  cfgswitch::GuideStepArgs args;
  args.pred = as_ptr<const float>(pred, "pred");
  args.rows = as_ptr<const std::int32_t>(rows, "rows");
  args.params = as_ptr<const float>(params, "params");
  args.sample = as_ptr<const float>(sample, "sample");
  args.prev = as_optional_ptr<const float>(prev);
  args.out = as_ptr<float>(out, "out");
  args.out_x0 = as_optional_ptr<float>(out_x0);
  args.cosine = as_optional_ptr<float>(cosine);
  args.batch = batch;
  args.per_image = per_image;
  args.pred_rows = pred_rows;
  args.num_threads = num_threads;
  py::gil_scoped_release release;
  cfgswitch::guide_and_step_f32(args);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "cfgswitch fused elementwise ops (CPU; CUDA when built with CFGSWITCH_CUDA)";
  m.def("cfg_combine_f32", &cfg_combine_f32_py, py::arg("uncond"), py::arg("cond"), py::arg("weights"),
        py::arg("out"), py::arg("batch"), py::arg("per_image"),
        "out[b, i] = uncond[b, i] + weights[b] * (cond[b, i] - uncond[b, i]) for float32 CPU buffers.");
  m.def("guide_and_step_f32", &guide_and_step_f32_py, py::arg("pred"), py::arg("rows"), py::arg("params"),
        py::arg("sample"), py::arg("prev"), py::arg("out"), py::arg("out_x0"), py::arg("cosine"), py::arg("batch"),
        py::arg("per_image"), py::arg("pred_rows"), py::arg("num_threads") = 0,
        "CFG combine + scheduler update (+ cosine) for float32 CPU buffers; see cfgswitch_kernels.h. "
        "Addresses are integers; prev, out_x0 and cosine may be 0; num_threads 0 picks automatically.");
  m.attr("auto_threads_from") = cfgswitch::kAutoThreadsFrom;
  m.attr("params_per_image") = cfgswitch::kParamsPerImage;
  m.attr("rows_per_image") = cfgswitch::kRowsPerImage;
  // The CUDA kernels live in their own C library (libcfgswitch_cuda.so), loaded by cfgswitch.kernels.
  m.attr("has_cuda") = false;
}
