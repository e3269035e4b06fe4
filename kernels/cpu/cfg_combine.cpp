// CFG combine on float32 CPU buffers: the classifier-free guidance rule of
// Ho & Salimans (2022), eps = eps_u + w * (eps_c - eps_u), with one w per image.
#include <cstdint>

#include "cfgswitch_kernels.h"

namespace cfgswitch {

void cfg_combine_f32(const float* uncond, const float* cond, const float* weights, float* out,
                     std::int64_t batch, std::int64_t per_image) {
#if defined(CFGSWITCH_OPENMP)
#pragma omp parallel for schedule(static) if (batch * per_image >= kAutoThreadsFrom)
#endif
  for (std::int64_t b = 0; b < batch; ++b) {
    const float w = weights[b];
    const float* u = uncond + b * per_image;
    const float* c = cond + b * per_image;
    float* o = out + b * per_image;
#pragma omp simd
    for (std::int64_t i = 0; i < per_image; ++i) {
      const float diff = c[i] - u[i];
      const float scaled = w * diff;
      o[i] = u[i] + scaled;
    }
  }
}

}  // namespace cfgswitch
