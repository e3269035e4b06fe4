// Declarations of the CPU (and, when built, CUDA) kernels of cfgswitch.
#pragma once

#include <cstdint>

namespace cfgswitch {

// out[b, i] = uncond[b, i] + weights[b] * (cond[b, i] - uncond[b, i]).
// Rounded exactly as torch rounds the three separate ops (sub, mul, add).
void cfg_combine_f32(const float* uncond, const float* cond, const float* weights, float* out,
                     std::int64_t batch, std::int64_t per_image);

// ---------------------------------------------------------------------------------------------
// guide_and_step: the CFG combine, the scheduler update and (optionally) the cosine similarity of
// the two predictions, in one pass over the latents.
//
// Per image b (all parameters are per image, so one call serves a batch that mixes requests):
//   e    = pred[row_a]                                   when row_b < 0 (one prediction)
//   e    = u + w * (c - u), u = pred[row_a], c = pred[row_b]   otherwise (guided)
//   x0   = (x - c0 * e) / c1                             (predicted clean latents; epsilon forms 0..3)
//   out  = form kDdim:        c2 * x0 + c3 * e
//          form kEuler:       x + ((x - x0) / c2) * c3
//          form kMultistep1:  c2 * x - c3 * x0
//          form kMultistep2:  (c2 * x - c3 * x0) - c5 * (c4 * (x0 - prev))
// The v-prediction forms (kVPrediction + an epsilon form, 4..7) convert the model output per row:
//   x0   = c1 * x - c0 * e                               (kDdimV, kMultistep1V, kMultistep2V)
//   x0   = c0 * e + x / c1                               (kEulerV)
//   e    = c1 * e + c0 * x                               (kDdimV only: the epsilon the update uses)
// then apply the update of their epsilon form.
// Each line is evaluated in exactly this order, one rounding per operation (no contraction), which
// is the order diffusers' DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler
// (dpmsolver++) evaluate their float32 updates in; the host computes c0..c5 from the scheduler.
// cosine[b] = <u, c> / (max(|u|, 1e-8) * max(|c|, 1e-8)) (as torch's cosine_similarity), NaN for an
// image with one prediction.
// ---------------------------------------------------------------------------------------------

enum StepForm : std::int32_t {
  kDdim = 0,
  kEuler = 1,
  kMultistep1 = 2,
  kMultistep2 = 3,
  kDdimV = 4,
  kEulerV = 5,
  kMultistep1V = 6,
  kMultistep2V = 7,
};
constexpr std::int32_t kVPrediction = 4;  // added to an epsilon form: the same update, v-prediction model
constexpr std::int32_t kFormCount = 8;

// Layout of the per-image parameter blocks.
constexpr int kParamsPerImage = 8;  // float32: [w, c0, c1, c2, c3, c4, c5, unused]
constexpr int kRowsPerImage = 4;    // int32:   [row_a, row_b (-1: none), form, unused]

struct GuideStepArgs {
  const void* pred = nullptr;      // [pred_rows, per_image] UNet output rows
  const std::int32_t* rows = nullptr;  // [batch, kRowsPerImage]
  const float* params = nullptr;   // [batch, kParamsPerImage]
  const void* sample = nullptr;    // [batch, per_image] current latents x
  const void* prev = nullptr;      // [batch, per_image] previous x0 (kMultistep2, kMultistep2V only), may be null
  void* out = nullptr;             // [batch, per_image] next latents (may alias sample)
  void* out_x0 = nullptr;          // [batch, per_image] predicted x0, may be null
  float* cosine = nullptr;         // [batch], may be null
  std::int64_t batch = 0;
  std::int64_t per_image = 0;
  std::int64_t pred_rows = 0;
  int num_threads = 0;             // CPU only: 0 = automatic (one thread below kAutoThreadsFrom elements)
};

// Elements per call from which the CPU kernel uses OpenMP threads by default. The op is memory-bound
// and takes ~0.1 ms at SDXL size with batch 4 on one core; a thread team's start-up and barrier cost
// (and, on a busy machine, waiting for a descheduled thread) outweighs that below this size.
constexpr std::int64_t kAutoThreadsFrom = std::int64_t{1} << 20;

// float32 CPU buffers (OpenMP threads over element tiles, see num_threads; the cosine sums are reduced
// in a fixed order, so results do not depend on the thread count). Throws std::invalid_argument on bad rows.
void guide_and_step_f32(const GuideStepArgs& args);

}  // namespace cfgswitch

// C entry point of the CUDA library (libcfgswitch_cuda.so), so TensorRT plugins, ONNX Runtime custom
// ops and ctypes can all call it. All buffers are device memory. dtype: 0 float32, 1 float16 (pred,
// sample, prev, out, out_x0; params and cosine are always float32). workspace: at least
// cfgswitch_guide_and_step_workspace_bytes(batch) bytes, zeroed once at allocation; the kernel leaves
// it zeroed again, so one workspace serves any number of calls on ONE stream at a time. device: the
// CUDA device of the buffers and stream (made current for this library's runtime), or -1 to keep the
// current one. out may alias sample; out_x0 must not alias any input.
// Returns 0 on success, else a cudaError_t value (or -1 for bad arguments).
#if defined(_WIN32)
#define CFGSWITCH_EXPORT __declspec(dllexport)
#else
#define CFGSWITCH_EXPORT __attribute__((visibility("default")))
#endif

extern "C" {
CFGSWITCH_EXPORT std::int64_t cfgswitch_guide_and_step_workspace_bytes(std::int64_t batch);
CFGSWITCH_EXPORT int cfgswitch_guide_and_step_cuda(const void* pred, const std::int32_t* rows, const float* params,
                                  const void* sample, const void* prev, void* out, void* out_x0,
                                  float* cosine, std::int64_t batch, std::int64_t per_image,
                                  std::int64_t pred_rows, int dtype, void* workspace, void* stream,
                                  int device);
CFGSWITCH_EXPORT const char* cfgswitch_cuda_error_string(int code);
}
