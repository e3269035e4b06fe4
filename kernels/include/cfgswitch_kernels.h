// Declarations of the CPU (and, when built, CUDA) kernels of cfgswitch.
#pragma once

#include <cstdint>

namespace cfgswitch {

// out[b, i] = uncond[b, i] + weights[b] * (cond[b, i] - uncond[b, i]).
// Rounded exactly as torch rounds the three separate ops (sub, mul, add).
void cfg_combine_f32(const float* uncond, const float* cond, const float* weights, float* out,
                     std::int64_t batch, std::int64_t per_image);

}  // namespace cfgswitch
